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
        _add_rouge(row, idx, texts, answers)
        out[group] = row
    return out


def _add_rouge(row: dict[str, Any], idx: list[int], texts, references) -> None:
    """ROUGE-L of the generated texts (the first ``len(texts)`` items) in a group, with their count."""
    if texts is None:
        return
    gen = [i for i in idx if i < len(texts)]
    row["n_gen"] = len(gen)
    if gen:
        row["rougeL"] = metrics.rouge_l([texts[i] for i in gen], [references[i] for i in gen])


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


def split_result(result: dict[str, Any], seen: list[bool], references: list[str]) -> dict[str, dict[str, Any]]:
    """A ``leaderboard.score_qa`` result (its per-item ``items`` and ``replies``) split into the
    seen and unseen groups without running the model again: count, loss, perplexity, token
    accuracy and, on the generated items, ROUGE-L. A result without ``items`` (the extractive
    answerer, ``texts`` only) gets ROUGE-L alone."""
    items = result.get("items")
    texts = [g["text"] for g in result["replies"]] if "replies" in result else result.get("texts")
    out = {}
    for group in GROUPS:
        idx = [i for i, s in enumerate(seen) if s == (group == "seen")]
        row: dict[str, Any] = {"n": len(idx)}
        if items and idx:
            tokens = sum(items["tokens"][i] for i in idx)
            loss = -sum(items["logp"][i] for i in idx) / max(tokens, 1)
            row.update(loss=loss, perplexity=metrics.perplexity(loss),
                       token_accuracy=sum(items["right"][i] for i in idx) / max(tokens, 1))
        _add_rouge(row, idx, texts, references)
        out[group] = row
    return out


def models_table(results: dict[str, dict[str, Any]], seen: list[bool], references: list[str]):
    """One row per model: for the seen and the unseen held-out items, the count, perplexity,
    token accuracy and ROUGE-L (``split_result`` of each model's QA result)."""
    import pandas as pd

    rows = {}
    for name, res in results.items():
        split = split_result(res, seen, references)
        rows[name] = {(g, k): split[g].get(k) for g in GROUPS for k in ("n", "perplexity", "token_accuracy", "n_gen", "rougeL")}
    df = pd.DataFrame.from_dict(rows, orient="index")
    df.columns = pd.MultiIndex.from_tuples(df.columns, names=["held-out items", "metric"])
    return df
