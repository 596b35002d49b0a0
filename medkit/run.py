"""The course runner: execute the notebooks in order with papermill and summarise the run.

    python -m medkit.run                      # every notebook, tiny profile
    python -m medkit.run --only 02,03         # a subset (by number prefix or name)
    python -m medkit.run --from 04 --resume   # continue the latest run, skipping finished work
    python -m medkit.run --compare old/summary.json   # run, then flag metrics that moved
    python -m medkit.run --compare old/summary.json --no-run   # compare the latest run only
    python -m medkit.run --jobs 2             # independent notebooks side by side (the test suite)

Per notebook it writes ``outputs/runs/<run-id>/<name>/``: the executed copy, ``log.txt``,
``metrics.json``; and for the run ``summary.json``, ``summary.md`` and the ``outputs/latest`` link.
"""
from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import artifacts, config, paths, report
from .notebook import THREAD_CONTROL_ENV, thread_control_pid

# What each course notebook needs to have run first (a notebook may also declare
# ``metadata.medkit.depends`` itself; fixture notebooks in tests do).
DEPENDS = {
    "02_sft": ["01_data"],
    "03_dpo": ["02_sft"],
    "04_qlora_phi2": ["01_data"],
    "05_r1_cot_unsloth": ["01_data"],
    "06_rag": ["01_data"],
    "07_agent": ["01_data", "06_rag"],
    "08_benchmarking": ["02_sft", "03_dpo", "04_qlora_phi2", "05_r1_cot_unsloth", "06_rag"],
    "09_vllm_serving": ["02_sft", "07_agent"],
}

# Notebooks that measure speed under load and must have the machine to themselves, whatever --jobs.
EXCLUSIVE = {"09_vllm_serving"}


@dataclass
class Result:
    name: str
    status: str  # ok | failed | skipped
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    resumed: bool = False
    threads: int | None = None  # the compute threads it was capped at beside other notebooks; None: every core
    threads_later: list[list[float]] | None = None  # [[seconds after its start, threads], ...]: cores given back

    def as_summary(self) -> dict[str, Any]:
        out = {"name": self.name, "status": self.status, "seconds": round(self.seconds, 2),
               "peak_rss_mb": round(self.peak_rss_mb, 1), "metrics": self.metrics}
        if self.threads:
            out["threads"] = self.threads
        if self.threads_later:
            out["threads_later"] = self.threads_later
        if self.error:
            out["error"] = self.error
        if self.resumed:
            out["resumed"] = True
        return out


def discover(notebooks_dir: Path) -> list[Path]:
    """Course notebooks: ``NN_name.ipynb``, in number order."""
    return sorted(p for p in Path(notebooks_dir).glob("[0-9][0-9]_*.ipynb"))


def matches(p: Path, token: str) -> bool:
    """``token`` names notebook ``p``: its whole name ("06_rag") or its number ("06", "6")."""
    token = token.strip()
    return p.stem == token or p.stem.split("_")[0] == token.zfill(2)


def select(notebooks: list[Path], only: str | None = None, start: str | None = None) -> list[Path]:
    chosen = notebooks
    if start:
        idx = next((i for i, p in enumerate(notebooks) if matches(p, start)), None)
        if idx is None:
            raise SystemExit(f"--from {start}: no such notebook in {[p.stem for p in notebooks]}")
        chosen = notebooks[idx:]
    if only:
        tokens = names_in(only)
        check_names(notebooks, tokens, "--only")
        chosen = [p for p in chosen if any(matches(p, t) for t in tokens)]
    return chosen


def names_in(text: str) -> list[str]:
    """The notebook names or numbers of a comma list (``--only``, ``--first``), empty ones dropped."""
    return [t.strip() for t in text.split(",") if t.strip()]


def check_names(notebooks: list[Path], tokens: list[str], option: str) -> None:
    """Every token names one of ``notebooks`` (a typo would silently select or change nothing)."""
    unknown = [t for t in tokens if not any(matches(p, t) for p in notebooks)]
    if unknown:
        raise SystemExit(f"{option}: unknown notebook(s) {unknown}; have {[p.stem for p in notebooks]}")


