"""08_benchmarking helpers: benchmark loaders (schemas, skips), scorers for decoder and
encoder-decoder folders, bootstrap intervals, citation support, the ledger and the CLI."""
import contextlib
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, SMALL_TINY
from medkit import config, run, tiny
from medkit.data import generate
from medkit.evaluate import bench, leaderboard as lb, mcq
from medkit.train import common

SMALL = dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY)


@pytest.fixture(scope="module")
def texts(kbase):
    return [p["text"] for p in generate.passages(kbase)][:400]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory, texts):
    return tiny.build_base("qwen2", texts, SMALL, seed=0, cache=tmp_path_factory.mktemp("tiny"), progress=False)


@pytest.fixture(scope="module")
def t5(tmp_path_factory, texts):
    return tiny.build_base("t5", texts, SMALL, seed=0, cache=tmp_path_factory.mktemp("tiny"), progress=False)


@pytest.fixture(scope="module")
def mcqs(kbase):
    return generate.mcqs(kbase)[:12]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ---------------------------------------------------------------- benchmark files

def test_pubmedqa_wrong_schema_names_row_and_field(tmp_path):
    good = {"id": "1", "question": "Q?", "contexts": ["c"], "final_decision": "yes", "split": "test"}
    f = _write(tmp_path / "p.jsonl", [good, {k: v for k, v in good.items() if k != "final_decision"} | {"id": "2"}])
    with pytest.raises(bench.BenchmarkError, match=r"pubmedqa row 1 \(id 2\): missing field 'final_decision'"):
        bench.load_pubmedqa(f)
    f = _write(tmp_path / "q.jsonl", [good | {"final_decision": "probably"}])
    with pytest.raises(bench.BenchmarkError, match="not yes/no/maybe"):
        bench.load_pubmedqa(f)


def test_mmlu_and_kqa_wrong_schema_name_the_field(tmp_path):
    f = _write(tmp_path / "m.jsonl", [{"id": "m1", "question": "Q", "choices": ["a", "b", "c", "d"]}])
    with pytest.raises(bench.BenchmarkError, match="missing field 'answer'"):
        bench.load_mmlu_medical(f)
    f = _write(tmp_path / "k.jsonl", [{"Question": "Q", "Must_have": []}])
    with pytest.raises(bench.BenchmarkError, match="missing field 'Must_have'"):
        bench.load_kqa(f)
    f = _write(tmp_path / "d.jsonl", [{"question": "Q", "opa": "a", "opb": "b", "opc": "c", "opd": "d"}])
    with pytest.raises(bench.BenchmarkError, match="missing field 'cop'"):
        bench.load_medmcqa(f)


def test_absent_benchmarks_skip_cleanly(tmp_path, monkeypatch):
    with pytest.raises(bench.BenchmarkMissing, match="no file"):
        bench.load_medmcqa(tmp_path / "medmcqa_dev.jsonl")
    with pytest.raises(bench.BenchmarkMissing, match="GPU profiles"):
        bench.load_medmcqa("openlifescienceai/medmcqa")  # a hub id without allow_hub
    monkeypatch.setenv("MEDKIT_SHARED_DATA", str(tmp_path / "nowhere"))
    assert bench.resolve_source("shared:kqa.jsonl") is None
    assert bench.resolve_source("shared:kqa.jsonl", tmp_path) == str(tmp_path / "kqa.jsonl")


def test_real_pubmedqa_test_split_and_mmlu_val(shared_data):
    rows = bench.load_pubmedqa(shared_data / "pubmedqa_pqal.jsonl", "test")
    assert len(rows) == 500 and all(r["contexts"] and r["final_decision"] in bench.PUBMEDQA_LABELS for r in rows)
    mm = bench.load_mmlu_medical(shared_data / "mmlu_medical_devval.jsonl", "val")
    assert len(mm) == 153 - 30 and mcq.validate(mm, "mmlu")


@pytest.mark.parametrize("text,want", [("Yes, because", "yes"), ("Answer: maybe.", "maybe"), ("no", "no"),
                                       ("It is yes", None), ("nothing", None), ("", None)])
