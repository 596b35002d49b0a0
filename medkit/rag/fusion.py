"""Combining rankings: reciprocal rank fusion (rank only) and weighted score fusion (min-max
normalised scores)."""
from __future__ import annotations


def reciprocal_rank_fusion(rankings: list[list[tuple[str, float]]], k: int = 60, top: int = 10) -> list[tuple[str, float]]:
    """score(d) = Σ 1 / (k + rank_i(d)), rank from 1; the scores of the inputs are ignored."""
    scores: dict[str, float] = {}
    for ranking in rankings:
        for rank, (doc, _) in enumerate(ranking, 1):
            scores[doc] = scores.get(doc, 0.0) + 1.0 / (k + rank)
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top]


def weighted_score_fusion(rankings: list[list[tuple[str, float]]], weights: list[float], top: int = 10) -> list[tuple[str, float]]:
    """score(d) = Σ w_i · minmax_i(score_i(d)); a document missing from a ranking scores 0 there."""
    if len(weights) != len(rankings):
        raise ValueError("one weight per ranking")
    scores: dict[str, float] = {}
    for ranking, w in zip(rankings, weights):
        if not ranking:
            continue
        vals = [s for _, s in ranking]
        lo, hi = min(vals), max(vals)
        for doc, s in ranking:
            norm = (s - lo) / (hi - lo) if hi > lo else 1.0
            scores[doc] = scores.get(doc, 0.0) + w * norm
    return sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
