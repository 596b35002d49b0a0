"""Recording what a notebook measured: ``metrics.json``, saved plots and small tables."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _clean(value: Any) -> Any:
    """Make numpy/torch scalars JSON-friendly; keep NaN out of metrics (it breaks comparisons)."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError("a metric is NaN or infinite; record a real measurement or leave it out")
        return round(value, 6)
    return value


def record(metrics: dict[str, Any], directory: str | Path) -> dict[str, Any]:
    """Merge ``metrics`` (flat dotted keys, e.g. ``data.passages``) into ``directory/metrics.json``
    and return everything recorded so far."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.json"
    current = json.loads(path.read_text()) if path.exists() else {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not key:
            raise ValueError(f"metric keys must be non-empty strings, got {key!r}")
        current[key] = _clean(value)
    path.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    return current


def save_figure(fig, directory: str | Path, name: str) -> Path:
    """Save a matplotlib figure as ``<directory>/<name>.png`` and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    """A GitHub-style markdown table of ``rows`` (list of dicts)."""
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
