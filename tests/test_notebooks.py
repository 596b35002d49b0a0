"""Notebook conventions, and the course itself run end to end on the tiny profile."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from medkit import nbtools, paths

NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_there_are_course_notebooks():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_notebook_follows_the_conventions(nb):
    assert nbtools.check(nb) == []


def test_the_template_follows_the_conventions(tmp_path):
    path = nbtools.build(nbtools.template("99_example", "Example"), tmp_path / "99_example.ipynb")
    assert nbtools.check(path) == []


def test_checker_catches_outputs_and_a_missing_parameters_cell(tmp_path):
    path = nbtools.build([("md", "# T\n\nlearn\n\n| a |\n|---|"), ("code", nbtools.ENV_CELL),
                          ("code", "profile='tiny'"), ("code", "x = input('?')\nnote = 'a' if profile == 'tiny' else ''\nrecord(1)"),
                          ("md", "next")],
                         tmp_path / "t.ipynb")
    nb = json.loads(path.read_text())
    nb["cells"][1]["outputs"] = [{"output_type": "stream", "name": "stdout", "text": "hi"}]
    nb["cells"][1]["execution_count"] = 1
    path.write_text(json.dumps(nb))
    problems = "\n".join(nbtools.check(path))
    assert "has outputs" in problems and "execution count" in problems
    assert "tagged `parameters`" in problems and "input()" in problems
    # 02, 04 and 05 chose their model cards' last line this way until it became `model_card_note`
    assert "a branch on the profile's name" in problems
    assert nbtools.strip(path) and "has outputs" not in "\n".join(nbtools.check(path))


@pytest.fixture(scope="module")
def course_run(tmp_path_factory):
    """`python -m medkit.run` over every committed notebook, tiny profile, private output root.
    Two notebooks at a time where the dependencies allow (02 beside 04, 05, 06 ...; 09 alone), one
    compute thread each."""
    root = tmp_path_factory.mktemp("course")
    cmd = [sys.executable, "-m", "medkit.run", "--profile", "tiny", "--output-root", str(root), "--run-id", "ci",
           "--jobs", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3000,
                          env=dict(os.environ, MEDKIT_OUTPUT_DIR=str(root)))
    summary = json.loads((root / "runs" / "ci" / "summary.json").read_text())
    return proc, summary, root


@pytest.mark.slow
def test_every_notebook_runs_on_the_tiny_profile(course_run):
    proc, summary, _ = course_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert [nb["name"] for nb in summary["notebooks"]] == [p.stem for p in NOTEBOOKS]
    assert all(nb["status"] == "ok" for nb in summary["notebooks"])


class _Metrics(dict):
    """A notebook's metrics; a missing key fails the test naming the key and the notebook (no
    assert may skip silently because a metric was not recorded)."""

    def __missing__(self, key):
        pytest.fail(f"{self.notebook} did not record {key!r} (recorded: {sorted(self)})")


def _metrics(summary, name):
    m = _Metrics(next(nb["metrics"] for nb in summary["notebooks"] if nb["name"] == name))
    m.notebook = name
    return m


def _shared_data() -> bool:
    """../shared/data (the real public datasets) is beside the repository: then the notebooks
    must have recorded the real-data metrics, and their absence fails."""
    from medkit import paths

    return paths.shared_data_dir() is not None


@pytest.mark.slow
def test_01_data_metrics(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "01_data")
    assert m["data.passages"] >= 300 and m["data.qa_train"] >= 600 and m["data.mcq"] >= 200
    assert m["data.cot"] >= 200 and m["data.pref_pairs"] >= 400 and m["data.triage"] >= 300
    assert m["data.dialogues"] >= 60 and m["data.qa_test"] > 0
    assert m["data.leakage_pairs"] == 0
    assert m["tiny_base.ppl_after"] < 0.1 * m["tiny_base.ppl_before"]
    assert (root / "runs" / "ci" / "01_data" / "plots" / "lengths.png").exists()
    assert (root / "runs" / "ci" / "01_data" / "drop_report" / "dropped.jsonl").exists()


@pytest.mark.slow
def test_02_sft_changes_the_model_on_held_out_data(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "02_sft")
    # issue #4's target: held-out answer loss at most 0.7x the base's (0.669 over seeds 0-2, 2026-11-23)
    assert m["sft.eval_loss_after"] <= 0.7 * m["sft.eval_loss_before"]
    assert m["sft.template_ok_rate"] > m["sft.template_ok_before"] + 0.3
    assert m["sft.rougeL_after"] > m["sft.rougeL_before"]
    assert m["sft.bertscore_f1_after"] > m["sft.bertscore_f1_before"]  # README: 0.315 -> 0.413
    assert m["sft.token_acc_after"] > m["sft.token_acc_before"]
    # held-out answers that appear word for word in the pre-training text are counted apart: the
    # loss must also fall on the unseen ones
    assert m["sft.n_test_unseen"] > 0 and m["sft.n_test_seen"] >= 0
    assert m["sft.eval_loss_after_unseen"] < m["sft.eval_loss_before_unseen"]
    assert m["sft.padding_waste"] < m["sft.padding_waste_random"]
    assert m["t5.eval_loss"] < m["t5.eval_loss_before"]
    merged = root / "runs" / "ci" / "02_sft" / "model" / "merged"
    assert (merged / "README.md").exists() and (merged / "medkit_config.json").exists()
    assert (root / "runs" / "ci" / "02_sft" / "model" / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_03_dpo_moves_preferences(course_run):
    _, summary, _ = course_run
    m = _metrics(summary, "03_dpo")
    assert m["dpo.pref_acc_before"] == 0.0  # policy == reference before training: every margin is 0
    assert m["dpo.pref_acc_after"] >= 0.9
    assert m["dpo.loglik_pref_after"] > m["dpo.loglik_pref_before"]
    assert m["dpo.loglik_pref_unsafe_after"] > m["dpo.loglik_pref_unsafe_before"]


def _need(m, *keys):
    """The metrics, failing with the names of any that were not recorded (no silent skip)."""
    missing = [k for k in keys if k not in m]
    assert not missing, f"not recorded: {missing}"
    return [m[k] for k in keys]


# 06 scores MedQuAD only where the shared data sets are (../shared/data or MEDKIT_SHARED_DATA);
# where they are absent it must still run, and must not record MedQuAD figures
SHARED_MEDQUAD = (paths.shared_data_dir() or REPO / "no-shared-data") / "medquad.jsonl"
LSO_KEYS = ("rag.medquad_lso_recall5_dense", "rag.medquad_lso_recall5_hybrid", "rag.medquad_lso_recall5_rerank",
            "rag.medquad_lso_recall1_dense", "rag.medquad_lso_recall1_rerank", "rag.medquad_lso_folds",
            "rag.medquad_lso_queries", "rag.medquad_lso_hybrid_minus_dense_recall5_min")


@pytest.mark.slow
def test_06_rag_retrieval_is_measured(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "06_rag")
    bm25, dense, hybrid = _need(m, "rag.recall5_bm25", "rag.recall5_dense", "rag.recall5_hybrid")
    assert hybrid >= max(bm25, dense)  # the fused retriever is not worse than either member
    assert bm25 > 0.5 and dense > 0.5
    assert m["rag.query_p95_ms"] > 0 and m["rag.build_docs_per_s"] > 0
    assert (root / "runs" / "ci" / "06_rag" / "chroma").is_dir()
    # the reranker trained here must help where the hybrid is weak: the first place
    assert m["rag.reranker_loss_last"] < m["rag.reranker_loss_first"]
    assert m["rag.mrr10_rerank"] > m["rag.mrr10_hybrid"] and m["rag.recall1_rerank"] > m["rag.recall1_hybrid"]
    assert m["rag.reload_reused"] == 1  # reopening found the stored vectors and embedded nothing again


@pytest.mark.slow
def test_06_rag_answers_cite_and_abstain_on_off_topic_questions(course_run):
    _, summary, _ = course_run
    m = _metrics(summary, "06_rag")
    valid, offtopic = _need(m, "rag.citation_valid_rate", "rag.abstain_rate_offtopic")
    assert valid == 1.0  # over the answers given; abstentions are counted apart, never as valid
    assert offtopic >= 0.8


@pytest.mark.slow
def test_06_rag_rarely_abstains_on_answerable_questions(course_run):
    _, summary, _ = course_run
    answerable, min_score = _need(_metrics(summary, "06_rag"), "rag.abstain_rate_answerable", "rag.min_score")
    # issue #17's target. The threshold is calibrated on training questions vs off-topic calibration
    # questions (0.02 at a calibrated 0.275 on 2026-12-05; the guessed 0.5 abstained on 0.267)
    assert answerable <= 0.10  # an assistant that always abstained would fail here
    assert min_score > 0


@pytest.mark.slow
def test_06_medquad_leave_one_source_out(course_run):
    _, summary, _ = course_run
    m = _metrics(summary, "06_rag")
    if not SHARED_MEDQUAD.exists():
        assert not [k for k in m if k.startswith("rag.medquad")], "MedQuAD figures recorded without the data"
        pytest.skip(f"{SHARED_MEDQUAD} absent: 06 ran without MedQuAD")
    dense5, hybrid5, _, _, _, folds, queries, worst = _need(m, *LSO_KEYS)
    assert folds == 7 and queries >= 1000
    # hybrid recall@5 is not below dense on any held-out source, give or take one question of the
    # smallest fold (NHLBI, 153): the int8 MiniLM rounds differently across CPUs. On the Xeon no fold
    # lost; on the AMD EPYC of 2026-12-05 (seventh session) NINDS lost 1 of its 227 questions (-0.0044)
    assert worst >= -1 / 153
    assert hybrid5 >= dense5


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="06 on tiny runs the per-fold query adapter on 1,500 answers, which does not "
                   "raise recall@1 over dense (0.801 vs 0.804 with page titles, 2026-12-06; recall@5 0.984). Issue #19's "
                   "targets are met on the full file by the evaluation command's per-fold MiniLM reranker (recall@5 "
                   "0.969, recall@1 0.765 vs dense 0.631), and on these 1,500 answers by the same reranker at 10 steps "
                   "(recall@1 0.861 vs 0.805), which costs 06 about 140 s more on 2 cores than CI's budget allows: "
                   "docs/notes/2026-12-05-retrieval-lso.md. Remove this mark when a run meets them")
def test_06_medquad_reranker_targets(course_run):
    _, summary, _ = course_run
    m = _metrics(summary, "06_rag")
    if not SHARED_MEDQUAD.exists():
        pytest.skip(f"{SHARED_MEDQUAD} absent")
    rerank5, rerank1, dense1 = _need(m, "rag.medquad_lso_recall5_rerank", "rag.medquad_lso_recall1_rerank",
                                     "rag.medquad_lso_recall1_dense")
    assert rerank5 >= 0.85 and rerank1 >= dense1 + 0.05


@pytest.mark.slow
def test_07_agent_metrics(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "07_agent")
    assert m["agent.scenarios"] >= 60
    assert m["agent.intercept_rate"] == 1.0 and m["agent.emergency_recall"] >= 0.98
    assert m["agent.false_alarm_rate"] <= 0.10 and m["agent.memory_recall"] == 1.0
    assert m["agent.tool_success"] >= 0.9 and m["agent.notice_rate"] == 1.0
    if _shared_data():  # CRESCENDDI is read from ../shared/data
        assert m["safety.ddi_recall_crescenddi"] >= 0.9 and m["safety.ddi_fp_crescenddi"] <= 0.05
        assert m["safety.ddi_pairs_covered"] > 300
    assert (root / "runs" / "ci" / "07_agent" / "agent.sqlite").exists()


@pytest.mark.slow
def test_07_agent_chat_widget_in_a_real_browser(course_run, tmp_path):
    """JupyterLab + Debian chromium via Playwright: run 07, type into the widget, read the reply."""
    import agent_browser

    reason = agent_browser.skip_reason()
    if reason:
        pytest.skip(reason)
    _, _, root = course_run
    shot = REPO / "outputs" / "agent_browser.png"
    seen = agent_browser.chat_in_jupyterlab(REPO / "notebooks" / "07_agent.ipynb", root, shot, tmp_path / "lab")
    assert agent_browser.MESSAGE in seen["conversation"] and seen["input_after"] == ""
    assert seen["badge"].startswith("Triage ") and seen["badge"].split()[1] in ("LOW", "MEDIUM", "HIGH")
    assert "[E1]" in seen["sources"] and "not medical advice" in seen["conversation"]
    assert "Do not take phenoxymethylpenicillin" in seen["conversation"]  # the allergy was intercepted
    assert shot.exists() and shot.stat().st_size > 10_000


@pytest.mark.slow
def test_09_serving_is_measured_against_a_real_vllm_server(course_run):
    _, summary, root = course_run
    nb = next(n for n in summary["notebooks"] if n["name"] == "09_vllm_serving")
    m = nb["metrics"]
    # f32: llama.cpp == transformers, token for token; f16 and q8_0: same prompt ids, every
    # top-token disagreement a measured near-tie, logits within gguf_export.LOGIT_TOL
    assert m["serve.gguf_f32_exact"] == 1
    assert m["serve.gguf_parity"] == 1 and m["serve.gguf_q8_parity"] == 1
    assert m["serve.errors"] == 0
    assert m["serve.bad_input_4xx"] == 1.0 and m["serve.replica_ok"] == 1
    assert m["serve.bench_params"] > 10_000_000  # tens of millions, not the tiny SFT model
    # the target is 5x; on a quiet 2-core machine 9.9-17.3x over five runs (2026-11-23),
    # and the numbers move by +-30% on a shared machine: the assert holds a floor of 3x, the
    # benchmark prints the real ratio
    assert m["serve.ratio_vllm_vs_hf_naive_c32"] >= 3
    assert m["serve.ttft_p95_ms_c32"] > 0 and m["serve.vllm_startup_s"] > 0
    assert (root / "runs" / "ci" / "09_vllm_serving" / "plots" / "load_benchmark.png").exists()


@pytest.mark.slow
def test_04_qlora_is_4bit_and_moves_mcq_answers(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "04_qlora_phi2")
    assert m["qlora.weight_ratio_4bit_16bit"] <= 0.35  # NF4 layers vs the same layers in 16-bit
    assert 0 < m["qlora.trainable_pct"] < 20
    assert m["qlora.peak_mem_mb_4bit"] > 0 and m["qlora.peak_mem_mb_16bit"] > 0
    assert m["qlora.hpo_trials"] >= 4
    assert m["qlora.answer_loss_after"] < 0.8 * m["qlora.answer_loss_before"]
    assert m["qlora.eval_loss_last"] < m["qlora.eval_loss_first"]
    assert m["qlora.letter_rate_after"] > m["qlora.letter_rate_before"] + 0.2
    assert m["qlora.mcq_acc_after"] > m["qlora.mcq_acc_before"]
    assert abs(m["qlora.merged_mcq_acc_ll"] - m["qlora.mcq_acc_ll_after"]) <= 0.05  # merge kept the model
    # the profile's count of timed requests (eval.n_latency, the one 08 uses too)
    from medkit import config

    assert m["qlora.latency_n"] == config.PROFILES[summary["profile"]]["stages"]["eval"]["n_latency"] >= 10
    assert m["qlora.latency_p95_ms"] >= m["qlora.latency_p50_ms"] > 0
    run = root / "runs" / "ci" / "04_qlora_phi2" / "model"
    assert (run / "merged" / "README.md").exists() and (run / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_05_cot_learns_the_reasoning_format(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "05_r1_cot_unsloth")
    assert m["cot.path"] == "transformers"  # no GPU in CI: Unsloth must not be imported
    # the base has read the training reasoning cases (01_data), so the held-out loss starts lower
    # and falls less: 2.45 -> 1.97 in run s13 (2026-11-23)
    assert m["cot.eval_loss_after"] < m["cot.eval_loss_before"] - 0.2
    assert m["cot.think_rate_after"] >= m["cot.think_rate_before"] + 0.5  # it learns to close <think>
    # issue #5's target; 0 -> 1.0 in run s13 (0.97-1.0 over training seeds 0-5)
    assert m["cot.format_ok_before"] < 0.5 and m["cot.format_ok_after"] >= 0.9
    assert (root / "runs" / "ci" / "05_r1_cot_unsloth" / "merged" / "config.json").exists()


@pytest.mark.slow
def test_08_benchmarking_compares_the_course_models(course_run):
    _, summary, root = course_run
    m = _metrics(summary, "08_benchmarking")
    assert m["bench.models_compared"] >= 6
    # training changed the model on held-out QA it never saw: SFT beats the base it started from
    assert m["bench.ppl_sft"] < 0.7 * m["bench.ppl_base"]
    assert m["bench.rougeL_sft"] > m["bench.rougeL_base"]
    # MCQ-trained QLoRA opens with a strict answer letter far more often than the QA-only SFT model
    assert m["bench.mcq_format_rate_qlora"] > m["bench.mcq_format_rate_sft"] + 0.1
    assert m["bench.bertscore_f1_sft"] > m["bench.bertscore_f1_base"]
    if _shared_data():  # the real benchmarks must have run
        assert m["bench.pubmedqa_n"] >= 100 and m["bench.mmlu_n"] >= 100
        # scores of tiny models on real benchmarks sit near chance: the README reports them and
        # the assert holds only that each was computed over the items
        for key in ("pubmedqa_acc_sft", "mmlu_med_acc_sft", "pubmedqa_rag_acc_sft_rag"):
            assert 0.0 <= m[f"bench.{key}"] <= 1.0, key
        # SFT + RAG reads abstracts that 06's retriever found among all PQA-L abstracts: the
        # retriever must find the item's own abstract for most questions
        assert m["bench.pubmedqa_retrieval_hit1"] >= 0.8
    else:
        assert m["bench.pubmedqa_n"] == 0 and "pubmedqa" in m["bench.skipped"]
    assert m["bench.latency_p95_ms_sft"] >= m["bench.latency_p50_ms_sft"] > 0
    ledger = json.loads((root / "runs" / "ci" / "08_benchmarking" / "leaderboard.json").read_text())
    assert "not medical advice" in ledger["notice"] and ledger["hardware"]
    assert {"base", "sft", "dpo", "t5", "qlora", "cot", "sft+rag"} <= set(ledger["models"])
    assert (root / "runs" / "ci" / "08_benchmarking" / "plots" / "leaderboard.png").exists()