_STAGE_CALL = re.compile(r"""session\.stage\(\s*["']([A-Za-z0-9_]+)["']""")


def start_first(profile: str, given: str | None = None) -> list[str]:
    """The notebooks that start ahead of course order when ready: ``--first`` (a comma list of
    names or numbers, "06" or "06_rag"; an empty one keeps course order) or the profile's
    ``course_first``."""
    return names_in(given) if given is not None else list(config.PROFILES.get(profile, {}).get("course_first", []))


def start_order(notebooks: list[Path], first: list[str]) -> list[Path]:
    """The queue a run starts from: course order, except that the notebooks named in ``first``
    (``start_first``) go to the front; each group keeps course order."""
    return sorted(notebooks, key=lambda p: not any(matches(p, t) for t in first))


def depends_of(nb_path: Path, profile: str | None = None) -> list[str]:
    """The notebooks ``nb_path`` needs to have run first: its declared ``depends`` (or ``DEPENDS``),
    plus, for a ``profile``, the producers of every ``artifact:<name>`` that the stages it reads
    (``session.stage("rag")``) name. On ``smol`` and the GPU profiles 06 and 07 write with 03's DPO
    model, so under ``--jobs`` they wait for 03; on ``tiny`` they need only 01."""
    nb = json.loads(Path(nb_path).read_text())
    deps = list(nb.get("metadata", {}).get("medkit", {}).get("depends", DEPENDS.get(nb_path.stem, [])))
    if profile is None:
        return deps
    stages = config.PROFILES.get(profile, {}).get("stages", {})
    source = "\n".join("".join(c.get("source", "")) for c in nb.get("cells", []) if c.get("cell_type") == "code")
    for stage in dict.fromkeys(_STAGE_CALL.findall(source)):
        for name in config.refs_in(stages.get(stage, {}), "artifact"):
            owner = artifacts.PRODUCERS.get(name)
            if owner and owner != nb_path.stem and owner not in deps:
                deps.append(owner)
    return deps


def input_key(nb_path: Path, params: dict[str, Any], upstream_keys: list[str]) -> str:
    """What a notebook's result depends on: its own text, its parameters, the medkit source and
    its upstream notebooks' keys. ``--resume`` reuses a result only when this key matches."""
    h = hashlib.sha256()
    h.update(Path(nb_path).read_bytes())
    h.update(json.dumps(params, sort_keys=True).encode())
    for src in sorted(paths.PACKAGE_DIR.rglob("*.py")):
        h.update(src.read_bytes())
    for key in upstream_keys:
        h.update(key.encode())
    return h.hexdigest()[:16]


class _PeakRSS:
    """Samples the resident memory of a process tree (papermill + its kernel) in a thread."""

    def __init__(self, pid: int, interval: float = 0.2):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil
        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            total = 0
            try:
                for proc in [root, *root.children(recursive=True)]:
                    try:
                        total += proc.memory_info().rss
                    except psutil.Error:
                        pass
            except psutil.Error:
                break
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def failed_cell(executed: Path) -> tuple[int | None, str]:
    """(code cell number, 1-based, among code cells; 'ExcName: message') of the failing cell."""
    try:
        nb = json.loads(Path(executed).read_text())
    except (OSError, json.JSONDecodeError):
        return None, "no executed notebook was written"
    code_no = 0
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "code":
            continue
        if "injected-parameters" in cell.get("metadata", {}).get("tags", []):
            continue  # papermill's own cell is not the learner's
        code_no += 1
        for out in cell.get("outputs", []):
            if out.get("output_type") == "error":
                return code_no, f"{out.get('ename')}: {out.get('evalue')}"
        if cell.get("metadata", {}).get("papermill", {}).get("status") == "running":
            return code_no, "this cell was still running (killed, timed out, or the kernel died)"
    return None, "no cell recorded an error (killed, timed out, or the kernel died)"


def notebook_timeout(profile: str, override: float | None = None) -> float:
    """Seconds a notebook may run before the runner stops it: ``--timeout`` when given, else the
    profile's ``notebook_timeout_s`` (a guard against a hung kernel, sized for the profile's
    slowest notebook on its slowest machine), else ``tiny``'s."""
    if override is not None:
        if override <= 0:
            raise ValueError(f"--timeout must be a positive number of seconds, got {override:g}")
        return float(override)
    limit = config.PROFILES.get(profile, {}).get("notebook_timeout_s")
    return float(limit if limit is not None else config.PROFILES["tiny"]["notebook_timeout_s"])


