"""04_qlora_phi2 and 05_r1_cot_unsloth: MCQ scoring, failure patterns, real 4-bit QLoRA on the
CPU, the <think> parser and the reasoning-SFT helpers."""
import json
import platform
import subprocess
import sys

import pytest

from conftest import SMALL_TINY
from medkit import config, tiny
from medkit.data import generate
from medkit.evaluate import errors, mcq
from medkit.train import common, cot, qlora

SMALL = dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY)


@pytest.fixture(scope="module")
def mcqs(kbase):
    return generate.mcqs(kbase)


@pytest.fixture(scope="module")
def phi(tmp_path_factory, kbase):
    texts = [p["text"] for p in generate.passages(kbase)][:400]
    return tiny.build_base("phi", texts, SMALL, seed=0, cache=tmp_path_factory.mktemp("tiny"), progress=False)


# ---------------------------------------------------------------- MCQ scoring

@pytest.mark.parametrize("text,letter", [
    ("Answer: B. Aspirin\nExplanation: ...", "B"), ("answer - c", "C"), ("**Answer:** D", "D"),
    ("A. Asthma", "A"), ("C) gout", "C"), ("The answer could be B or C", None), ("Answer: E", None),
    ("", None), ("Because B is right", None), ("Bronchitis", None),
])
def test_letter_extraction_is_strict(text, letter):
    assert mcq.extract_letter(text) == letter


def test_bad_mcq_rows_are_named(mcqs):
    rows = [dict(mcqs[0]), dict(mcqs[1], opc=""), dict(mcqs[2], cop=4)]
    with pytest.raises(ValueError) as exc:
        mcq.validate(rows, "mcq/test")
    msg = str(exc.value)
    assert f"mcq/test row 1 (id {mcqs[1]['id']}): field 'opc' is empty" in msg
    assert "row 2" in msg and "'cop'" in msg and "row 0" not in msg


def test_target_and_prompt_carry_letter_options_and_explanation(mcqs):
    r = mcqs[0]
    assert all(f"{L}. {r[f]}" in mcq.question_text(r) for L, f in zip("ABCD", mcq.OPTION_FIELDS))
    target = mcq.target_text(r)
    assert target.startswith(f"Answer: {'ABCD'[r['cop']]}. {r[mcq.OPTION_FIELDS[r['cop']]]}")
    assert target.endswith(r["exp"]) and mcq.explanation_of(target) == r["exp"]


@pytest.mark.shared_data
def test_mmlu_medical_converts_to_the_mcq_schema(shared_data):
    rows = [json.loads(line) for line in (shared_data / "mmlu_medical_devval.jsonl").read_text().splitlines() if line]
    converted = mcq.validate([mcq.from_mmlu(r) for r in rows], "mmlu")
    assert len(converted) == 153
    assert {r["cop"] for r in converted} == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="choices"):
        mcq.from_mmlu(dict(rows[0], choices=rows[0]["choices"][:3]))


def test_failure_patterns_are_labelled_and_counted(mcqs):
    r = dict(mcqs[0], cop=0)
    wrong_letter = "B" if mcq.extract_letter("B.") else None
    replies = [
        {"text": mcq.target_text(r), "stopped": True, "correct": True},
        {"text": f"Answer: {wrong_letter}. {r['opa']}", "stopped": True, "correct": False},
        {"text": "It may be several things, perhaps " + "the first one " * 30, "stopped": False, "correct": False},
    ]
    th = errors.verbose_threshold([r])
    assert errors.classify(r, replies[0], th) == []
    assert errors.classify(r, replies[1], th) == ["wrong_letter", "letter_option_mismatch"]
    assert set(errors.classify(r, replies[2], th)) == {"format_failure", "verbose", "hedging", "truncated", "repetition"}
    table = errors.pattern_table([r] * 3, replies).set_index("pattern")
    assert table.loc["format_failure", "count"] == 1
    assert table.loc["format_failure", "share_of_failures"] == 0.5
    assert table.loc["verbose", "share_of_replies"] == pytest.approx(1 / 3)
    assert set(table["suggested_fix"].str.len() > 10) == {True}


# ---------------------------------------------------------------- 4-bit QLoRA on the CPU