def test_decision_extraction_is_strict(text, want):
    assert bench.extract_decision(text) == want


def test_mcq_options_and_the_whole_reply_score_in_one_pass_as_they_do_apart(qwen, mcqs):
    """04 scores each prompt's four options and its reference reply together: the same option
    picks and scores, and the same loss and token accuracy as ``completion_scores`` gives alone."""
    from medkit.train.common import load_causal_lm

    model, tok = load_causal_lm(str(qwen.path))
    targets = [mcq.target_text(r) for r in mcqs]
    apart = mcq.loglik_choices(model, tok, mcqs)
    together = mcq.loglik_choices(model, tok, mcqs, targets=targets)
    assert [r["pred"] for r in together] == [r["pred"] for r in apart]
    assert max(abs(a - b) for x, y in zip(apart, together) for a, b in zip(x["scores"], y["scores"])) < 1e-4
    ref = common.completion_scores(model, tok, mcq.prompts(mcqs), targets, per_item=True)
    got = mcq.target_figures(together)
    # the two runs batch differently: a near-tie may flip one top guess, no more
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-4)
    assert got["token_accuracy"] == pytest.approx(ref["token_accuracy"], abs=1.01 / sum(ref["items"]["tokens"]))
    assert got["perplexity"] == pytest.approx(ref["perplexity"], rel=1e-3)
    # item by item: each target was scored after its own row's prompt
    assert [r["target_tokens"] for r in together] == ref["items"]["tokens"]
    assert max(abs(r["target_logp"] - x) for r, x in zip(together, ref["items"]["logp"])) < 1e-3
    with pytest.raises(ValueError, match="targets"):
        mcq.loglik_choices(model, tok, mcqs, targets=targets[:-1])


# ---------------------------------------------------------------- scorers

def test_decoder_scorer_agrees_with_the_mcq_module(qwen, mcqs):
    s = bench.load_scorer(qwen.path, "qwen")
    assert s.kind == "causal" and not s.reasoning
    res = bench.score_mcq(s, mcqs, n_generate=4)
    ll = mcq.loglik_choices(s.model, s.tok, mcqs)
    assert res["correct_norm"] == [r["correct"] for r in ll]
    raw = mcq.loglik_choices(s.model, s.tok, mcqs, per_token=False)
    assert res["correct_raw"] == [r["correct"] for r in raw]
    assert res["n_gen"] == 4 and 0 <= res["format_rate_gen"] <= 1
    # the fast path (sorted, left-padded, head over the completion only) gives the training module's numbers
    qs, ans = [r["question"] for r in mcqs], [mcq.target_text(r) for r in mcqs]
    ref = common.completion_scores(s.model, s.tok, [common.messages(q) for q in qs], ans)
    sums, counts, right = s.loglik_detail(qs, ans, common.SYSTEM_PROMPT)
    assert abs(-sum(sums) / sum(counts) - ref["loss"]) < 1e-4
    assert abs(sum(right) / sum(counts) - ref["token_accuracy"]) < 1e-9


def _full_forward_logprobs(model, tok, prompts, completions):
    """The reference: every prompt + completion run in full, the log-probability, scored mask and
    top-1 hit of each completion token."""
    import torch

    x, attn, y = common.encode_completions(tok, prompts, completions, model.device)
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=attn).logits[:, :-1].float()
    target = y[:, 1:]
    mask = target != -100
    logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(mask, logp, torch.zeros_like(logp)), mask, (logits.argmax(-1) == target) & mask