def thread_control(run_dir: Path, name: str) -> Path:
    """The file through which the runner changes a capped notebook's threads while it runs
    (``notebook.follow_thread_control`` in its kernel)."""
    return Path(run_dir) / name / "threads.ctl"


def set_threads(control: Path, n: int) -> bool:
    """Ask the kernel that follows ``control`` to use ``n`` compute threads from now on. Writes
    the count, then sends SIGUSR1 to the pid the kernel wrote, but only to a process whose
    environment names this very file (a pid can be reused once its kernel has exited). False
    when no kernel was signalled: it has not reached ``notebook.start`` yet, and reads the count
    when it does."""
    import psutil

    try:
        # the notebook may have been submitted and not started yet: its folder may not exist
        # (a crash here once ended a whole --jobs run); the kernel reads the count when it starts
        control.parent.mkdir(parents=True, exist_ok=True)
        tmp = control.with_name(control.name + ".tmp")
        tmp.write_text(f"{n}\n")
        tmp.replace(control)
        proc = psutil.Process(int(thread_control_pid(control).read_text()))
        if proc.environ().get(THREAD_CONTROL_ENV) != str(control):
            return False
        proc.send_signal(signal.SIGUSR1)
    except (OSError, ValueError, psutil.Error):
        return False
    return True


def fresh_control(run_dir: Path, name: str) -> Path:
    """The notebook's folder, without an earlier attempt's thread-control files. The runner calls
    it before it submits the notebook, so a count that ``set_threads`` writes between the
    submission and the kernel's start is kept, not deleted as stale."""
    control = thread_control(run_dir, name)
    control.parent.mkdir(parents=True, exist_ok=True)
    for stale in (control, thread_control_pid(control)):
        stale.unlink(missing_ok=True)
    return control.parent