def test_phi_prompt_is_a_token_prefix_of_prompt_plus_answer(phi, mcqs):
    tok, _ = qlora._tokenizer(str(phi.path))
    p = mcq.prompts(mcqs[:1])[0]
    head = tok(tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    full = tok(tok.apply_chat_template(p + [{"role": "assistant", "content": mcq.target_text(mcqs[0])}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert full[: len(head)] == head


@pytest.mark.slow
def test_qlora_is_real_4bit_trains_and_merges(phi, mcqs, tmp_path):
    import bitsandbytes as bnb
    import torch

    cfg = config.resolve("tiny", "qlora", max_steps=4, batch_size=8)
    model, tok, model_type = qlora.load_base(str(phi.path), cfg, quantized=True)
    assert model_type == "phi"
    quantised = [n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert {n.rsplit(".", 1)[-1] for n in quantised} >= {"q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"}
    w4 = qlora.weight_footprint(model)
    w16 = qlora.weight_footprint(qlora.load_base(str(phi.path), dict(cfg, dtype="float16"), quantized=False)[0])
    assert w4["linear_mb"] <= 0.35 * w16["linear_mb"]  # NF4: half a byte per weight plus block constants
    peft_model = qlora.add_lora(model, cfg["lora"], quantized=True)
    share = qlora.trainable_share(peft_model)
    assert 0 < share["pct"] < 20 and share["total"] > share["trainable"]
    rows = mcqs[:8]
    # eval mode may repack the 4-bit weights into a CPU inference layout (bitsandbytes does it on
    # some CPUs, e.g. with AVX-512, and not on others); training needs the training layout back.
    before = mcq.loglik_choices(peft_model, tok, rows)
    qlora.training_layout(peft_model)  # the count restored depends on the CPU, not asserted
    assert not any(getattr(getattr(getattr(m, "weight", None), "quant_state", None), "packing_format_for_cpu", False)
                   for m in peft_model.modules())
    x, attn, y = common.encode_completions(tok, mcq.prompts(rows), [mcq.target_text(r) for r in rows])
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=5e-3)
    peft_model.train()
    losses = []
    for _ in range(8):
        loss = peft_model(input_ids=x, attention_mask=attn, labels=y).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    saved = qlora.save_merged(peft_model, tok, str(phi.path), cfg, tmp_path / "model")
    merged, mtok = common.load_causal_lm(str(saved["merged"]))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    peft_model.eval()
    with torch.no_grad():
        a = peft_model(input_ids=x, attention_mask=attn).logits
        b = merged(input_ids=x, attention_mask=attn).logits
    # same weights (dequantised NF4 + merged LoRA); only the 4-bit kernel's rounding differs
    assert torch.allclose(a, b, atol=0.05), float((a - b).abs().max())
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.98
    after = mcq.loglik_choices(merged, mtok, rows)
    assert [len(r["scores"]) for r in after] == [4] * len(rows) and len(before) == len(rows)


@pytest.mark.slow
def test_memory_is_measured_in_a_separate_process(phi, mcqs):
    cfg = config.resolve("tiny", "qlora")
    m4 = qlora.measure_training_memory(str(phi.path), cfg, mcqs[:4], quantized=True, steps=2)
    m32 = qlora.measure_training_memory(str(phi.path), cfg, mcqs[:4], quantized=False, steps=2)
    assert m4["weights_linear_mb"] < 0.2 * m32["weights_linear_mb"]  # vs fp32 on the CPU
    assert m4["train_peak_mb"] > 0 and m32["train_peak_mb"] > 0 and len(m4["losses"]) == 2
    if platform.libc_ver()[0] == "glibc":  # the fixed mmap threshold applied in the measuring process
        assert m4["allocator"] == m32["allocator"] == f"glibc, mmap threshold {qlora.MMAP_THRESHOLD >> 10} KB"


def test_fixed_mmap_threshold_returns_freed_blocks():
    """What the measuring process sets: after it, a freed 4 MB block leaves the process."""
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt is glibc's")
    code = ("import ctypes, sys, psutil\n"
            "from medkit.train import qlora\n"
            "fixed = sys.argv[1] == 'fixed'\n"
            "assert not fixed or qlora._return_large_blocks()\n"
            "libc, rss = ctypes.CDLL('libc.so.6'), lambda: psutil.Process().memory_info().rss\n"
            "libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]\n"
            "libc.free(libc.malloc(8 << 20))  # glibc's default raises its threshold to 8 MB here\n"
            "base = rss()\n"
            "blocks = [libc.malloc(4 << 20) for _ in range(16)]\n"
            "for b in blocks: ctypes.memset(b, 1, 4 << 20)\n"
            "for b in blocks[:-1]: libc.free(b)\n"
            "print((rss() - base) >> 20)\n")
    held = {mode: int(subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True,
                                     check=True).stdout.split()[-1]) for mode in ("fixed", "default")}
    assert held["fixed"] < 16 < 40 < held["default"], held  # one 4 MB block still held vs most of 64 MB


# ---------------------------------------------------------------- <think> parsing and CoT

def test_think_parser_handles_the_ways_replies_go_wrong():
    ok = cot.parse_reasoning("reasoning here\n</think>\n\n**Diagnosis:** Asthma\n\n**Treatment Plan:** inhaler")
    assert ok["well_formed"] and ok["reasoning"] == "reasoning here"
    assert ok["diagnosis"] == "Asthma" and ok["treatment_plan"] == "inhaler" and cot.format_ok(ok)
    explicit = cot.parse_reasoning("<think>r</think>**Diagnosis:** A **Treatment Plan:** B", prompt_opened=False)
    assert explicit["well_formed"] and explicit["diagnosis"] == "A" and explicit["treatment_plan"] == "B"
    unclosed = cot.parse_reasoning("still thinking **Diagnosis:** x")
    assert not unclosed["well_formed"] and "unclosed <think>" in unclosed["issues"] and unclosed["answer"] == ""
    missing = cot.parse_reasoning("**Diagnosis:** Gout **Treatment Plan:** rest", prompt_opened=False)
    assert missing["issues"] == ["no <think> block"] and missing["diagnosis"] == "Gout" and not cot.format_ok(missing)
    repeated = cot.parse_reasoning("a</think> b <think>c</think> **Diagnosis:** D **Treatment Plan:** T")
    assert {"repeated <think>", "repeated </think>"} <= set(repeated["issues"])
    assert repeated["reasoning"] == "a b c" and repeated["diagnosis"] == "D" and not repeated["well_formed"]
    no_sections = cot.parse_reasoning("r</think> probably a migraine")
    assert no_sections["well_formed"] and not cot.format_ok(no_sections)
    empty = cot.parse_reasoning("</think>**Diagnosis:** x **Treatment Plan:** y")
    assert "empty reasoning" in empty["issues"]
    assert cot.parse_reasoning("")["issues"] == ["unclosed <think>"]


def test_diagnosis_counts_name_synonym_or_lay_term(kbase):
    mi = kbase.conditions["myocardial_infarction"]
    assert cot.diagnosis_correct("Acute myocardial infarction (ICD-10 I21.9)", mi)
    assert cot.diagnosis_correct("STEMI", mi) and cot.diagnosis_correct("a heart attack", mi)
    assert not cot.diagnosis_correct("Stable angina", mi) and not cot.diagnosis_correct("", mi)


def test_icd10_counts_only_the_conditions_own_code(kbase):
    """The targets write "(ICD-10 <code>)" from the knowledge base; a right name with a made-up
    code (run smol-r15: sinusitis as N29.0) is not a right code."""
    mi = kbase.conditions["myocardial_infarction"]
    assert cot.icd10_correct(f"Acute myocardial infarction (ICD-10 {mi['icd10']})", mi)
    assert cot.icd10_correct(f"STEMI (icd10: {mi['icd10'].lower()})", mi)
    assert not cot.icd10_correct("Acute myocardial infarction (ICD-10 N29.0)", mi)
    assert not cot.icd10_correct(f"MI (ICD-10 {mi['icd10']}, or ICD-10 I20.0)", mi)  # two codes: not that one
    assert not cot.icd10_correct("Acute myocardial infarction", mi) and not cot.icd10_correct("", mi)
    aaa = kbase.conditions["abdominal_aortic_aneurysm"]
    assert aaa["first_line_treatment"][0].startswith("urgent")  # a case with pain is not for surveillance


def test_target_keeps_reasoning_and_prompt_renders_as_prefix(kbase):
    row = generate.cot_cases(kbase)[0]
    target = cot.training_target(row)
    assert target.startswith("<think>\n") and row["Complex_CoT"] in target and target.endswith(row["Response"])
    raw = tiny.train_tokenizer([row["Question"], row["Complex_CoT"], row["Response"]] * 3, vocab_size=600)
    tok = tiny.family_tokenizer(raw, "llama")
    p = cot.build_prompt(row["Question"])
    head = tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(p + [{"role": "assistant", "content": target}], tokenize=False)
    assert full.startswith(head) and head.endswith("<think>\n")
    parsed = cot.parse_reasoning(full[len(head):].replace("<｜end▁of▁sentence｜>", ""))
    assert cot.format_ok(parsed) and cot.diagnosis_correct(parsed["diagnosis"], kbase.conditions[row["condition_id"]])


def test_bad_cot_rows_are_named(kbase):
    rows = generate.cot_cases(kbase)[:3]
    rows[2] = dict(rows[2], Complex_CoT=" ")
    with pytest.raises(ValueError, match=r"cot/train row 2 \(id .*\): field 'Complex_CoT' is empty"):
        cot.validate(rows, "cot/train")


def test_case_generator_draws_new_vignettes_from_the_kb(kbase):
    cases = cot.generate_cases(kbase, 12, seed=3)
    assert len(cases) == 12 and all(c["condition_id"] in kbase.conditions for c in cases)
    assert all(c["source"] == "kb" and len(c["Question"]) > 40 for c in cases)
    assert cot.generate_cases(kbase, 12, seed=3) == cases
    assert len(cot.generate_cases(kbase, 12, seed=3, exclude={cases[0]["Question"].split(" What")[0]})) == 11


def test_unsloth_is_not_imported_without_a_gpu():
    import sys

    cfg = config.resolve("colab-t4", "cot")
    if cfg["device"] == "cpu":
        assert not cot.unsloth_available(cfg) and "unsloth" not in sys.modules
    assert not cot.unsloth_available(config.resolve("tiny", "cot"))
