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
    # the last line of each fine-tuned model's card: what the profile's models are good for
    assert cfg["model_card_note"].strip() and config.resolve(name, "sft")["model_card_note"] == cfg["model_card_note"]
    for stage in TRAINING:
        s = config.resolve(name, stage)
        for key in ("base_model", "dataset", "max_steps", "batch_size", "seq_len", "lr"):
            assert key in s, f"{name}.{stage} lacks {key}"
        if stage != "t5":
            assert {"r", "alpha", "dropout", "target_modules"} <= set(s["lora"])
    # what 02 and 04 evaluate for their learning curves, and 05's generation batch, are settings too
    assert config.resolve(name, "sft")["curve_rows"] > 0 and config.resolve(name, "qlora")["curve_rows"] > 0
    assert config.resolve(name, "cot")["eval_batch_size"] > 0


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


def _fake_gpu(monkeypatch, capability):
    """A CUDA GPU of this compute capability. torch's is_bf16_supported() counts emulation by
    default, and a T4 (7.5) emulates bf16: it answers True unless including_emulation=False."""
    import torch

    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    native = capability[0] >= 8
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)


def test_dtype_by_device(monkeypatch):
    assert config.pick_dtype("cpu") == "float32"
    assert config.pick_dtype("cpu", prefer_bf16_on_cpu=True) == "bfloat16"
    _fake_gpu(monkeypatch, (8, 0))  # an A100
    assert config.pick_dtype("cuda") == "bfloat16"


def test_cpu_bf16_only_where_the_cpu_has_it_and_only_for_stages_that_ask(monkeypatch):
    """smol asks for bf16 on the CPU for 08's scoring (the eval stage); it gets it only where the
    CPU multiplies bf16 in hardware (forced here both ways), never on tiny, never for training."""
    monkeypatch.setenv("MEDKIT_CPU_BF16", "1")
    assert config.cpu_has_native_bf16()
    smol = {s: config.resolve("smol", s)["dtype"] for s in ("eval", "sft", "dpo", "cot", "qlora", "t5", "rag", "agent", "serve")}
    assert smol.pop("eval") == "bfloat16"
    assert set(smol.values()) == {"float32"}
    assert config.resolve("smol")["dtype"] == "float32"
    assert {config.resolve("tiny", s)["dtype"] for s in (None, "sft", "eval")} == {"float32"}
    monkeypatch.setenv("MEDKIT_CPU_BF16", "0")  # an AVX2-only CPU emulates bf16: fp32 throughout
    assert not config.cpu_has_native_bf16()
    assert config.resolve("smol", "eval")["dtype"] == "float32"


def test_a_t4_that_emulates_bf16_gets_fp16_everywhere(monkeypatch):
    """Defect 1 of the GPU-profile issue: a T4 reports emulated bf16 as supported."""
    from medkit.serve import loadtest  # noqa: F401  (the serving notebook reads the same dtype)
    from medkit.train import common, qlora

    _fake_gpu(monkeypatch, (7, 5))
    assert config.pick_dtype("cuda") == "float16"
    cfg = config.resolve("colab-t4", "qlora")
    assert (cfg["device"], cfg["dtype"]) == ("cuda", "float16")
    assert qlora.compute_dtype(cfg, "phi") == "float32"  # Phi's fp32 compute path on an fp16 GPU
    cot = config.resolve("colab-t4", "cot")
    assert common.precision_flags(cot["dtype"]) == {"bf16": False, "fp16": True}
    assert config.resolve("colab-t4")["dtype"] == "float16"  # what 09 passes to vLLM as --dtype
    _fake_gpu(monkeypatch, (8, 9))  # an L4 (gpu-24gb)
    assert config.resolve("gpu-24gb", "cot")["dtype"] == "bfloat16"


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


def test_01_builds_the_tiny_bases_and_converts_the_models_each_profile_names():
    from medkit import smol, tiny

    made = {name: (tiny.families_in(config.resolve(name)), smol.names_in(config.resolve(name)))
            for name in config.PROFILES}
    assert made["tiny"] == (list(tiny.FAMILIES), [])
    assert made["smol"] == (["t5"], ["smollm2-135m"])  # SmolLM2 replaces the tiny decoders; T5 stays tiny
    assert all(made[name] == ([], []) for name in ("colab-t4", "gpu-24gb"))
    odd = config.resolve("tiny")
    odd["stages"]["sft"]["base_model"] = "tiny:gpt2"
    with pytest.raises(ValueError, match="gpt2"):
        tiny.families_in(odd)


def test_the_chat_runtime_is_a_profile_setting():
    """06's answerer and 07's agent write through llama.cpp on `smol` (a CPU, one reply at a time)
    and through transformers elsewhere; no profile names a runtime that does not exist."""
    from medkit.serve.runtime import RUNTIMES

    got = {name: (config.resolve(name, "rag").get("generator_runtime", "transformers"),
                  config.resolve(name, "agent").get("llm_runtime", "transformers")) for name in config.PROFILES}
    assert got["smol"] == ("llama.cpp", "llama.cpp")
    assert all(got[name] == ("transformers", "transformers") for name in ("tiny", "colab-t4", "gpu-24gb"))
    assert all(r in RUNTIMES for pair in got.values() for r in pair)
