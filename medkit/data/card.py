"""The data card shown by 01_data: counts, drop reasons, examples and length histograms, plus
the same cleaning run on the field's real datasets when they are at hand."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from . import clean, loaders
from .pipeline import CourseData

# the text field whose length each set's histogram shows
_LENGTH_FIELD = {"passages": "text", "qa": "answer", "mcq": "question", "cot": "Complex_CoT",
                 "pref_pairs": "rejected", "triage": "text"}


def counts_table(data: CourseData) -> list[dict[str, Any]]:
    rows = []
    for name, splits in data.counts().items():
        row = {"set": name, **splits, "total": sum(splits.values())}
        if name in ("qa", "mcq"):
            row["augmented (train)"] = sum(1 for r in data.sets[name]["train"] if r.get("augmented"))
        rows.append(row)
    return rows


def examples(data: CourseData, per_set: int = 2) -> dict[str, list[dict[str, Any]]]:
    out = {}
    for name, splits in data.sets.items():
        split = "test" if "test" in splits and splits["test"] else next(iter(splits))
        out[name] = splits[split][:per_set]
    return out


def length_histograms(data: CourseData):
    """One histogram per set of the main text field's length in words."""
    import matplotlib.pyplot as plt

    names = [n for n in _LENGTH_FIELD if n in data.sets]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    for ax, name in zip(axes.flat, names):
        rows = [r for split in data.sets[name].values() for r in split]
        lengths = [len(str(r[_LENGTH_FIELD[name]]).split()) for r in rows]
        ax.hist(lengths, bins=30, color="#3b7dd8")
        ax.set_title(f"{name}: {_LENGTH_FIELD[name]} ({len(rows)} rows)")
        ax.set_xlabel("words")
    fig.suptitle("Lengths of the course datasets")
    fig.tight_layout()
    return fig


def real_dataset_report(shared_dir: str | Path | None, allow_hub: bool = False,
                        max_tokens: int = 512) -> dict[str, Any]:
    """Load MedQuAD and PubMedQA (PQA-L) from ``shared_dir`` (or, with ``allow_hub``, their
    Hugging Face ids), clean them with the course pipeline and split MedQuAD grouped by
    ``focus``. Returns counts, drop reasons and leakage, or ``{"skipped": why}``."""
    sources = {}
    if shared_dir and Path(shared_dir).is_dir():
        sources = {"medquad": Path(shared_dir) / "medquad.jsonl", "pubmedqa": Path(shared_dir) / "pubmedqa_pqal.jsonl"}
        sources = {k: v for k, v in sources.items() if v.exists()}
    elif allow_hub:
        sources = {"medquad": None, "pubmedqa": None}
    if not sources:
        return {"skipped": "no ../shared/data here and hub downloads are off on this profile"}
    out: dict[str, Any] = {"dropped": []}
    if "medquad" in sources:
        res = loaders.load("medquad", sources["medquad"], allow_hub=allow_hub)
        cleaned = clean.clean_rows(res.rows, ("question", "answer"), max_tokens=max_tokens, dataset="medquad")
        splits = clean.split_by_hash(cleaned.kept, group="topic", salt="medquad")
        leaks = clean.leakage_pairs(splits["train"], splits["test"], ("question", "answer"))
        topics = {s: {r["topic"] for r in rows} for s, rows in splits.items()}
        out["medquad"] = {"loaded": len(res.rows), "load_dropped": len(res.dropped), "kept": len(cleaned.kept),
                          "dropped": cleaned.drop_counts(), "dup_clusters": len(cleaned.clusters),
                          "pii_replacements": cleaned.pii_replacements,
                          "splits": {s: len(r) for s, r in splits.items()},
                          "topics_shared_train_test": len(topics["train"] & topics["test"]),
                          "leakage_pairs": len(leaks)}
        out["dropped"] += res.dropped + cleaned.dropped
    if "pubmedqa" in sources:
        res = loaders.load("pubmedqa", sources["pubmedqa"], allow_hub=allow_hub)
        labels: dict[str, int] = {}
        for r in res.rows:
            labels[r["final_decision"]] = labels.get(r["final_decision"], 0) + 1
        out["pubmedqa"] = {"loaded": len(res.rows), "load_dropped": len(res.dropped), "labels": labels,
                           "test_items": sum(1 for r in res.rows if r["split"] == "test")}
        out["dropped"] += res.dropped
    return out
