"""medkit.evaluate.board: the logic of 08_benchmarking (retrieved PubMedQA context for the SFT + RAG
row, the benchmark tables, the leaderboard, the claims table, the ledger and the recorded keys).
No model is loaded: scorers and the encoder are stand-ins."""
import numpy as np
import pytest

from medkit.evaluate import bench, board, heldout


class BagEncoder:
    """A deterministic bag-of-words embedder (hashing), enough to make retrieval meaningful."""

    def encode(self, texts, batch_size=16, normalize_embeddings=True, show_progress_bar=False):
        out = np.zeros((len(texts), 64), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, sum(map(ord, w.strip(".,?"))) % 64] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


POOL = [{"id": "1", "question": "Does aspirin reduce stroke risk in atrial fibrillation?",
         "contexts": ["Aspirin and stroke prevention in atrial fibrillation patients was studied."], "final_decision": "yes"},
        {"id": "2", "question": "Is vitamin D linked to bone fractures in elderly women?",
         "contexts": ["Vitamin D levels and bone fractures among elderly women were measured."], "final_decision": "maybe"},
        {"id": "3", "question": "Does exercise lower blood pressure?",
         "contexts": ["Regular exercise lowered systolic blood pressure in adults."], "final_decision": "yes"}]


def test_pubmedqa_retrieved_replaces_each_context_with_what_the_retriever_found():
    rows, info = board.pubmedqa_retrieved(POOL[:2], POOL, BagEncoder(), k=1, log=lambda *a: None)
    assert info["pool"] == 3 and info["k"] == 1 and info["hit_at_1"] == 1.0
    assert [r["retrieved"] for r in rows] == [["1"], ["2"]]
    assert rows[0]["contexts"] == [POOL[0]["contexts"][0]] and rows[0]["final_decision"] == "yes"
    # a question whose words point at another abstract gets that abstract: retrieval can miss
    miss = [dict(POOL[0], question="Regular exercise and systolic blood pressure in adults")]
    rows, info = board.pubmedqa_retrieved(miss, POOL, BagEncoder(), k=1, log=lambda *a: None)
    assert rows[0]["retrieved"] == ["3"] and info["hit_at_1"] == 0.0


def test_pubmedqa_retrieved_counts_the_prompts_that_read_as_the_own_abstract():
    """Within the prompt's word cut, a retrieved context that starts with the item's own abstract
    and fills the cut is the gold prompt word for word; one that adds another abstract inside the
    cut, or misses, is not."""
    def same(rows, k, words):
        return board.pubmedqa_retrieved(rows, POOL, BagEncoder(), k=k, log=lambda *a: None, context_words=words)[1]["same_prompt"]
    assert same(POOL[:2], 1, 100) == 2  # the own abstract alone
    assert same(POOL[:2], 2, 100) == 0  # a second abstract inside the 100 words
    assert same(POOL[:2], 2, 5) == 2  # the own abstract fills the first 5 words
    miss = [dict(POOL[0], question="Regular exercise and systolic blood pressure in adults")]
    assert same(miss, 2, 5) == 0
    assert "same_prompt" not in board.pubmedqa_retrieved(POOL[:2], POOL, BagEncoder(), k=1, log=lambda *a: None)[1]


def test_pubmedqa_retrieved_names_items_missing_from_the_pool():
    with pytest.raises(ValueError, match="not in the retrieval pool"):
        board.pubmedqa_retrieved([dict(POOL[0], id="99")], POOL[1:], BagEncoder(), log=lambda *a: None)


def _fake_pubmedqa(calls):
    def score(scorer, rows, with_context, words=150, n_generate=0):
        calls.append((scorer, with_context, [tuple(r["contexts"]) for r in rows]))
        right = [r["final_decision"] == "yes" for r in rows] if scorer == "good" else [False] * len(rows)
        if rows and rows[0].get("retrieved"):
            right = [True] * len(rows)
        return {"n": len(rows), "acc_norm": sum(right) / len(rows), "correct_norm": right,
                "pred_dist": {"yes": 1.0, "no": 0.0, "maybe": 0.0}}
    return score


