"""What-if for a course run: how long would `medkit.run --jobs 2` take if a notebook took N seconds?

A model, not a measurement. It reads a run's ``summary.json`` (each notebook's seconds and the
threads it had), turns every notebook into one-thread seconds, and replays the runner's rules on
two cores: course order (or the profile's ``course_first``), each notebook's dependencies
(``run.depends_of``), ``run.EXCLUSIVE`` notebooks alone, and a notebook with nothing beside it
running ``--speedup`` times its one-thread speed (on the 2-core EPYCs a SmolLM2 notebook gains
about 1.7x from its second thread). ``--set 02_sft=768`` replaces a notebook's one-thread seconds.

    .venv/bin/python scripts/course_schedule.py outputs/runs/smol-r23/summary.json
    .venv/bin/python scripts/course_schedule.py outputs/runs/smol-r23/summary.json --set 02_sft=1100

Check it first: without ``--set`` it should give back the run's own wall time.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from medkit import paths, run


def one_thread_seconds(nb: dict, speedup: float) -> float:
    """A notebook's seconds as if it had one thread throughout: the seconds it ran with every core
    (``threads`` absent) or with more than one thread (``threads_later``: [[seconds after its
    start, threads], ...], the runner's changes) count ``speedup`` times."""
    secs = float(nb["seconds"])
    if not nb.get("threads"):
        return secs * speedup
    marks = [(0.0, int(nb["threads"]))] + [(float(t), int(n)) for t, n in nb.get("threads_later") or []]
    total = 0.0
    for (start, n), end in zip(marks, [t for t, _ in marks[1:]] + [secs]):
        total += max(0.0, end - start) * (speedup if n > 1 else 1.0)
    return total


def simulate(work: dict[str, float], deps: dict[str, list[str]], order: list[str], jobs: int = 2,
             speedup: float = 1.7, exclusive: frozenset[str] = frozenset(run.EXCLUSIVE)) -> tuple[float, dict[str, float]]:
    """Wall seconds of the whole run and each notebook's end time."""
    left = dict(work)
    pending, running, ends, t = list(order), set(), {}, 0.0
    while pending or running:
        for name in list(pending):  # run.main's start loop: ready, then room, then exclusive
            if any(d in work and d not in ends for d in deps.get(name, [])):
                continue
            alone_only = name in exclusive or any(n in exclusive for n in running)
            if len(running) >= jobs or (alone_only and running):
                break
            pending.remove(name)
            running.add(name)
            if name in exclusive:
                break
        if not running:
            raise ValueError(f"nothing can start: {pending} wait for notebooks that never end")
        speed = 1.0 if len(running) > 1 else speedup
        first = min(running, key=lambda n: left[n])
        dt = left[first] / speed
        t += dt
        for n in running:
            left[n] -= dt * speed
        running.remove(first)
        ends[first] = t
    return t, ends


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("summary", type=Path, help="a run's summary.json")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=SECONDS",
                    help="a notebook's one-thread seconds (repeatable)")
    ap.add_argument("--speedup", type=float, default=1.7)
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    summary = json.loads(args.summary.read_text())
    nbs = {nb["name"]: nb for nb in summary["notebooks"] if nb.get("status") == "ok"}
    work = {name: one_thread_seconds(nb, args.speedup) for name, nb in nbs.items()}
    for item in args.set:
        name, _, secs = item.partition("=")
        if name not in work:
            ap.error(f"--set {item}: no notebook {name!r} in {args.summary}; have {sorted(work)}")
        work[name] = float(secs)
    nb_dir = paths.repo_root() / "notebooks"
    deps = {name: run.depends_of(nb_dir / f"{name}.ipynb", summary["profile"]) for name in work}
    order = [p.name for p in run.start_order([Path(n) for n in sorted(work)], run.start_first(summary["profile"]))]
    wall, ends = simulate(work, deps, order, args.jobs, args.speedup)
    for name in sorted(ends, key=ends.get):
        print(f"{name:20s} one-thread {work[name]:7.0f} s   ends at {ends[name]:7.0f} s")
    print(f"model: {wall:.0f} s = {wall / 60:.1f} min (the run itself: {summary['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