def test_shared_prefix_scoring_matches_full_forward_and_runs_each_prompt_once(qwen, mcqs):
    """Options of the same question share one prompt pass; the numbers are those of running
    every prompt + option in full, whatever order the pairs come in."""
    s = bench.load_scorer(qwen.path, "qwen")
    rows = mcqs[:5]
    pairs = [(common.messages(mcq.question_text(r), mcq.MCQ_SYSTEM), mcq.answer_line(r, i))
             for i in range(4) for r in rows]  # interleaved: a prompt's options are not adjacent
    prompts, comps = [p for p, _ in pairs], [c for _, c in pairs]
    with _passes(s.model) as (prompt_passes, completion_passes):
        sums, counts, right = common.shared_prefix_logprobs(s.model, s.tok, prompts, comps, batch_size=8)
    logp, mask, ok = _full_forward_logprobs(s.model, s.tok, prompts, comps)
    assert counts == mask.sum(-1).tolist() and right == ok.sum(-1).tolist()
    assert max(abs(a - b) for a, b in zip(sums, logp.sum(-1).tolist())) < 1e-3
    # the prompt passes hold 5 rows in all, one per question; the option passes 20, at most 8 a pass
    assert sum(shape[0] for shape in prompt_passes) == len(rows)
    assert sum(shape[0] for shape in completion_passes) == len(pairs)
    assert all(shape[0] <= 8 and shape[1] <= max(counts) for shape in completion_passes)


@contextlib.contextmanager
def _passes(model):
    """The input shapes of the forward passes ``shared_prefix_logprobs`` makes: prompt passes
    (no cache given) and completion passes (a prompt's cache given)."""
    prompt_passes, completion_passes = [], []

    def record(module, args, kwargs):
        shape = tuple(kwargs["input_ids"].shape)
        (completion_passes if kwargs.get("past_key_values") is not None else prompt_passes).append(shape)

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        yield prompt_passes, completion_passes
    finally:
        hook.remove()


def test_shared_prefix_batches_completions_of_similar_length(qwen):
    """A short and a verbose answer to the same prompt (03's chosen and rejected) go to different
    batches: each batch is padded to its longest completion, so the padded positions stay close to
    the real ones. Batches that held whole prompt groups padded every short answer to the verbose
    one beside it (about twice the real positions here)."""
    s = bench.load_scorer(qwen.path, "qwen")
    questions = ["What causes asthma?", "What is anaemia?", "How is gout treated?", "What is a migraine?"]
    long = ("It is a long-term condition with several causes, and the answer goes on for a while "
            "about triggers, tests, treatment, follow-up and when to seek urgent care.")
    prompts = [common.messages(q) for q in questions for _ in range(2)]
    comps = [c for _ in questions for c in ("Yes.", long)]
    with _passes(s.model) as (_, completion_passes):
        sums, counts, _ = common.shared_prefix_logprobs(s.model, s.tok, prompts, comps, batch_size=4)
    padded = sum(rows * width for rows, width in completion_passes)
    assert sum(counts) <= padded <= 1.2 * sum(counts)
    full, _, _ = _full_forward_logprobs(s.model, s.tok, prompts, comps)
    assert max(abs(a - b) for a, b in zip(sums, full.sum(-1).tolist())) < 1e-3


def test_a_completion_batch_ends_where_the_length_more_than_doubles(qwen):
    """One prompt's short options and its long reference reply (04 scores both after the same
    prompt) go to separate batches even when one batch could hold them all: padding the options to
    the reply's width would run several times their real positions."""
    assert common._length_batches(list("abcdef"), [3, 3, 4, 7, 20, 21], 4) == [["a", "b", "c"], ["d"], ["e", "f"]]
    assert common._length_batches(list("abcde"), [5] * 5, 2) == [["a", "b"], ["c", "d"], ["e"]]
    s = bench.load_scorer(qwen.path, "qwen")
    long = ("It is a long-term condition with several causes, and the answer goes on for a while "
            "about triggers, tests, treatment, follow-up and when to seek urgent care.")
    prompts = [common.messages("What causes asthma?")] * 5
    comps = ["Answer: A", "Answer: B", "Answer: C", "Answer: D", long]
    with _passes(s.model) as (_, completion_passes):
        sums, counts, _ = common.shared_prefix_logprobs(s.model, s.tok, prompts, comps, batch_size=8)
    assert len(completion_passes) == 2 and sum(r * w for r, w in completion_passes) == sum(counts)
    full, _, _ = _full_forward_logprobs(s.model, s.tok, prompts, comps)
    assert max(abs(a - b) for a, b in zip(sums, full.sum(-1).tolist())) < 1e-3


