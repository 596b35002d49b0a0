"""The results document (python -m medkit.report results) from a synthetic summary.json, and the
machine facts the runner records at the start of a run."""
import json
import subprocess
import sys

import pytest

from medkit import report, run


def _summary(**extra):
    s = {"run_id": "20261205-040000", "profile": "tiny", "total_seconds": 612.5, "started": "2026-12-05T04:00:00+00:00",
         "machine": "vm: 2 CPU, x86_64, Python 3.11.7",
         "machine_facts": {"cores": 2, "cpu_model": "Some CPU", "arch": "x86_64", "avx2": True, "avx512": False,
                           "load_avg_start": [1.5, 0.75, 0.25], "python": "3.11.7", "node": "vm"},
         "notebooks": [{"name": "01_data", "status": "ok", "seconds": 31.2, "peak_rss_mb": 900.5,
                        "metrics": {"data.passages": 412, "data.qa_test": 383}},
                       {"name": "02_sft", "status": "ok", "seconds": 95.0, "peak_rss_mb": 1400.0,
                        "metrics": {"sft.eval_loss_after_unseen": 1.23456789, "sft.n_test_unseen": 92}},
                       {"name": "03_dpo", "status": "failed", "seconds": 3.0, "peak_rss_mb": 200.0, "metrics": {},
                        "error": "03_dpo failed at cell 4: ValueError: boom"}]}
    s.update(extra)
    return s


def test_results_document_holds_every_figure_and_the_machine(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text(json.dumps(_summary()))
    out = report.write_results(tmp_path / "run", tmp_path / "RESULTS.md")
    text = out.read_text()
    for needle in ("20261205-040000", "2026-12-05T04:00:00+00:00", "`tiny`", "| cores | 2 |", "Some CPU",
                   "| AVX2 | yes |", "| AVX-512 | no |", "1.5, 0.75, 0.25", "[01_data](#01_data) | ok | 31.2 | 900.5 | 2 |",
                   "| `data.passages` | 412 |", "| `sft.eval_loss_after_unseen` | 1.235 |", "| `sft.n_test_unseen` | 92 |",
                   "03_dpo failed at cell 4", "No figures recorded (failed)."):
        assert needle in text, needle
    # figures follow the summary: change one and the document changes
    changed = _summary()
    changed["notebooks"][1]["metrics"]["sft.n_test_unseen"] = 7
    assert "| `sft.n_test_unseen` | 7 |" in report.results_markdown(changed)
    # a notebook run beside another (--jobs) says on how many threads; the others ran on every core
    side = _summary(jobs=2)
    side["notebooks"][1]["threads"] = 1
    text = report.results_markdown(side)
    assert "| [02_sft](#02_sft) | ok | 95 | 1400 | 2 | 1 |" in text and "| 900.5 | 2 | all cores |" in text
    assert "threads |" not in report.results_markdown(_summary())
    assert "on 1 core of 2 beside another notebook" in report.header_cell(side, "02_sft", "x")
    assert "beside" not in report.header_cell(side, "01_data", "x")
    # the runner gave it the idle core when its partner finished
    side["notebooks"][1]["threads_later"] = [[530.4, 2]]
    assert "| 1400 | 2 | 1, then 2 from 530 s |" in report.results_markdown(side)
    assert "on 1 core of 2 beside another notebook, 2 from minute 8.8" in report.header_cell(side, "02_sft", "x")


def test_an_old_summary_without_machine_facts_says_not_recorded():
    s = _summary()
    del s["machine_facts"], s["started"]
    text = report.results_markdown(s)
    assert "| AVX2 | not recorded |" in text and "| started (UTC) | not recorded |" in text


def test_bad_summaries_name_the_file_and_field(tmp_path):
    with pytest.raises(report.ResultsError, match="no such summary.json"):
        report.load_summary(tmp_path)
    bad = tmp_path / "summary.json"
    bad.write_text("{not json")
    with pytest.raises(report.ResultsError, match="summary.json: not valid JSON"):
        report.load_summary(bad)
    s = _summary()
    del s["notebooks"][1]["peak_rss_mb"]
    bad.write_text(json.dumps(s))
    with pytest.raises(report.ResultsError, match=r"notebooks\[1\] \(02_sft\): missing field `peak_rss_mb`"):
        report.load_summary(bad)


def test_cli_writes_the_document(tmp_path):
    (tmp_path / "summary.json").write_text(json.dumps(_summary()))
    r = subprocess.run([sys.executable, "-m", "medkit.report", "results", "--run", str(tmp_path / "summary.json"),
                        "--out", str(tmp_path / "docs" / "RESULTS.md")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "sft.eval_loss_after_unseen" in (tmp_path / "docs" / "RESULTS.md").read_text()
    r = subprocess.run([sys.executable, "-m", "medkit.report", "results", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "nope" in r.stderr


def test_machine_facts_read_cpu_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512bw\n\n"
                    "processor\t: 1\nmodel name\t: Test CPU 9000\nflags\t\t: fpu sse avx2 avx512f avx512bw\n")
    f = run.machine_facts(info)
    assert f["cpu_model"] == "Test CPU 9000" and f["avx2"] is True and f["avx512"] is True and f["cores"] >= 1
    info.write_text("model name\t: Old CPU\nflags\t\t: fpu sse sse2\n")
    f = run.machine_facts(info)
    assert f["avx2"] is False and f["avx512"] is False
    f = run.machine_facts(tmp_path / "absent")
    assert f["avx2"] is None and f["avx512"] is None  # unknown, not guessed
    assert f["load_avg_start"] is None or len(f["load_avg_start"]) == 3


def test_headers_write_the_profile_row_from_the_run_and_leave_the_rest(tmp_path):
    summary = {"run_id": "smol-x", "profile": "smol", "started": "2026-12-05T08:00:00+00:00",
               "machine_facts": {"cores": 2, "cpu_model": "Test CPU"},
               "notebooks": [{"name": "02_sft", "status": "ok", "seconds": 600.0, "peak_rss_mb": 3072.0, "metrics": {}},
                             {"name": "03_dpo", "status": "failed", "seconds": 5.0, "peak_rss_mb": 100.0, "metrics": {}}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    nbs = tmp_path / "nb"
    nbs.mkdir()
    head = ("# 02\n\n| profile | models | time | memory |\n| --- | --- | --- | --- |\n"
            "| `tiny` (2-core CPU) | tiny | minutes | small |\n| `smol` (2-core CPU) | SmolLM2 | to measure | to measure |\n")
    for name in ("02_sft", "03_dpo"):
        (nbs / f"{name}.ipynb").write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": [head]}]}))
    changed = report.write_headers(tmp_path, nbs)
    assert changed == [nbs / "02_sft.ipynb"]  # the failed notebook is left as it was
    text = "".join(json.loads((nbs / "02_sft.ipynb").read_text())["cells"][0]["source"])
    assert "| `smol` (2-core CPU) | SmolLM2 | 10.0 min (run `smol-x`, 2026-12-05, 2-core Test CPU) | peak RSS 3.0 GB |" in text
    assert "| `tiny` (2-core CPU) | tiny | minutes | small |" in text
    assert json.loads((nbs / "03_dpo.ipynb").read_text())["cells"][0]["source"] == [head]
    (nbs / "02_sft.ipynb").write_text(json.dumps({"cells": [{"cell_type": "markdown", "source": ["# no table\n"]}]}))
    with pytest.raises(report.ResultsError, match=r"02_sft.ipynb: no header row for profile `smol`"):
        report.write_headers(tmp_path, nbs)
