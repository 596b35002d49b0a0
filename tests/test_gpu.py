"""The GPU profiles' training path, on tiny bases: the same functions the notebooks call, with the
GPU profile's settings (device cuda, a 16-bit dtype, gradient checkpointing, 8-bit AdamW, 4-bit
weights on the GPU). bf16 is what a 24 GB card runs and fp16 what a Colab T4 runs (a T4 has no
bf16). Skipped without CUDA: CI has no GPU, so these run on a GPU machine (the README says when
they last did)."""
import math

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

from conftest import SMALL_TINY  # noqa: E402
from medkit import config, tiny  # noqa: E402
from medkit.data import generate  # noqa: E402
from medkit.train import common, cot, dpo, qlora, sft  # noqa: E402

SMALL = dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY)
DTYPES = ["bfloat16", "float16"]  # gpu-24gb, colab-t4


@pytest.fixture(scope="module")
def bases(tmp_path_factory, kbase):
    texts = [p["text"] for p in generate.passages(kbase)][:500]
    cache = tmp_path_factory.mktemp("tiny")
    return {f: tiny.build_base(f, texts, SMALL, seed=0, cache=cache, progress=False) for f in ("qwen2", "phi", "llama")}


def _gpu_cfg(stage: str, dtype: str, **kw):
    cfg = config.resolve("colab-t4", stage, **kw)
    assert cfg["device"] == "cuda"
    return dict(cfg, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sft_then_dpo_on_the_gpu(bases, kbase, dtype, tmp_path):
    qa = generate.qa_pairs(kbase)[:40]
    cfg = _gpu_cfg("sft", dtype, max_steps=4, batch_size=4, grad_accum=1, seq_len=256)
    assert cfg["gradient_checkpointing"]
    model, tok = common.load_causal_lm(str(bases["qwen2"].path), dtype, "cuda")
    assert next(model.parameters()).dtype == common.torch_dtype(dtype)
    trainer = sft.make_trainer(model, tok, qa[:32], qa[32:], cfg, tmp_path / "sft")
    result = trainer.train()
    assert result.global_step == 4 and math.isfinite(result.training_loss)
    assert next(trainer.model.parameters()).device.type == "cuda"
    gens = common.generate(trainer.model, tok, [common.messages(r["question"]) for r in qa[:4]], max_new_tokens=8)
    assert len(gens) == 4 and all(isinstance(g["text"], str) for g in gens)
    saved = sft.save_adapter_and_merged(trainer, tok, tmp_path / "model", cfg)

    pairs = generate.preference_pairs(kbase, qa)[:24]
    dcfg = _gpu_cfg("dpo", dtype, max_steps=3, batch_size=2, grad_accum=1, seq_len=256)
    policy, ptok = common.load_causal_lm(str(saved["merged"]), dtype, "cuda")
    kept, skipped = dpo.validate_pairs(pairs, ptok, max_prompt_tokens=128)
    assert kept and not skipped
    dtrainer = dpo.make_trainer(policy, ptok, kept[:16], kept[16:], dcfg, tmp_path / "dpo")
    dresult = dtrainer.train()
    assert dresult.global_step == 3 and math.isfinite(dresult.training_loss)
    acc = dpo.preference_accuracy(dtrainer.model, ptok, kept[16:])
    assert acc["n"] == len(kept[16:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_qlora_trains_in_4bit_on_the_gpu(bases, kbase, dtype, tmp_path):
    import bitsandbytes as bnb

    rows = generate.mcqs(kbase)[:24]
    cfg = _gpu_cfg("qlora", dtype, max_steps=3, batch_size=4, grad_accum=1, seq_len=192)
    model, tok, model_type = qlora.load_base(str(bases["phi"].path), cfg, quantized=True)
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers and all(m.weight.device.type == "cuda" for m in layers)
    peft_model = qlora.add_lora(model, cfg["lora"], quantized=True, gradient_checkpointing=True)
    trainer = qlora.make_trainer(peft_model, tok, rows[:16], rows[16:], cfg, tmp_path / "qlora")
    # trl casts a 4-bit model's adapters to bf16; fp16's GradScaler needs them in fp32
    want = {torch.float32} if dtype == "float16" else {torch.bfloat16}
    assert {p.dtype for p in trainer.model.parameters() if p.requires_grad} == want
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reasoning_sft_without_unsloth_falls_back_to_transformers_on_the_gpu(bases, kbase, dtype, tmp_path):
    """The GPU profile asks for Unsloth; where it is not installed the same recipe runs through
    transformers + peft on the GPU, with bitsandbytes' 8-bit AdamW as FEMOZ uses."""
    cases = generate.cot_cases(kbase)[:12]
    cfg = _gpu_cfg("cot", dtype, max_steps=3, seq_len=512)
    assert cfg["use_unsloth"] and cfg["optim"] == "adamw_8bit"
    expected = "unsloth" if cot.unsloth_available(cfg) else "transformers"
    cfg["train_tokens"] = ["<think>", "</think>"]  # the tiny base never saw them (as on the tiny profile)
    model, tok, path = cot.load_for_training(str(bases["llama"].path), cfg)
    assert path == expected
    trainer = cot.make_trainer(model, tok, cases[:8], None, cfg, tmp_path / "cot")
    assert trainer.args.optim.value == "adamw_8bit"
    result = trainer.train()
    assert result.global_step == 3 and math.isfinite(result.training_loss)
    res = cot.evaluate(cot.prepare_inference(model, path), tok, cases[8:], kbase, max_new_tokens=16)
    assert res["n"] == 4