def test_a_scorer_runs_each_prompt_and_completion_once(qwen):
    """08 scores PubMedQA with the own abstract and then with the retrieved ones, often the same
    prompt: a (prompt, completion) the Scorer already holds is not run again, and comes back with
    the numbers it had, in the caller's order; a new one beside it is run; a pair repeated
    within one call runs once."""
    s = bench.load_scorer(qwen.path, "qwen")
    users = ["Context: aspirin\n\nQuestion: does it help?"] * 3 + ["Question: is it safe?"] * 3
    comps = [f"Answer: {lab}" for lab in bench.PUBMEDQA_LABELS] * 2
    with _passes(s.model) as (prompt_passes, _):
        first = s.loglik_detail(users + users[:1], comps + comps[:1], bench.PUBMEDQA_SYSTEM, batch_size=12)
    assert sum(n for n, _ in prompt_passes) == 2 and s.reused == 1  # the repeated pair ran once
    assert [x[6] for x in first] == [x[0] for x in first]
    # known pairs first, the new context in the middle, a known pair again at the end
    changed = users[3:] + ["Context: ibuprofen\n\nQuestion: does it help?"] * 3 + users[4:5]
    with _passes(s.model) as (prompt_passes, _):
        again = s.loglik_detail(changed, comps[3:] + comps[:3] + comps[4:5], bench.PUBMEDQA_SYSTEM, batch_size=12)
    assert sum(n for n, _ in prompt_passes) == 1 and s.reused == 5  # the new prompt only
    assert [x[:3] for x in again] == [x[3:6] for x in first] and [x[6] for x in again] == [x[4] for x in first]
    assert again[0][3:6] != first[0][:3]  # the other context scores differently
    with _passes(s.model) as (prompt_passes, _):
        other_system = s.loglik_detail(users, comps, mcq.MCQ_SYSTEM, batch_size=12)
    assert sum(n for n, _ in prompt_passes) == 2  # another system prompt is another prompt
    assert other_system[0] != first[0][:6]


def test_seq2seq_loglik_matches_the_model_loss(t5):
    import torch

    s = bench.load_scorer(t5.path, "t5")
    assert s.kind == "seq2seq"
    q, a = "What are the symptoms of asthma?", "Wheeze and shortness of breath."
    sums, counts = s.loglik([q], [a], system="ignored")
    enc = s.tok([q], return_tensors="pt")
    lab = s.tok(text_target=[a], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = float(s.model(**enc, labels=lab).loss)
    assert abs(-sums[0] / counts[0] - loss) < 1e-4
    g = s.generate([q], "ignored", max_new_tokens=5)[0]
    assert g["new_tokens"] <= 5 and isinstance(g["text"], str)


def test_scorer_errors_name_the_folder(qwen, tmp_path):
    with pytest.raises(ValueError, match="no such model folder"):
        bench.load_scorer(tmp_path / "absent")
    folder = tmp_path / "no_tok"
    shutil.copytree(qwen.path, folder)
    for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.jinja",
              "special_tokens_map.json"):
        (folder / f).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no_tok: the model folder has no tokenizer"):
        bench.load_scorer(folder)


def test_latency_reports_every_request(qwen):
    s = bench.load_scorer(qwen.path)
    lat = s.latency(["What is asthma?", "What is gout?"], "sys", n=3, max_new_tokens=4)
    assert len(lat["times_ms"]) == 3 and lat["p50_ms"] <= lat["p95_ms"] and lat["tokens_per_s"] > 0


# ---------------------------------------------------------------- statistics, citations, ledger

def test_bootstrap_interval_holds_the_mean_and_narrows_with_n():
    small = [1, 0] * 20
    big = [1, 0] * 500
    lo, hi = lb.bootstrap_ci(small)
    assert lo < 0.5 < hi
    blo, bhi = lb.bootstrap_ci(big)
    assert blo < 0.5 < bhi and (bhi - blo) < (hi - lo) / 3
    assert lb.bootstrap_ci([1, 1, 1]) == (1.0, 1.0)