def execute(nb_path: Path, run_dir: Path, params: dict[str, Any], timeout: float | None,
            kernel: str, threads: int | None = None) -> Result:
    """Run one notebook with papermill in a child process; never raises for a notebook failure.
    ``threads``: cap the kernel's compute threads (OpenMP/MKL, hence torch) when notebooks share
    the cores."""
    name = nb_path.stem
    out_dir = run_dir / name
    out_dir.mkdir(parents=True, exist_ok=True)
    executed = out_dir / f"{name}.ipynb"
    log = out_dir / "log.txt"
    (out_dir / "metrics.json").unlink(missing_ok=True)  # metrics of an earlier attempt are stale
    cmd = [sys.executable, "-m", "papermill", str(nb_path), str(executed), "--kernel", kernel,
           "--log-output", "--no-progress-bar", "--cwd", str(nb_path.parent)]
    for key, value in params.items():
        cmd += ["-p", key, str(value)] if isinstance(value, str) else ["-y", f"{key}: {json.dumps(value)}"]
    # matplotlib's inline backend, as in Jupyter: the executed notebook keeps every figure as an image
    # (with Agg they were only files under plots/, and a reader of the run saw none)
    env = dict(os.environ, MEDKIT_HEADLESS="1", PYTHONUNBUFFERED="1",
               MPLBACKEND="module://matplotlib_inline.backend_inline")
    control = thread_control(run_dir, name)
    control_files = (control, thread_control_pid(control))  # removed when it ends (before it: fresh_control)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        env[THREAD_CONTROL_ENV] = str(control)  # the runner may give it more cores later
    start = time.perf_counter()
    timed_out = False
    with open(log, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        with _PeakRSS(proc.pid) as mem:
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
    seconds = time.perf_counter() - start
    for used in control_files:
        used.unlink(missing_ok=True)
    metrics_file = out_dir / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.exists() else {}
    result = Result(name, "ok" if rc == 0 else "failed", seconds, mem.peak / 2**20, metrics, threads=threads)
    if rc != 0:
        cell, exc = failed_cell(executed)
        where = f"cell {cell}" if cell else "no cell"
        if timed_out:
            exc = f"timed out after {timeout:.0f} s (`--timeout` sets the limit); " + exc
        result.error = f"{name} failed at {where}: {exc} (partial output: {executed}; log: {log})"
    return result


def compare(old: dict[str, Any], new: dict[str, Any], rel_tol: float = 0.10,
            abs_tol: float = 0.02) -> list[dict[str, Any]]:
    """Metrics that moved between two ``summary.json`` files. A number moved when
    ``|new - old| > max(abs_tol, rel_tol * |old|)``; anything else moved when it changed;
    a metric present in ``old`` and missing from ``new`` is flagged too."""
    def flat(summary: dict[str, Any]) -> dict[str, tuple[str, Any]]:
        out = {}
        for nb in summary.get("notebooks", []):
            for key, value in (nb.get("metrics") or {}).items():
                out[f"{nb['name']}:{key}"] = (nb["name"], value)
            out[f"{nb['name']}:status"] = (nb["name"], nb.get("status"))
        return out

    a, b = flat(old), flat(new)
    moved = []
    for key in sorted(set(a) | set(b)):
        nb = (a.get(key) or b.get(key))[0]
        metric = key.split(":", 1)[1]
        va = a.get(key, (None, None))[1]
        vb = b.get(key, (None, None))[1]
        if key not in b:
            moved.append({"notebook": nb, "metric": metric, "old": va, "new": None, "why": "missing"})
        elif key not in a:
            continue  # a new metric is not a regression
        elif isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
            delta = vb - va
            if abs(delta) > max(abs_tol, rel_tol * abs(va)):
                moved.append({"notebook": nb, "metric": metric, "old": va, "new": vb,
                              "why": f"{'+' if delta > 0 else ''}{delta:.4g}"})
        elif va != vb:
            moved.append({"notebook": nb, "metric": metric, "old": va, "new": vb, "why": "changed"})
    return moved


def summary_markdown(summary: dict[str, Any]) -> str:
    rows = []
    for nb in summary["notebooks"]:
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in list(nb["metrics"].items())[:6])
        more = len(nb["metrics"]) - 6
        rows.append({"notebook": nb["name"], "status": nb["status"] + (" (resumed)" if nb.get("resumed") else ""),
                     "seconds": nb["seconds"], "peak RSS MB": nb["peak_rss_mb"],
                     "metrics": shown + (f", … (+{more})" if more > 0 else "")})
    head = (f"# Run {summary['run_id']}\n\nprofile `{summary['profile']}`, "
            f"{summary['total_seconds']:.1f} s in all, on {summary.get('machine', '?')}\n\n")
    errors = [f"- {nb['error']}" for nb in summary["notebooks"] if nb.get("error")]
    return head + report.markdown_table(rows) + ("\n\n## Failures\n" + "\n".join(errors) if errors else "") + "\n"


def _machine() -> str:
    import platform
    return f"{platform.node() or 'host'}: {os.cpu_count()} CPU, {platform.machine()}, Python {platform.python_version()}"