def test_the_sft_rag_pubmedqa_row_reads_the_retrieved_abstracts_not_its_own(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "score_pubmedqa", _fake_pubmedqa(calls))
    cfg = {"n_bench_generate": 0, "context_words": 50}
    retrieved = [dict(r, contexts=["something retrieved"], retrieved=["3"]) for r in POOL[:2]]
    b = board.score_benchmarks({"sft": "good"}, {"pubmedqa": POOL[:2]}, cfg, retrieved)
    assert calls[-1] == ("good", True, [("something retrieved",), ("something retrieved",)])
    assert b["pubmedqa_ctx"]["sft+rag"] is not b["pubmedqa_ctx"]["sft"]
    assert b["pubmedqa_ctx"]["sft"]["acc_norm"] == 0.5 and b["pubmedqa_ctx"]["sft+rag"]["acc_norm"] == 1.0
    # without retrieved rows there is no SFT + RAG PubMedQA figure at all
    assert "sft+rag" not in board.score_benchmarks({"sft": "good"}, {"pubmedqa": POOL[:2]}, cfg)["pubmedqa_ctx"]
    table = board.pubmedqa_table(b, n_boot=50, seed=0)
    assert table.loc["sft+rag", "context"] == "retrieved abstracts" and table.loc["sft+rag", "no context, LL"] == "n/a"


def test_the_sft_rag_row_takes_the_sft_log_likelihoods_on_retrieved_abstracts_and_generates_its_own(monkeypatch):
    """The SFT + RAG PubMedQA row and the SFT row of ``pubmedqa_retrieved`` are the same model on the
    same prompts: their log-likelihoods are scored once; the row's generations run on the
    retrieved abstracts."""
    calls, gens = [], []
    monkeypatch.setattr(bench, "score_pubmedqa", _fake_pubmedqa(calls))

    def generation(scorer, rows, with_context, words=150, n=0):
        gens.append((scorer, with_context, [tuple(r["contexts"]) for r in rows], n))
        return {"correct_gen": [True] * n, "acc_gen": 1.0, "format_rate_gen": 1.0, "n_gen": n}
    monkeypatch.setattr(bench, "pubmedqa_generation", generation)
    cfg = {"n_bench_generate": 1, "context_words": 50}
    retrieved = [dict(r, contexts=["something retrieved"], retrieved=["3"]) for r in POOL[:2]]
    b = board.score_benchmarks({"base": "bad", "sft": "good"}, {"pubmedqa": POOL[:2]}, cfg, retrieved)
    on_retrieved = [c for c in calls if c[2] == [("something retrieved",)] * 2]
    assert [c[0] for c in on_retrieved] == ["bad", "good"]  # each model once, none twice
    rag = b["pubmedqa_ctx"]["sft+rag"]
    assert rag["correct_norm"] == b["pubmedqa_retrieved"]["sft"]["correct_norm"] and rag["acc_gen"] == 1.0
    assert "acc_gen" not in b["pubmedqa_retrieved"]["sft"]  # the copy took the generations, not the SFT row
    assert gens == [("good", True, [("something retrieved",)] * 2, 1)]


def test_every_model_is_scored_on_the_retrieved_abstracts_and_recorded(monkeypatch):
    calls = []
    monkeypatch.setattr(bench, "score_pubmedqa", _fake_pubmedqa(calls))
    cfg = {"n_bench_generate": 0, "context_words": 50}
    retrieved = [dict(r, contexts=["something retrieved"], retrieved=["3"]) for r in POOL[:2]]
    b = board.score_benchmarks({"base": "bad", "sft": "good"}, {"pubmedqa": POOL[:2]}, cfg, retrieved)
    assert set(b["pubmedqa_retrieved"]) == {"base", "sft"}
    # the fake scorer answers right only when it reads retrieved rows: each model's row came from them
    assert b["pubmedqa_retrieved"]["base"]["acc_norm"] == 1.0 and b["pubmedqa"]["base"]["acc_norm"] == 0.0
    table = board.pubmedqa_table(b, n_boot=50, seed=0)
    assert table.loc["base", "retrieved abstracts, LL"].startswith("1.00")
    assert board.score_benchmarks({"sft": "good"}, {"pubmedqa": POOL[:2]}, cfg)["pubmedqa_retrieved"] == {}
    qa = {"base": {}, "sft": {}}
    lboard = board.leaderboard(qa, {}, b)
    keys = board.summary_metrics(lboard, qa, {}, b, {}, {}, [], [])
    assert keys["bench.pubmedqa_retrieved_acc_base"] == 1.0 and "bench.pubmedqa_retrieved_acc_sft" in keys


