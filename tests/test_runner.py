"""The papermill runner on small fixture notebooks (success, failure in cell 3, resume, compare)."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from medkit import nbtools, paths, run

pytestmark = pytest.mark.slow

RECORD = "from medkit import report\nreport.record({'demo.value': value, 'demo.profile': profile}, output_dir + '/' + NAME)"


def _fixture(folder, name, body, depends=None, value=1.0):
    cells = [("md", f"# {name}\n\nWhat you will learn: nothing.\n\n| profile | time |\n|---|---|\n| tiny | 1 s |"),
             ("code", nbtools.ENV_CELL),
             ("code", nbtools.params_cell(value=repr(value), NAME=repr(name)), ["parameters"])]
    cells += [("code", b) for b in body]
    cells += [("code", RECORD), ("md", "Next: more.")]
    path = nbtools.build(cells, folder / f"{name}.ipynb")
    if depends is not None:
        nb = json.loads(path.read_text())
        nb["metadata"]["medkit"] = {"depends": depends}
        path.write_text(json.dumps(nb))
    return path


def _run(nbdir, root, *args):
    cmd = [sys.executable, "-m", "medkit.run", "--notebooks-dir", str(nbdir), "--output-root", str(root), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, MEDKIT_OUTPUT_DIR=str(root)))


@pytest.fixture
def course(tmp_path):
    nbdir = tmp_path / "nbs"
    _fixture(nbdir, "01_ok", ["x = 1 + 1"], depends=[])
    _fixture(nbdir, "02_fails", ["raise ValueError('boom in cell three')", "a = 1"], depends=["01_ok"])
    _fixture(nbdir, "03_needs_02", ["pass"], depends=["02_fails"])
    _fixture(nbdir, "04_independent", ["pass"], depends=["01_ok"])
    return nbdir, tmp_path / "out"


def test_list(course):
    nbdir, root = course
    r = _run(nbdir, root, "--list")
    assert r.returncode == 0
    assert "02_fails" in r.stdout and "(needs 01_ok)" in r.stdout


def test_success_writes_summary_in_the_contract_shape(course):
    nbdir, root = course
    r = _run(nbdir, root, "--only", "01", "--run-id", "r1")
    assert r.returncode == 0, r.stdout + r.stderr
    summary = json.loads((root / "runs" / "r1" / "summary.json").read_text())
    assert set(summary) >= {"run_id", "profile", "total_seconds", "notebooks", "started", "machine_facts"}
    assert summary["machine_facts"]["cores"] >= 1 and "avx512" in summary["machine_facts"]
    nb = summary["notebooks"][0]
    assert set(nb) >= {"name", "status", "seconds", "peak_rss_mb", "metrics"}
    assert nb["status"] == "ok" and nb["metrics"]["demo.value"] == 1.0
    assert nb["metrics"]["demo.profile"] == "tiny"
    assert nb["peak_rss_mb"] > 10 and nb["seconds"] > 0
    folder = root / "runs" / "r1" / "01_ok"
    assert (folder / "01_ok.ipynb").exists() and (folder / "log.txt").exists()
    assert (root / "latest").resolve() == (root / "runs" / "r1").resolve()
    assert (root / "runs" / "r1" / "summary.md").read_text().startswith("# Run r1")


def test_failure_in_cell_3_names_it_keeps_partial_output_and_skips_dependents(course):
    nbdir, root = course
    r = _run(nbdir, root, "--run-id", "r2")
    assert r.returncode == 1
    out = r.stdout + r.stderr
    # code cells: environment (1), parameters (2), the raise (3); papermill's injected cell
    # is not counted, so the number matches what the learner sees in the committed notebook
    assert "02_fails failed at cell 3: ValueError: boom in cell three" in out
    summary = json.loads((root / "runs" / "r2" / "summary.json").read_text())
    status = {nb["name"]: nb["status"] for nb in summary["notebooks"]}
    assert status == {"01_ok": "ok", "02_fails": "failed", "03_needs_02": "skipped", "04_independent": "ok"}
    partial = json.loads((root / "runs" / "r2" / "02_fails" / "02_fails.ipynb").read_text())
    executed = [c for c in partial["cells"] if c["cell_type"] == "code" and c.get("outputs")]
    assert executed, "the partial executed notebook keeps the outputs it reached"


def test_resume_skips_what_is_done_and_reruns_what_changed(course):
    nbdir, root = course
    assert _run(nbdir, root, "--only", "01,04", "--run-id", "r3").returncode == 0
    first = json.loads((root / "runs" / "r3" / "summary.json").read_text())
    r = _run(nbdir, root, "--only", "01,04", "--resume")
    assert r.returncode == 0
    assert "01_ok (resumed: same inputs)" in r.stdout and "04_independent (resumed" in r.stdout
    # editing a notebook changes its inputs: it runs again, and so does what depends on it
    _fixture(nbdir, "01_ok", ["x = 2 + 2"], depends=[])
    r = _run(nbdir, root, "--only", "01,04", "--resume")
    assert "01_ok (resumed" not in r.stdout and "04_independent (resumed" not in r.stdout
    assert r.returncode == 0
    # the summary keeps the run's first start, adds up every invocation's time and says what each ran
    last = json.loads((root / "runs" / "r3" / "summary.json").read_text())
    calls = last["invocations"]
    assert last["started"] == first["started"] == calls[0]["started"] and len(calls) == 3
    assert [c["notebooks"] for c in calls] == [["01_ok", "04_independent"], [], ["01_ok", "04_independent"]]
    assert last["total_seconds"] == pytest.approx(sum(c["seconds"] for c in calls), abs=0.05)
    assert last["total_seconds"] > first["total_seconds"]


def test_a_killed_run_keeps_what_it_finished_and_resume_skips_it(tmp_path):
    """The runner itself is killed (SIGKILL, as a session stop or OOM would) during 02: the
    summary written after 01 survives, marked incomplete, and --resume reruns only 02."""
    nbdir = tmp_path / "nbs"
    _fixture(nbdir, "01_ok", ["x = 1"], depends=[])
    kill = ("import os, pathlib, psutil, signal\n"
            "if not pathlib.Path(output_dir, 'killed.once').exists():\n"
            "    pathlib.Path(output_dir, 'killed.once').touch()\n"
            "    os.kill(psutil.Process(os.getppid()).ppid(), signal.SIGKILL)  # papermill's parent: the runner")
    _fixture(nbdir, "02_kills_runner", [kill], depends=["01_ok"])
    root = tmp_path / "out"
    r = _run(nbdir, root, "--run-id", "k")
    assert r.returncode == -signal.SIGKILL, r.stdout + r.stderr
    summary = json.loads((root / "runs" / "k" / "summary.json").read_text())
    assert summary["complete"] is False
    assert [(nb["name"], nb["status"]) for nb in summary["notebooks"]] == [("01_ok", "ok")]
    r = _run(nbdir, root, "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "01_ok (resumed: same inputs)" in r.stdout and "02_kills_runner (resumed" not in r.stdout
    summary = json.loads((root / "runs" / "k" / "summary.json").read_text())
    assert summary["complete"] is True
    assert [nb["status"] for nb in summary["notebooks"]] == ["ok", "ok"]


def test_compare_flags_a_moved_metric(course, tmp_path):
    nbdir, root = course
    assert _run(nbdir, root, "--only", "01", "--run-id", "base").returncode == 0
    baseline = root / "runs" / "base" / "summary.json"
    _fixture(nbdir, "01_ok", ["pass"], depends=[], value=1.5)  # the metric moves by +50%
    r = _run(nbdir, root, "--only", "01", "--run-id", "new", "--compare", str(baseline))
    assert r.returncode == 3, r.stdout
    assert "demo.value" in r.stdout and "moved" in r.stdout
    moved = json.loads((root / "runs" / "new" / "compare.json").read_text())
    assert moved == [{"notebook": "01_ok", "metric": "demo.value", "old": 1.0, "new": 1.5, "why": "+0.5"}]
    # unchanged run: nothing flagged
    r = _run(nbdir, root, "--compare", str(root / "runs" / "new" / "summary.json"), "--no-run")
    assert r.returncode == 0 and "no metric moved" in r.stdout


def test_compare_tolerances_unit():
    old = {"notebooks": [{"name": "a", "status": "ok", "metrics": {"x": 1.0, "y": 100, "s": "cpu", "gone": 1}}]}
    new = {"notebooks": [{"name": "a", "status": "ok", "metrics": {"x": 1.015, "y": 120, "s": "gpu"}}]}
    moved = {m["metric"]: m["why"] for m in run.compare(old, new)}
    assert moved == {"y": "+20", "s": "changed", "gone": "missing"}


def test_timeout_is_reported(tmp_path):
    nbdir = tmp_path / "nbs"
    _fixture(nbdir, "01_slow", ["import time; time.sleep(120)"], depends=[])
    r = _run(nbdir, tmp_path / "out", "--timeout", "20", "--run-id", "t")
    assert r.returncode == 1
    assert "timed out after 20 s" in r.stdout
    # the cell that was running when the notebook was stopped is named (papermill marks it): the
    # environment and parameters cells are 1 and 2, the sleep is code cell 3
    assert "01_slow failed at cell 3: timed out" in r.stdout
    assert "this cell was still running" in r.stdout


def test_the_timeout_is_the_profiles_unless_given(monkeypatch, tmp_path):
    """A real-model profile gets a longer guard than tiny's 30 minutes (smol's 04 on an AVX2-only
    CPU ran past 30 minutes on one core); `--timeout` wins; a bad value is refused."""
    assert run.notebook_timeout("tiny") == 1800
    for profile in ("smol", "colab-t4", "gpu-24gb"):
        assert run.notebook_timeout(profile) > run.notebook_timeout("tiny"), profile
    assert run.notebook_timeout("smol", 60) == 60
    monkeypatch.setitem(run.config.PROFILES["tiny"], "notebook_timeout_s", 99)
    assert run.notebook_timeout("tiny") == 99
    with pytest.raises(ValueError, match="positive"):
        run.notebook_timeout("tiny", 0)
    # on the command line: refused before a run folder is made or `latest` moves
    _fixture(tmp_path / "nbs", "01_ok", ["x = 1"], depends=[])
    r = _run(tmp_path / "nbs", tmp_path / "out", "--timeout", "0")
    assert r.returncode == 2 and "--timeout must be a positive number" in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_artifact_names_the_notebook_to_run(out_root):
    from medkit import artifacts

    with pytest.raises(artifacts.MissingArtifact, match=r"Run 02_sft first, e.g. `python -m medkit.run --only 02`"):
        artifacts.get("sft_model")
    with pytest.raises(artifacts.MissingArtifact, match="No course notebook is registered"):
        artifacts.get("no_such_thing")


def test_jobs_run_independent_notebooks_side_by_side_and_keep_dependencies(tmp_path):
    """--jobs 2: a notebook starts only after its upstream finished; independent ones run at the
    same time (02 and 03 each wait for the other's flag, so run one after the other they would
    fail); a failure still skips its dependants; the summary keeps course order."""
    nbdir = tmp_path / "nbs"
    first = "import pathlib\nassert pathlib.Path(output_dir, 'a.done').exists()" 
    meet = ("import pathlib, time\npathlib.Path(output_dir, NAME + '.here').touch()\n"
            "other = pathlib.Path(output_dir, OTHER + '.here')\nend = time.time() + 120\n"
            "while not other.exists() and time.time() < end:\n    time.sleep(0.2)\n"
            "assert other.exists(), 'the other notebook did not run at the same time'")
    threads = ("import os, pathlib\npathlib.Path(output_dir, NAME + '.threads')"
               ".write_text(os.environ.get('OMP_NUM_THREADS', 'unset'))")
    _fixture(nbdir, "01_a", ["import pathlib, time\ntime.sleep(2)\npathlib.Path(output_dir, 'a.done').touch()", threads],
             depends=[])
    _fixture(nbdir, "02_b", [first, meet.replace("OTHER", "'03_c'"), threads], depends=["01_a"])
    _fixture(nbdir, "03_c", [first, meet.replace("OTHER", "'02_b'")], depends=["01_a"])
    _fixture(nbdir, "04_fails", ["raise ValueError('boom')"], depends=["01_a"])
    _fixture(nbdir, "05_needs_04", ["pass"], depends=["04_fails"])
    root = tmp_path / "out"
    r = _run(nbdir, root, "--jobs", "2", "--run-id", "j")
    assert r.returncode == 1, r.stdout + r.stderr
    summary = json.loads((root / "runs" / "j" / "summary.json").read_text())
    assert summary["jobs"] == 2
    assert [nb["name"] for nb in summary["notebooks"]] == ["01_a", "02_b", "03_c", "04_fails", "05_needs_04"], \
        r.stdout[-3000:] + r.stderr[-3000:]  # an incomplete summary: the runner's own output says why
    status = {nb["name"]: nb["status"] for nb in summary["notebooks"]}
    assert status == {"01_a": "ok", "02_b": "ok", "03_c": "ok", "04_fails": "failed", "05_needs_04": "skipped"}, \
        [nb.get("error") for nb in summary["notebooks"]]
    # 01 ran with nothing able to start beside it: every core (the runner set no cap); 02 shared
    out = root / "runs" / "j"
    assert (out / "01_a.threads").read_text() == os.environ.get("OMP_NUM_THREADS", "unset")
    assert (out / "02_b.threads").read_text() == str(max(1, (os.cpu_count() or 1) // 2))


def test_first_starts_a_ready_notebook_ahead_of_course_order(tmp_path):
    """--first 03: once 01 is done, 02 and 03 are both ready and 03 starts first; the summary keeps
    course order; an unknown name is refused before anything runs."""
    nbdir = tmp_path / "nbs"
    log = "import pathlib\nwith open(pathlib.Path(output_dir, 'order.txt'), 'a') as f:\n    f.write(NAME + '\\n')"
    _fixture(nbdir, "01_a", [log], depends=[])
    _fixture(nbdir, "02_b", [log], depends=["01_a"])
    _fixture(nbdir, "03_c", [log], depends=["01_a"])
    root = tmp_path / "out"
    r = _run(nbdir, root, "--jobs", "1", "--first", "03", "--run-id", "f")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert (root / "runs" / "f" / "order.txt").read_text().split() == ["01_a", "03_c", "02_b"]
    summary = json.loads((root / "runs" / "f" / "summary.json").read_text())
    assert [nb["name"] for nb in summary["notebooks"]] == ["01_a", "02_b", "03_c"]
    bad = _run(nbdir, root, "--first", "07_nope", "--run-id", "g")
    assert bad.returncode != 0 and "--first: unknown notebook(s) ['07_nope']" in bad.stderr
    assert not (root / "runs" / "g").exists()


def test_the_tiny_profile_starts_06_first_and_smol_keeps_course_order():
    assert run.start_first("tiny") == ["06_rag"] and run.start_first("smol") == []
    assert run.start_first("tiny", "02, 05_r1_cot_unsloth") == ["02", "05_r1_cot_unsloth"]
    assert run.start_first("tiny", "") == []  # --first '': course order
    notebooks = sorted((paths.repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    run.check_names(notebooks, run.start_first("tiny"), "--first")  # the profile names a real notebook


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="giving a core back needs two")
def test_a_capped_notebook_gets_the_idle_cores_when_its_partner_finishes(tmp_path):
    """--jobs 2: 02 and 03 start side by side on a share of the cores each; 03 ends first and
    nothing is left to start, so the runner gives 02 every core while it runs (its kernel's own
    torch thread count changes), and the summary records when."""
    nbdir = tmp_path / "nbs"
    wait_for_b = ("import pathlib, time\nend = time.time() + 120\n"
                  "while not pathlib.Path(output_dir, 'b.started').exists() and time.time() < end:\n    time.sleep(0.2)")
    follow = ("import pathlib, time, torch\nfrom medkit import notebook\nassert notebook.follow_thread_control()\n"
              "first = torch.get_num_threads()\npathlib.Path(output_dir, 'b.started').touch()\n"
              "end = time.time() + 120\nwhile torch.get_num_threads() == first and time.time() < end:\n"
              "    time.sleep(0.2)\npathlib.Path(output_dir, 'b.threads').write_text(f'{first} {torch.get_num_threads()}')")
    _fixture(nbdir, "01_a", ["x = 1"], depends=[])
    _fixture(nbdir, "02_b", [follow], depends=["01_a"])
    _fixture(nbdir, "03_c", [wait_for_b], depends=["01_a"])
    root = tmp_path / "out"
    r = _run(nbdir, root, "--jobs", "2", "--run-id", "g")
    assert r.returncode == 0, r.stdout + r.stderr
    out = root / "runs" / "g"
    cores = os.cpu_count()
    assert (out / "b.threads").read_text() == f"{cores // 2} {cores}"
    summary = {nb["name"]: nb for nb in json.loads((out / "summary.json").read_text())["notebooks"]}
    assert summary["02_b"]["threads"] == cores // 2
    [(after, n)] = summary["02_b"]["threads_later"]
    assert n == cores and 0 < after < summary["02_b"]["seconds"]
    assert "threads_later" not in summary["03_c"]
    assert not list(out.glob("*/threads.ctl*"))  # the control files go with the kernel


def test_profile_artifacts_add_dependencies():
    """06 and 07 write with 03's DPO model on smol and the GPU profiles (`artifact:dpo_model`), so
    --jobs must not start them beside 02; on tiny they answer without a model and need only 01."""
    nbdir = run.paths.repo_root() / "notebooks"
    rag, agent = nbdir / "06_rag.ipynb", nbdir / "07_agent.ipynb"
    assert run.depends_of(rag, "tiny") == ["01_data"]
    for profile in ("smol", "colab-t4", "gpu-24gb"):
        assert "03_dpo" in run.depends_of(rag, profile), profile
        assert "03_dpo" in run.depends_of(agent, profile), profile
    assert run.depends_of(nbdir / "04_qlora_phi2.ipynb", "smol") == ["01_data"]


def test_more_cores_for_a_notebook_that_has_not_started_yet_are_kept_for_it(tmp_path):
    """With --jobs, the runner may widen a notebook it has submitted before the notebook's worker
    has made its folder (its partner ended at that moment). That once raised FileNotFoundError
    and ended the whole run with a half-written summary; now the count waits in the folder for
    the kernel, and preparing the notebook does not delete it."""
    from medkit import run

    run_dir = tmp_path / "runs" / "j"
    run.fresh_control(run_dir, "04_x")  # what the runner does before it submits the notebook
    control = run.thread_control(run_dir, "04_x")
    assert run.set_threads(control, 2) is False  # no kernel yet to signal
    assert control.read_text() == "2\n"
    # a folder that does not exist yet either (a submission racing its worker)
    late = run.thread_control(run_dir, "05_y")
    assert run.set_threads(late, 2) is False and late.read_text() == "2\n"
    # an earlier attempt's files are stale before a new attempt starts
    run.fresh_control(run_dir, "05_y")
    assert not late.exists()


def test_two_runs_starting_at_once_never_leave_latest_missing(tmp_path):
    """Two invocations under one output root each point ``latest`` at their run when they start
    (two smol probes at once did: one died on a missing link). The link is replaced by a rename,
    so a reader always finds one of the runs and no temporary name is left behind."""
    import threading

    runs = [tmp_path / "runs" / name for name in ("a", "b")]
    for d in runs:
        d.mkdir(parents=True)
    resolved = [r.resolve() for r in runs]
    run._update_latest(runs[0])
    errors: list[str] = []

    def move_and_read(d):
        for _ in range(400):
            try:
                run._update_latest(d)
                got = run.latest_run(tmp_path)
            except OSError as e:
                errors.append(repr(e))
                continue
            if got not in resolved:
                errors.append(f"latest read as {got}")

    threads = [threading.Thread(target=move_and_read, args=(d,)) for d in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
    assert run.latest_run(tmp_path) in resolved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "runs"]


def _schedule_model():
    import importlib.util

    spec = importlib.util.spec_from_file_location("course_schedule", paths.repo_root() / "scripts" / "course_schedule.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_schedule_model_replays_the_runners_rules():
    """scripts/course_schedule.py (the what-if behind the smol note's estimates): two notebooks side
    by side share the cores, one alone runs `speedup` times faster, a notebook waits for what it
    depends on, and an exclusive one waits until nothing else runs and holds the machine."""
    m = _schedule_model()
    wall, ends = m.simulate({"a": 100, "b": 100}, {}, ["a", "b"], jobs=2, speedup=2.0, exclusive=frozenset())
    assert wall == 100 and ends == {"a": 100, "b": 100}
    # b needs a: a runs alone at twice its one-thread speed, then b alone
    wall, ends = m.simulate({"a": 100, "b": 100}, {"b": ["a"]}, ["a", "b"], speedup=2.0, exclusive=frozenset())
    assert ends == {"a": 50, "b": 100}
    # c is free to start at once but exclusive: it waits for a and b, and nothing starts beside it
    wall, ends = m.simulate({"a": 100, "b": 60, "c": 40, "d": 10}, {}, ["a", "b", "c", "d"], speedup=2.0,
                            exclusive=frozenset({"c"}))
    assert ends["b"] == 60 and ends["a"] == 80 and ends["c"] == 100 and ends["d"] == 105
    # the queue both start from: the named notebooks first, each group in course order
    nbs = [Path(n) for n in ("01_data", "02_sft", "06_rag", "08_benchmarking")]
    assert [p.name for p in run.start_order(nbs, ["8", "06"])] == ["06_rag", "08_benchmarking", "01_data", "02_sft"]
    assert run.start_order(nbs, []) == nbs
    # one-thread seconds: every core from the start, or the second core from 100 s on
    assert m.one_thread_seconds({"seconds": 50}, 1.7) == 85
    assert m.one_thread_seconds({"seconds": 300, "threads": 1, "threads_later": [[100, 2]]}, 1.5) == 400
    assert m.one_thread_seconds({"seconds": 300, "threads": 1}, 1.5) == 300
    # widened at 100 s, back to one thread at 200 s (a new partner started)
    assert m.one_thread_seconds({"seconds": 300, "threads": 1, "threads_later": [[100, 2], [200, 1]]}, 1.5) == 350
