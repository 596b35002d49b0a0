"""Repeat 04's training-peak measurement (``qlora.measure_training_memory``, as the notebook calls it:
a fresh child process per measurement) outside the notebook, to see its spread.

    .venv/bin/python scripts/probe_qlora_peak.py outputs/runs/<smol run> 4bit   # or: full
    .venv/bin/python scripts/probe_qlora_peak.py outputs/runs/<smol run> 4bit default   # glibc's own
                                                                   # mmap threshold (04 fixes it)

Needs a finished ``smol`` run (01 and 04: the converted SmolLM2 and 04's stage config). Prints the
training peak and the loading peak in MB above the process's start, as 04 records them. One
measurement per call: call it several times for the spread (docs/notes/2026-12-05-smol-course.md,
"Eighth session" and "Ninth session", has the figures).
"""
import json
import sys
from pathlib import Path

from medkit import artifacts, config
from medkit.data import sources
from medkit.evaluate import mcq
from medkit.train import common, qlora


def main(run: str, which: str, allocator: str = "") -> None:
    run_dir = Path(run)
    conf = json.loads((run_dir / "04_qlora_phi2" / "config.json").read_text())
    cfg = config.resolve(conf["profile"], "qlora", seed=conf["seed"])  # what 04's session.stage gives
    data = sources.stage_splits(cfg, artifacts.get("datasets", run_dir, conf["profile"]))
    rows = mcq.validate(data.train, "train")[: cfg["batch_size"]]  # 04's mem_rows
    result = qlora.measure_training_memory(common.resolve_model_ref(cfg["base_model"]), cfg, rows,
                                           quantized=which == "4bit",
                                           mmap_threshold=None if allocator == "default" else qlora.MMAP_THRESHOLD)
    print(f"{which} ({result['allocator']} allocator): training peak {result['train_peak_mb']:.0f} MB, "
          f"loading peak {result['load_peak_mb']:.0f} MB")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[2] not in ("4bit", "full") or sys.argv[3:] not in ([], ["default"]):
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
