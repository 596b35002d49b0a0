"""Held-out QA split by what the base model read in pre-training.

The tiny bases pre-train on every passage and on the training QA, and some held-out answers are
sentences of those passages word for word (``medkit.data.pipeline.seen_in_pretraining``). A
before/after figure over all items mixes recall of pre-training with what a fine-tune taught, so
the notebooks report both groups apart, with their counts."""
from __future__ import annotations

from typing import Any

from .. import metrics

GROUPS = ("seen", "unseen")


def split_scores(model, tok, prompts: list, answers: list[str], seen: list[bool],
                 texts: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """Teacher-forced loss, perplexity and token accuracy (``medkit.train.common.completion_scores``)
    on the ``seen`` and on the ``unseen`` held-out items, each with its count ``n``; with
    ``texts`` (generations for the first items, in order) also ROUGE-L and ``n_gen``."""
    from ..train import common

    if not (len(prompts) == len(answers) == len(seen)):
        raise ValueError(f"prompts ({len(prompts)}), answers ({len(answers)}) and seen ({len(seen)}) differ in length")
    out = {}
    for group in GROUPS:
        idx = [i for i, s in enumerate(seen) if s == (group == "seen")]
        row: dict[str, Any] = {"n": len(idx)}
        if idx:
            row.update(common.completion_scores(model, tok, [prompts[i] for i in idx], [answers[i] for i in idx]))
        if texts is not None:
            gen = [i for i in idx if i < len(texts)]
            row["n_gen"] = len(gen)
            if gen:
                row["rougeL"] = metrics.rouge_l([texts[i] for i in gen], [answers[i] for i in gen])
        out[group] = row
    return out


def table(columns: dict[str, dict[str, dict[str, Any]]]):
    """A DataFrame: one row per (group, metric), one column per stage (e.g. before / after),
    from ``{stage: split_scores(...)}``."""
    import pandas as pd

    rows = {}
    for stage, split in columns.items():
        for group in GROUPS:
            for key, value in split[group].items():
                rows.setdefault((group, key), {})[stage] = value
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.index = pd.MultiIndex.from_tuples(df.index, names=["held-out items", "metric"])
    return df


def record_keys(prefix: str, stage: str, split: dict[str, dict[str, Any]],
                keys: dict[str, str] | None = None) -> dict[str, float]:
    """Flat metric keys for ``session.record``: ``<prefix>.<name>_<stage>_<group>`` per score and
    ``<prefix>.n_test_<group>``. ``keys`` maps score names to metric names (default: loss →
    eval_loss, token_accuracy → token_acc, rougeL → rougeL). Missing scores (an empty group) are
    left out."""
    keys = keys or {"loss": "eval_loss", "token_accuracy": "token_acc", "rougeL": "rougeL"}
    out: dict[str, float] = {}
    for group in GROUPS:
        out[f"{prefix}.n_test_{group}"] = split[group]["n"]
        for src, name in keys.items():
            if src in split[group]:
                out[f"{prefix}.{name}_{stage}_{group}"] = split[group][src]
    return out