def _results():
    items = {"logp": [-1.0, -2.0, -3.0, -4.0], "tokens": [1, 1, 1, 1], "right": [1, 1, 0, 0]}
    qa = {"base": {"n": 4, "perplexity": 9.0, "token_accuracy": 0.5, "rougeL": 0.1, "bertscore_f1": 0.5, "mean_words": 9,
                   "verbose_share": 0.0, "items": items, "replies": [{"text": "a b"}, {"text": "x"}]},
          "sft": {"n": 4, "perplexity": 3.0, "token_accuracy": 0.7, "rougeL": 0.3, "bertscore_f1": 0.6, "mean_words": 7,
                  "verbose_share": 0.0, "items": items, "replies": [{"text": "a b"}, {"text": "c d"}]},
          "dpo": {"n": 4, "perplexity": 3.0, "rougeL": 0.35, "mean_words": 5, "items": items, "replies": [{"text": "a"}]},
          "sft+rag": {"n": 4, "perplexity": 2.5, "rougeL": 0.4, "items": items, "replies": [{"text": "a b"}]}}
    mc = {"base": {"acc_norm": 0.25, "correct_norm": [True, False, False, False]},
          "sft": {"acc_norm": 0.5, "correct_norm": [True, True, False, False], "acc_gen": 0.0, "format_rate_gen": 0.0}}
    b = {t: {} for t in board.BENCH_TABLES}
    b["pubmedqa"]["sft"] = {"acc_norm": 0.4, "correct_norm": [True, False]}
    b["pubmedqa_ctx"]["sft"] = {"acc_norm": 0.6, "correct_norm": [True, True]}
    b["pubmedqa_ctx"]["sft+rag"] = {"acc_norm": 0.5, "correct_norm": [True, False]}
    lat = {"sft": {"p50_ms": 5.0, "p95_ms": 9.0, "tokens_per_s": 100.0, "n": 3}}
    return qa, mc, b, lat


def test_leaderboard_claims_ledger_and_recorded_keys():
    qa, mc, b, lat = _results()
    lboard = board.leaderboard(qa, mc, b)
    assert lboard.loc["sft+rag", "PubMedQA+ctx acc"] == 0.5 and lboard.loc["sft", "PubMedQA+ctx acc"] == 0.6
    shown = board.board_display(lboard)
    assert shown.loc["base", "PubMedQA acc"] == "n/a" and "retrieved" in shown.loc["sft+rag", "notes"]
    claims = board.claims_table(qa, mc, b, lat, {"mcq": 4, "generate": 2, "pubmedqa": 2}, "CPU", "minilm", "tiny")
    text = " ".join(claims["this run"])
    assert "= 2.00× (n=4)" in text and "0.400 without context → 0.500 with retrieved abstracts → 0.600" in text
    assert "+250%" in text and set(claims["profile"]) == {"tiny"}
    led = board.ledger(lboard, mc, b, lat, {"n_boot": 50}, 0, "tiny", "CPU", {"qa_test": 4})
    assert "not medical advice" in led["notice"] and led["models"]["sft"]["latency_p95_ms"] == 9.0
    assert "pubmedqa_ctx_ci95" in led["models"]["sft+rag"]
    refs = ["a b", "c d", "e f", "g h"]
    m = board.summary_metrics(lboard, qa, mc, b, lat, {"bench.qa_n": 4}, [True, False, True, False], refs)
    assert m["bench.pubmedqa_rag_acc_sft_rag"] == 0.5 and m["bench.pubmedqa_rag_acc_sft"] == 0.6
    assert m["bench.qa_n_seen"] == 2 and m["bench.qa_n_unseen"] == 2 and m["bench.models_compared"] == 4
    # unseen items 1 and 3: logp -2 and -4 over 2 tokens → loss 3 → perplexity e^3
    assert m["bench.ppl_unseen_sft"] == pytest.approx(np.exp(3.0)) and m["bench.ppl_seen_sft"] == pytest.approx(np.exp(2.0))
    assert m["bench.rougeL_seen_sft"] == pytest.approx(1.0) and m["bench.rougeL_unseen_sft"] == pytest.approx(1.0)
    assert board.compare_with_previous(None, led) is None


def test_seen_unseen_models_table_has_counts():
    qa, *_ = _results()
    t = heldout.models_table(qa, [True, False, True, False], ["a b", "c d", "e f", "g h"])
    assert t.loc["sft", ("seen", "n")] == 2 and t.loc["sft", ("unseen", "n_gen")] == 1
    assert t.loc["dpo", ("unseen", "n_gen")] == 0


# ---------------------------------------------------------------- with a real (throwaway) tiny model