def test_citation_support_flags_a_claim_its_passage_does_not_hold():
    ev = {"E1": "Asthma causes wheeze, cough and shortness of breath.", "E2": "Gout is treated with colchicine."}
    ok = lb.citation_support("Asthma causes wheeze and cough [E1].", ev)
    assert ok == {"cited": 1, "unsupported": 0, "unknown": 0}
    bad = lb.citation_support("Asthma is cured by colchicine tablets daily [E1]. It spreads fast [E9].", ev)
    assert bad["cited"] == 2 and bad["unsupported"] == 2 and bad["unknown"] == 1


def test_failure_table_counts_patterns_with_fixes():
    replies = [{"text": "Please consult your doctor.", "stopped": True},
               {"text": " ".join(["word"] * 80), "stopped": False},
               {"text": "Wheeze and cough.", "stopped": True}]
    refs = ["Wheeze, cough and breathlessness."] * 3
    table = lb.failure_table({"m": {"qa": (replies, refs)}})
    counts = dict(zip(table["pattern"], table["count"]))
    assert counts["generic_non_answer"] == 1 and counts["verbose"] == 1 and counts["truncated"] == 1
    assert "empty" not in counts and table["suggested_fix"].str.len().min() > 10


def test_ledger_moves_are_flagged_by_the_runner_compare():
    old = {"models": {"sft": {"ROUGE-L": 0.20, "PubMedQA acc": 0.55, "notes": "x"}}}
    new = {"models": {"sft": {"ROUGE-L": 0.12, "PubMedQA acc": 0.56, "notes": "x"}}}
    moved = run.compare(lb.as_summary(old), lb.as_summary(new))
    assert [m["metric"] for m in moved] == ["sft.ROUGE-L"]


def test_must_have_coverage_counts_statements():
    must = ["Asthma causes wheeze", "Gout is treated with colchicine"]
    assert lb is not None and bench.must_have_coverage("Asthma causes wheeze at night.", must) == 0.5


# ---------------------------------------------------------------- the entry point

def _cli(*args):
    return subprocess.run([sys.executable, "-m", "medkit.evaluate", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO, timeout=300)


def test_cli_prints_json_and_rejects_bad_input(qwen, tmp_path):
    rows = [{"id": str(i), "question": f"Does drug {i} lower blood pressure?", "contexts": ["A trial found it did."],
             "final_decision": "yes" if i % 2 else "no", "split": "test"} for i in range(6)]
    good = _write(tmp_path / "pubmedqa.jsonl", rows)
    proc = _cli("--model", qwen.path, "--bench", "pubmedqa", "--data", good, "--with-context", "--generate", "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    assert out["n"] == 6 and 0 <= out["acc_norm"] <= 1 and len(out["ci95_norm"]) == 2
    assert out["with_context"] is True and "not medical advice" in out["notice"]
    bad = _write(tmp_path / "bad.jsonl", [{k: v for k, v in rows[0].items() if k != "contexts"}])
    proc = _cli("--model", qwen.path, "--bench", "pubmedqa", "--data", bad)
    assert proc.returncode == 2 and "missing field 'contexts'" in proc.stderr
    proc = _cli("--model", tmp_path, "--bench", "pubmedqa", "--data", good)
    assert proc.returncode == 2 and "not a model folder" in proc.stderr


def test_cache_rows_gives_each_batch_its_rows_and_leaves_the_chunk_cache_alone(qwen):
    """``common._cache_rows``: the rows asked for (repeats allowed) in a cache of their own; the
    chunk's cache keeps its tensors, so the next batch of the chunk reads the same prompts."""
    import torch

    s = bench.load_scorer(qwen.path, "qwen")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    with torch.no_grad():
        cache = s.model(input_ids=ids, use_cache=True).past_key_values
    before = [layer.keys.clone() for layer in cache.layers]
    sub = common._cache_rows(cache, torch.tensor([1, 1, 0]))
    assert torch.equal(sub.layers[0].keys[0], before[0][1]) and torch.equal(sub.layers[0].keys[2], before[0][0])
    with torch.no_grad():  # the batch's pass appends to its own cache only
        s.model(input_ids=torch.tensor([[3], [4], [5]]), past_key_values=sub, use_cache=True)
    assert sub.get_seq_length() == 5 and cache.get_seq_length() == 4
    assert all(torch.equal(layer.keys, b) for layer, b in zip(cache.layers, before))
