"""Tiny tokenizer, chat templates and tiny bases that really learn."""
import pytest
import torch

from medkit import config, kb as K, tiny
from medkit.data import generate

SMALL = dict(config.PROFILES["tiny"]["tiny"], vocab_size=1024, pretrain_steps=60, pretrain_seq_len=64,
             pretrain_batch=8, lr=5e-3, families={})


@pytest.fixture(scope="module")
def corpus():
    return [p["text"] for p in generate.passages(K.load())][:600]


@pytest.fixture(scope="module")
def raw_tok(corpus):
    return tiny.train_tokenizer(corpus, 1024)


def test_tokenizer_round_trips_and_keeps_special_tokens_atomic(raw_tok):
    tok = tiny.family_tokenizer(raw_tok, "qwen2")
    text = "Amoxicillin 500 mg every 8 hours; eGFR < 30 — caution."
    assert tok.decode(tok(text)["input_ids"]) == text
    for special in ("<|im_start|>", "<|im_end|>", "<think>", "</think>"):
        assert len(tok(special, add_special_tokens=False)["input_ids"]) == 1, special


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is asthma?"},
        {"role": "assistant", "content": "A chronic airway disease."}]


def test_chat_templates_of_each_family(raw_tok):
    qwen = tiny.family_tokenizer(raw_tok, "qwen2").apply_chat_template(MSGS, tokenize=False)
    assert qwen == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is asthma?<|im_end|>\n"
                    "<|im_start|>assistant\nA chronic airway disease.<|im_end|>\n")
    phi = tiny.family_tokenizer(raw_tok, "phi").apply_chat_template(MSGS[1:2], tokenize=False, add_generation_prompt=True)
    assert phi == "Instruct: What is asthma?\nOutput:"
    r1 = tiny.family_tokenizer(raw_tok, "llama").apply_chat_template(MSGS[1:2], tokenize=False, add_generation_prompt=True)
    assert r1 == "<｜begin▁of▁sentence｜><｜User｜>What is asthma?<｜Assistant｜><think>\n"


@pytest.mark.parametrize("family", ["qwen2", "phi", "llama"])
def test_assistant_mask_covers_only_the_answer(raw_tok, family):
    tok = tiny.family_tokenizer(raw_tok, family)
    out = tok.apply_chat_template(MSGS, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = out["input_ids"], out["assistant_masks"]
    masked = tok.decode([i for i, m in zip(ids, mask) if m])
    assert "A chronic airway disease." in masked and "asthma?" not in masked


@pytest.mark.slow
@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_tiny_base_held_out_loss_falls(tmp_path, corpus, family):
    base = tiny.build_base(family, corpus, SMALL, seed=0, cache=tmp_path, progress=False)
    m = base.metrics
    assert m["ppl_after"] < 0.5 * m["ppl_before"], m  # a random init sits near the vocabulary size
    model, tok = base.load()
    assert tok.chat_template or family == "t5"
    assert (base.path / "build.json").exists() and (base.path / "config_medkit.json").exists()


@pytest.mark.slow
def test_build_is_cached_and_deterministic(tmp_path, corpus):
    a = tiny.build_base("llama", corpus, SMALL, seed=0, cache=tmp_path / "a", progress=False)
    again = tiny.build_base("llama", corpus, SMALL, seed=0, cache=tmp_path / "a", progress=False)
    assert again.path == a.path and again.metrics == a.metrics  # cache hit: nothing retrained
    b = tiny.build_base("llama", corpus, SMALL, seed=0, cache=tmp_path / "b", progress=False)
    ma, _ = a.load()
    mb, _ = b.load()
    for (n, pa), (_, pb) in zip(ma.state_dict().items(), mb.state_dict().items()):
        assert torch.equal(pa, pb), n
    c = tiny.build_base("llama", corpus, dict(SMALL, lr=1e-3), seed=0, cache=tmp_path / "a", progress=False)
    assert c.path != a.path  # a changed config is a new key
    # a per-family change is a new key for that family only
    own = dict(SMALL, families={"llama": {"pretrain_steps": 40}})
    d = tiny.build_base("llama", corpus, own, seed=0, cache=tmp_path / "a", progress=False)
    assert d.path != a.path and d.metrics["steps"] == 40 and len(d.metrics["loss_curve"]) == 40


def test_family_settings_lay_one_familys_changes_over_the_shared_ones():
    block = dict(SMALL, families={"qwen2": {"pretrain_steps": 99}})
    shared = {k: v for k, v in SMALL.items() if k != "families"}
    assert tiny.family_settings(block, "qwen2") == dict(shared, pretrain_steps=99)
    assert tiny.family_settings(block, "phi") == shared
    # the shipped profile: longer pre-training for the Qwen2 (02/03) and the Llama (05) only
    shipped = config.PROFILES["tiny"]["tiny"]
    steps = {f: tiny.family_settings(shipped, f)["pretrain_steps"] for f in tiny.FAMILIES}
    assert steps["qwen2"] > steps["phi"] and steps["llama"] > steps["t5"]
    with pytest.raises(ValueError, match="tiny.families.llama: unknown setting"):
        tiny.family_settings(dict(SMALL, families={"llama": {"pretrain_stepz": 1}}), "llama")


def test_bad_arguments_are_clear():
    with pytest.raises(ValueError, match="unknown tiny family"):
        tiny.build_base("gpt5", ["x"], SMALL)
    with pytest.raises(ValueError, match="non-empty corpus"):
        tiny.build_base("qwen2", ["  "], SMALL)
    with pytest.raises(ValueError, match="unknown families"):
        tiny.build_all(["x"], SMALL, extra_texts={"gpt5": ["y"]})


def test_the_llama_alone_reads_the_training_reasoning_cases():
    from medkit.data import pipeline

    data = pipeline.build(K.load(), seed=0)
    extra = pipeline.reasoning_corpus(data)
    assert len(extra) == len(data.sets["cot"]["train"]) > 0
    held_out = {r["Complex_CoT"] for split in ("validation", "test") for r in data.sets["cot"][split]}
    assert held_out and not any(r.split("\n")[1] in held_out for r in extra)
    assert all("**Diagnosis:**" in t and "**Treatment Plan:**" in t for t in extra)
