"""Retrieval metrics for one relevant document (or a set) per query."""
from __future__ import annotations

import math


def recall_at(ranked: list[str], relevant: set[str], k: int) -> float:
    return float(bool(set(ranked[:k]) & relevant)) if len(relevant) == 1 else len(set(ranked[:k]) & relevant) / len(relevant)


def mrr_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    for i, doc in enumerate(ranked[:k], 1):
        if doc in relevant:
            return 1.0 / i
    return 0.0


def ndcg_at(ranked: list[str], relevant: set[str], k: int = 10) -> float:
    dcg = sum(1.0 / math.log2(i + 1) for i, doc in enumerate(ranked[:k], 1) if doc in relevant)
    ideal = sum(1.0 / math.log2(i + 1) for i in range(1, min(len(relevant), k) + 1))
    return dcg / ideal if ideal else 0.0


def summarize(runs: list[tuple[list[str], set[str]]]) -> dict[str, float]:
    n = max(len(runs), 1)
    return {"recall@1": sum(recall_at(r, g, 1) for r, g in runs) / n,
            "recall@5": sum(recall_at(r, g, 5) for r, g in runs) / n,
            "recall@10": sum(recall_at(r, g, 10) for r, g in runs) / n,
            "mrr@10": sum(mrr_at(r, g) for r, g in runs) / n,
            "ndcg@10": sum(ndcg_at(r, g) for r, g in runs) / n, "queries": len(runs)}