def machine_facts(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """The machine a run's figures come from, taken when the run starts: cores, CPU model, whether
    the CPU has AVX2 / AVX-512 (kernels, and so timings and some rounding, differ between them),
    the load average (a busy machine slows every timing) and the Python. Fields it cannot read are
    ``None``, never guessed."""
    import platform

    model, flags = None, None
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if model is None and key in ("model name", "cpu model", "processor") and value.strip() and not value.strip().isdigit():
            model = value.strip()
        if flags is None and key in ("flags", "features"):
            flags = set(value.split())
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        load = None
    return {"cores": os.cpu_count(), "cpu_model": model or platform.processor() or None,
            "arch": platform.machine(), "avx2": None if flags is None else "avx2" in flags,
            "avx512": None if flags is None else any(f.startswith("avx512") for f in flags),
            "load_avg_start": load, "python": platform.python_version(), "node": platform.node() or None}


def _update_latest(run_dir: Path) -> None:
    """Point ``<root>/latest`` at ``run_dir``. The new link (or, where the filesystem has no
    symlinks, a file holding the path) is made under a name of its own and renamed over the old
    one, so two runs that start at once under one root never see it missing."""
    latest = run_dir.parent.parent / "latest"
    tmp = latest.with_name(f".latest.{os.getpid()}.{threading.get_ident()}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            tmp.symlink_to(run_dir.relative_to(latest.parent), target_is_directory=True)
        except OSError:  # filesystems without symlinks: write the path instead
            tmp.write_text(str(run_dir) + "\n")
        os.replace(tmp, latest)
    finally:
        tmp.unlink(missing_ok=True)


def latest_run(root: Path) -> Path | None:
    latest = root / "latest"
    if latest.is_symlink() or latest.is_dir():
        return latest.resolve()
    if latest.is_file():
        return Path(latest.read_text().strip())
    return None


def _print_moved(moved: list[dict[str, Any]], against: str) -> None:
    if not moved:
        print(f"compare: no metric moved beyond tolerance against {against}")
        return
    print(f"compare: {len(moved)} metric(s) moved against {against}:")
    print(report.markdown_table(moved, ["notebook", "metric", "old", "new", "why"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medkit.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", default=os.environ.get("MEDKIT_PROFILE", "tiny"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", help="comma list of notebooks (02,03 or 02_sft)")
    ap.add_argument("--from", dest="start", help="start at this notebook")
    ap.add_argument("--list", action="store_true", help="list the notebooks and exit")
    ap.add_argument("--resume", action="store_true",
                    help="continue the latest run (or --run-id's); skip notebooks already done with the same inputs")
    ap.add_argument("--compare", metavar="SUMMARY_JSON", help="flag metrics that moved against this run")
    ap.add_argument("--no-run", action="store_true", help="with --compare: compare the latest run only")
    ap.add_argument("--rel-tol", type=float, default=0.10)
    ap.add_argument("--abs-tol", type=float, default=0.02)
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per notebook before it is stopped (default: the profile's `notebook_timeout_s`: "
                         + ", ".join(f"{name} {p['notebook_timeout_s']}" for name, p in config.PROFILES.items()) + ")")
    ap.add_argument("--jobs", type=int, default=int(os.environ["MEDKIT_JOBS"]) if os.environ.get("MEDKIT_JOBS") else None,
                    help="notebooks run side by side when their upstream is done (each gets cores/jobs "
                         "threads, and the idle cores back when its partner ends; 09 always runs alone). "
                         "Timings are then measured under load. Default: $MEDKIT_JOBS, else the profile's "
                         "`course_jobs` (smol: 2), else 1")
    ap.add_argument("--first", default=None,
                    help="comma list of notebooks to start before the others whenever their upstream is "
                         "done (with --jobs: a long notebook that others do not wait for). Default: the "
                         "profile's `course_first` (tiny: 06_rag), else course order; --first '' keeps "
                         "course order")
    ap.add_argument("--notebooks-dir", default=str(paths.repo_root() / "notebooks"))
    ap.add_argument("--output-root", default=None, help="default: $MEDKIT_OUTPUT_DIR or outputs/")
    ap.add_argument("--run-id", default=None)
    ap.add_argument("--kernel", default=os.environ.get("MEDKIT_KERNEL", "medkit"),
                    help="Jupyter kernel (make setup registers `medkit` for .venv)")
    args = ap.parse_args(argv)
    try:  # before a run folder is made or `latest` moves
        timeout = notebook_timeout(args.profile, args.timeout)
    except ValueError as e:
        ap.error(str(e))

    root = Path(args.output_root) if args.output_root else paths.output_root()
    if args.output_root:
        os.environ["MEDKIT_OUTPUT_DIR"] = str(Path(args.output_root).resolve())
    notebooks = discover(Path(args.notebooks_dir))
    if args.list:
        for p in notebooks:
            deps = depends_of(p, args.profile)
            print(f"{p.stem}" + (f"  (needs {', '.join(deps)})" if deps else ""))
        return 0
    old = None
    if args.compare:
        old_path = Path(args.compare)
        if not old_path.exists():
            print(f"--compare: {old_path} does not exist", file=sys.stderr)
            return 2
        old = json.loads(old_path.read_text())
    if args.no_run:
        if old is None:
            print("--no-run needs --compare", file=sys.stderr)
            return 2
        last = latest_run(root)
        if not last or not (last / "summary.json").exists():
            print(f"--no-run: no latest run under {root}", file=sys.stderr)
            return 2
        moved = compare(old, json.loads((last / "summary.json").read_text()), args.rel_tol, args.abs_tol)
        _print_moved(moved, str(args.compare))
        return 3 if moved else 0

    chosen = select(notebooks, args.only, args.start)
    first = start_first(args.profile, args.first)
    if args.first:  # the profile's own list may name notebooks another --notebooks-dir lacks
        check_names(notebooks, first, "--first")
    if not chosen:
        print(f"no notebooks to run in {args.notebooks_dir}")
        return 0

    previous: dict[str, dict[str, Any]] = {}
    prev: dict[str, Any] = {}
    run_dir = None
    if args.resume:
        run_dir = (root / "runs" / args.run_id) if args.run_id else latest_run(root)
        if run_dir and (run_dir / "summary.json").exists():
            prev = json.loads((run_dir / "summary.json").read_text())
            if prev.get("profile") == args.profile:
                previous = {nb["name"]: nb for nb in prev["notebooks"]}
            else:
                run_dir, prev = None, {}
        else:
            run_dir = None
    if run_dir is None:
        run_id = args.run_id or dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        run_dir = root / "runs" / run_id
    run_dir = run_dir.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    _update_latest(run_dir)  # now, so that a run killed part-way is the one --resume continues
    params = {"profile": args.profile, "seed": args.seed, "output_dir": str(run_dir)}

    from tqdm.auto import tqdm

    started = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    facts = machine_facts()  # before the first notebook: the load average at the start
    results: dict[str, Result] = {}
    keys: dict[str, str] = {}
    t0 = time.perf_counter()
    jobs = max(1, args.jobs if args.jobs is not None else config.PROFILES.get(args.profile, {}).get("course_jobs", 1))
    # with several notebooks at once each gets an equal share of the cores (exclusive ones all)
    share = max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else None
    bar = tqdm(total=len(chosen), desc="course", unit="nb", file=sys.stdout)
    needs = {p.stem: depends_of(p, args.profile) for p in chosen}  # read each notebook once

    def prepare(nb_path: Path) -> bool:
        """Decide skip/resume for a notebook whose upstream has finished; True = run it."""
        name = nb_path.stem
        deps = needs[name]
        bad = [d for d in deps if d in results and results[d].status != "ok"]
        keys[name] = input_key(nb_path, params, [keys.get(d, "") for d in deps])
        if bad:
            results[name] = Result(name, "skipped", error=f"{name} skipped: upstream {', '.join(bad)} did not succeed")
            tqdm.write(f"skip  {name}: upstream {', '.join(bad)} did not succeed")
            return False
        done_file = run_dir / name / "done.json"
        if args.resume and done_file.exists() and name in previous:
            done = json.loads(done_file.read_text())
            if done.get("key") == keys[name] and previous[name].get("status") == "ok":
                p = previous[name]
                results[name] = Result(name, "ok", p["seconds"], p["peak_rss_mb"], p["metrics"], resumed=True,
                                       threads=p.get("threads"), threads_later=p.get("threads_later"))
                tqdm.write(f"done  {name} (resumed: same inputs)")
                return False
        done_file.unlink(missing_ok=True)
        return True

    def write_summary(complete: bool) -> dict[str, Any]:
        """summary.json as it stands. Written after every notebook (``complete: false``), so a run
        that is killed keeps what it finished and ``--resume`` skips that work."""
        merged = []
        for p in notebooks:  # keep notebooks this invocation did not select (e.g. --only on a resumed run)
            if p.stem in results:
                merged.append(results[p.stem].as_summary())
            elif p.stem in previous:
                merged.append(previous[p.stem])
        # a resumed run adds this invocation to the earlier ones: the run's start and time are all of them
        this = {"started": started, "seconds": round(time.perf_counter() - t0, 2),
                "notebooks": [n for n, r in results.items() if not r.resumed], "load_avg_start": facts.get("load_avg_start")}
        earlier = prev.get("invocations") or ([{"started": prev["started"], "seconds": prev.get("total_seconds"),
                                                "notebooks": [n["name"] for n in prev.get("notebooks", [])
                                                              if n.get("status") != "skipped"]}] if prev else [])
        summary = {"run_id": run_dir.name, "profile": args.profile,
                   "total_seconds": round(sum(i["seconds"] or 0 for i in earlier) + this["seconds"], 2),
                   "machine": _machine(), "started": earlier[0]["started"] if earlier else started,
                   "machine_facts": facts, "jobs": jobs, "complete": complete, "notebooks": merged,
                   "invocations": earlier + [this]}
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(run_dir / "summary.json")
        return summary

    def finish(name: str, res: Result) -> None:
        current.pop(name, None)
        res.threads_later = changes.pop(name, None)
        results[name] = res
        if res.status == "ok":
            (run_dir / name / "done.json").write_text(json.dumps({"key": keys[name]}) + "\n")
            tqdm.write(f"ok    {name} in {res.seconds:.1f} s, peak {res.peak_rss_mb:.0f} MB")
        else:
            tqdm.write(f"FAIL  {res.error}")
        write_summary(complete=False)

    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    chosen_names = {p.stem for p in chosen}
    # the profile's (or --first's) notebooks start as soon as their upstream is done, before the
    # others that are ready then
    pending = start_order(chosen, first)
    running: dict[Any, str] = {}
    cores = os.cpu_count() or 1
    current: dict[str, int] = {}  # running notebooks that started capped: their threads now
    begun: dict[str, float] = {}
    changes: dict[str, list[list[float]]] = {}

    def rebalance() -> None:
        """Split the cores among the notebooks running now: when a partner finishes and nothing
        can start in its place (what is pending waits for a running notebook, or for the machine
        to itself), the capped notebook gets the idle cores back; when a new partner starts
        beside a widened one, it goes back to its share."""
        live = [n for f, n in running.items() if not f.done()]  # one that just ended has cleaned up
        each = max(1, cores // max(len(live), 1))
        for name in [n for n in live if n in current and current[n] != each]:
            current[name] = each
            set_threads(thread_control(run_dir, name), each)
            changes.setdefault(name, []).append([round(time.perf_counter() - begun[name], 1), each])
            tqdm.write(f"cores {name}: {each} thread{'s' if each > 1 else ''} from now")

    def ready(p: Path) -> bool:
        """Every notebook ``p`` needs (that this invocation runs) has finished."""
        return not any(d in chosen_names and d not in results for d in needs[p.stem])

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        while pending or running:
            # start, in course order, every notebook whose upstream (in this run) has finished
            for nb_path in list(pending):
                name = nb_path.stem
                if not ready(nb_path):
                    continue
                exclusive = name in EXCLUSIVE or any(n in EXCLUSIVE for n in running.values())
                if len(running) >= jobs or (exclusive and running):
                    break
                pending.remove(nb_path)
                bar.set_postfix_str(name)
                if not prepare(nb_path):
                    bar.update(1)
                    continue
                # alone, and nothing else can start before it ends (what is pending waits for it):
                # it gets every core rather than leaving the others idle
                alone = not running and not any(ready(p) for p in pending)
                threads = None if name in EXCLUSIVE or alone else share
                if threads:
                    current[name], begun[name] = threads, time.perf_counter()
                fresh_control(run_dir, name)
                running[pool.submit(execute, nb_path, run_dir, params, timeout, args.kernel, threads)] = name
                if name in EXCLUSIVE:
                    break
            if not running:
                continue
            rebalance()
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                finish(running.pop(fut), fut.result())
                bar.update(1)
    bar.close()

    summary = write_summary(complete=True)
    md = summary_markdown(summary)
    (run_dir / "summary.md").write_text(md)
    _update_latest(run_dir)
    print("\n" + md)
    print(f"summary: {run_dir / 'summary.json'}")

    rc = 0 if all(r.status == "ok" for r in results.values()) else 1
    if old is not None:
        moved = compare(old, summary, args.rel_tol, args.abs_tol)
        _print_moved(moved, str(args.compare))
        (run_dir / "compare.json").write_text(json.dumps(moved, indent=2) + "\n")
        if moved and rc == 0:
            rc = 3
    return rc


if __name__ == "__main__":
    sys.exit(main())
