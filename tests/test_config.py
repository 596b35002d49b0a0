import json

import pytest

from medkit import config

STAGES = ["data", "sft", "t5", "dpo", "qlora", "cot", "rag", "eval", "serve"]
TRAINING = ["sft", "t5", "dpo", "qlora", "cot"]


def test_tiny_is_default_and_cpu():
    cfg = config.resolve()
    assert cfg["profile"] == "tiny"
    assert cfg["device"] == "cpu"
    assert cfg["dtype"] == "float32"


@pytest.mark.parametrize("name", list(config.PROFILES))
def test_every_profile_names_every_stage(name):
    cfg = config.resolve(name)
    assert set(STAGES) <= set(cfg["stages"])
    assert cfg["memory_budget"]
    for stage in TRAINING:
        s = config.resolve(name, stage)
        for key in ("base_model", "dataset", "max_steps", "batch_size", "seq_len", "lr"):
            assert key in s, f"{name}.{stage} lacks {key}"
        if stage != "t5":
            assert {"r", "alpha", "dropout", "target_modules"} <= set(s["lora"])


def test_gpu_profiles_name_the_real_models():
    for name in ("colab-t4", "gpu-24gb"):
        st = config.PROFILES[name]["stages"]
        assert st["sft"]["base_model"].startswith("Qwen/") and "0.5B" in st["sft"]["base_model"]
        assert st["qlora"]["base_model"] == "microsoft/phi-2"
        assert "DeepSeek-R1-Distill-Llama-8B" in st["cot"]["base_model"]
        assert "bge" in st["rag"]["embedder"].lower() and "bge-reranker" in st["rag"]["reranker"]
        assert st["t5"]["base_model"] == "google/flan-t5-small"


def test_seed_hyperparameters_of_the_reproduced_systems():
    for name in config.PROFILES:
        q = config.resolve(name, "qlora")["lora"]
        assert (q["r"], q["alpha"], q["dropout"]) == (32, 64, 0.1)
        c = config.resolve(name, "cot")["lora"]
        assert (c["r"], c["alpha"]) == (16, 16) and len(c["target_modules"]) == 7


def test_dtype_by_device(monkeypatch):
    import torch

    assert config.pick_dtype("cpu") == "float32"
    assert config.pick_dtype("cpu", prefer_bf16_on_cpu=True) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # a T4
    assert config.pick_dtype("cuda") == "float16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # an A100
    assert config.pick_dtype("cuda") == "bfloat16"


def test_gpu_profile_falls_back_to_cpu_here():
    cfg = config.resolve("colab-t4", "sft")
    assert cfg["requested_device"] == "cuda"
    import torch
    if not torch.cuda.is_available():
        assert cfg["device"] == "cpu" and cfg["dtype"] == "float32"


def test_unknown_profile_and_stage_are_clear_errors():
    with pytest.raises(ValueError, match="unknown profile 'nope'"):
        config.resolve("nope")
    with pytest.raises(ValueError, match="no stage 'nope'"):
        config.resolve("tiny", "nope")


def test_overrides_and_saved_config(tmp_path):
    cfg = config.resolve("tiny", "sft", max_steps=7)
    assert cfg["max_steps"] == 7
    path = config.save_config(cfg, tmp_path / "art")
    assert json.loads(path.read_text())["max_steps"] == 7
    assert path.name == "config.json"


def test_model_references_point_at_things_that_exist():
    from medkit import artifacts, tiny

    for name in config.PROFILES:
        for stage, s in config.PROFILES[name]["stages"].items():
            ref = s.get("base_model", "")
            if ref.startswith("tiny:"):
                assert ref.split(":", 1)[1] in tiny.FAMILIES, f"{name}.{stage}: {ref}"
                assert f"tiny_{ref.split(':', 1)[1]}" in artifacts.PRODUCERS
            if ref.startswith("artifact:"):
                assert ref.split(":", 1)[1] in artifacts.PRODUCERS, f"{name}.{stage}: {ref}"
