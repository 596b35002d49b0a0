"""Named artifacts passed between notebooks.

A notebook never reaches into another notebook's folder. It registers what it makes with
``put(name, path)`` and asks for what it needs with ``get(name)``; ``get`` knows which notebook
makes each artifact and says which one to run when it is missing.
"""
from __future__ import annotations

import json
from pathlib import Path

from . import paths

# artifact name -> the notebook that produces it
PRODUCERS = {
    "datasets": "01_data",
    "tiny_qwen2": "01_data",
    "tiny_phi": "01_data",
    "tiny_llama": "01_data",
    "tiny_t5": "01_data",
    "smol_smollm2-135m": "01_data",  # medkit.smol's converted SmolLM2 (profiles that name smol:smollm2-135m)
    "sft_model": "02_sft",
    "sft_adapter": "02_sft",
    "t5_model": "02_sft",
    "dpo_model": "03_dpo",
    "qlora_model": "04_qlora_phi2",
    "qlora_adapter": "04_qlora_phi2",
    "cot_model": "05_r1_cot_unsloth",
    "rag_index": "06_rag",
    "agent_store": "07_agent",
    "leaderboard": "08_benchmarking",
}


class MissingArtifact(FileNotFoundError):
    pass


def _index_file(run_dir: Path) -> Path:
    return Path(run_dir) / "artifacts.json"


def _read(run_dir: Path) -> dict:
    f = _index_file(run_dir)
    return json.loads(f.read_text()) if f.exists() else {}


def put(name: str, path: str | Path, run_dir: str | Path, **meta) -> Path:
    """Register ``path`` (a file or folder that exists) as artifact ``name`` of this run."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"artifact {name!r}: {path} does not exist")
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    index = _read(run_dir)
    index[name] = {"path": str(path), **meta}
    _index_file(run_dir).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return path


def get(name: str, run_dir: str | Path | None = None, profile: str | None = None) -> Path:
    """The path of artifact ``name``: from this run first, else from the newest earlier run
    (of the same profile, when given) that made it. Raises MissingArtifact naming the notebook
    to run."""
    candidates: list[Path] = []
    if run_dir is not None:
        candidates.append(Path(run_dir))
    runs = paths.output_root() / "runs"
    if runs.is_dir():
        candidates += sorted((d for d in runs.iterdir() if d.is_dir()),
                             key=lambda d: d.stat().st_mtime, reverse=True)
    for cand in candidates:
        entry = _read(cand).get(name)
        if not entry or not Path(entry["path"]).exists():
            continue
        if profile and entry.get("profile") not in (None, profile):
            continue
        return Path(entry["path"])
    producer = PRODUCERS.get(name)
    hint = (f"Run {producer} first, e.g. `python -m medkit.run --only {producer[:2]}`." if producer
            else "No course notebook is registered as making it; check the name.")
    raise MissingArtifact(f"artifact {name!r} not found (looked in {len(candidates)} run folder(s) under {runs}). {hint}")