@pytest.fixture(scope="module")
def tiny_qwen(tmp_path_factory, kbase):
    from conftest import SMALL_TINY
    from medkit import config, tiny
    from medkit.data import generate

    texts = [p["text"] for p in generate.passages(kbase)][:300]
    small = dict(config.PROFILES["tiny"]["tiny"], **SMALL_TINY)
    return tiny.build_base("qwen2", texts, small, seed=0, cache=tmp_path_factory.mktemp("tiny"), progress=False)


@pytest.mark.slow
def test_board_end_to_end_with_a_tiny_model(tiny_qwen, kbase, shared_data):
    from medkit.data import generate, pipeline
    from medkit.evaluate import leaderboard as lb
    from medkit.train import common

    data = pipeline.build(kbase, seed=0)
    test = data.sets["qa"]["test"][:12]
    questions, refs = [r["question"] for r in test], [r["answer"] for r in test]
    seen = pipeline.seen_in_pretraining(refs, pipeline.pretraining_corpus(data))
    scorer = bench.load_scorer(tiny_qwen.path, "sft")
    qa = {"sft": lb.score_qa(scorer, questions, refs, common.SYSTEM_PROMPT, 4, "offline-minilm", 8)}
    split = heldout.split_result(qa["sft"], seen, refs)
    assert split["seen"]["n"] + split["unseen"]["n"] == 12
    # the per-group losses recombine into the overall one (token-weighted)
    tok = [sum(qa["sft"]["items"]["tokens"][i] for i, s in enumerate(seen) if s == g) for g in (True, False)]
    both = [split[g]["loss"] for g in ("seen", "unseen") if split[g]["n"]]
    if len(both) == 2:
        assert qa["sft"]["loss"] == pytest.approx((both[0] * tok[0] + both[1] * tok[1]) / sum(tok), rel=1e-6)
    # 02's path: the model and tokenizer directly, by group
    model, tk = tiny_qwen.load()
    direct = heldout.split_scores(model, tk, [common.messages(q) for q in questions], refs, seen)
    assert direct["unseen"]["n"] == split["unseen"]["n"]
    assert direct["unseen"]["loss"] == pytest.approx(split["unseen"]["loss"], rel=0.05)
    # 02 scores each item once (per_item) and splits those scores: the same figures as scoring each group
    once = common.completion_scores(model, tk, [common.messages(q) for q in questions], refs, per_item=True)
    split_once = heldout.split_result({"items": once["items"], "texts": []}, seen, refs)
    for g in ("seen", "unseen"):
        assert split_once[g]["n"] == direct[g]["n"]
        if direct[g]["n"]:
            assert split_once[g]["loss"] == pytest.approx(direct[g]["loss"], rel=1e-4)
            assert split_once[g]["token_accuracy"] == pytest.approx(direct[g]["token_accuracy"], abs=1e-6)
    pool = bench.load_pubmedqa(shared_data / "pubmedqa_pqal.jsonl", None)
    rows = bench.load_pubmedqa(shared_data / "pubmedqa_pqal.jsonl", "test", 6)
    rag_rows, info = board.pubmedqa_retrieved(rows, pool, BagEncoder(), k=2, log=lambda *a: None)
    assert info["pool"] == len(pool) >= 1000 and 0.0 <= info["hit_at_1"] <= info["hit_at_k"] <= 1.0
    cfg = {"n_bench_generate": 2, "context_words": 60}
    b = board.score_benchmarks({"sft": scorer}, {"pubmedqa": rows}, cfg, rag_rows)
    assert b["pubmedqa_ctx"]["sft+rag"]["n"] == 6 and b["pubmedqa_ctx"]["sft+rag"] is not b["pubmedqa_ctx"]["sft"]
    qa["sft+rag"] = qa["sft"]
    lboard = board.leaderboard(qa, {}, b)
    m = board.summary_metrics(lboard, qa, {}, b, {}, {}, seen, refs)
    assert {"bench.pubmedqa_rag_acc_sft_rag", "bench.ppl_unseen_sft", "bench.qa_n_unseen"} <= set(m)
    assert board.pubmedqa_table(b, 50, 0).loc["sft+rag", "context"] == "retrieved abstracts"


def test_the_base_row_follows_the_sft_stage_base_on_every_profile():
    from medkit import config

    assert board.model_sources("tiny:qwen2")["base"] == "tiny_qwen2"
    assert board.model_sources("smol:smollm2-135m")["base"] == "smol_smollm2-135m"
    assert board.model_sources("Qwen/Qwen2.5-0.5B-Instruct")["base"] == "hub:Qwen/Qwen2.5-0.5B-Instruct"
    for profile in config.PROFILES:
        assert board.model_sources(config.resolve(profile, "sft")["base_model"])["sft"] == "sft_model"
