"""The hybrid retriever: BM25 + dense, fused, with optional query rewriting."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .fusion import reciprocal_rank_fusion, weighted_score_fusion
from .sparse import BM25Index

MAX_QUERY_CHARS = 2000


@dataclass
class HybridRetriever:
    bm25: BM25Index
    dense: Any  # DenseIndex (or anything with .search(query, k))
    rewrite: Callable[[str], str] | None = None
    fusion: str = "rrf"  # rrf | weighted
    weights: tuple[float, float] = (0.5, 0.5)
    timings: dict[str, list[float]] = field(default_factory=dict)

    def _t(self, stage: str, start: float) -> None:
        self.timings.setdefault(stage, []).append((time.perf_counter() - start) * 1000)

    def search(self, query: str, k: int = 10, mode: str = "hybrid", use_rewrite: bool = True) -> list[tuple[str, float]]:
        """``mode``: bm25, dense or hybrid. Raises ValueError on an empty or over-long query."""
        if not query or not query.strip():
            raise ValueError("empty query")
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"query of {len(query)} characters is over the {MAX_QUERY_CHARS}-character limit")
        t = time.perf_counter()
        q = self.rewrite(query) if (use_rewrite and self.rewrite) else query
        self._t("rewrite", t)
        if mode == "bm25":
            t = time.perf_counter()
            out = self.bm25.search(q, k)
            self._t("bm25", t)
            return out
        if mode == "dense":
            t = time.perf_counter()
            out = self.dense.search(q, k)
            self._t("dense", t)
            return out
        t = time.perf_counter()
        sparse = self.bm25.search(q, k)
        self._t("bm25", t)
        t = time.perf_counter()
        dense = self.dense.search(q, k)
        self._t("dense", t)
        t = time.perf_counter()
        fused = (reciprocal_rank_fusion([sparse, dense], top=k) if self.fusion == "rrf"
                 else weighted_score_fusion([sparse, dense], list(self.weights), top=k))
        self._t("fusion", t)
        return fused
