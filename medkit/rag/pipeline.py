"""The hybrid retriever: BM25 + dense, fused, with optional query rewriting."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable

from .fusion import reciprocal_rank_fusion, weighted_score_fusion
from .sparse import BM25Index

MAX_QUERY_CHARS = 2000
# Weighted fusion leaning on the dense scores beat RRF on the course questions and on MedQuAD in
# 06_rag (recall@5 0.979 vs 0.953 on the course questions); RRF stays available for comparison.
DEFAULT_FUSION, DEFAULT_WEIGHTS = "weighted", (0.3, 0.7)


@dataclass
class HybridRetriever:
    bm25: BM25Index
    dense: Any  # DenseIndex (or anything with .search(query, k))
    rewrite: Callable[[str], str] | None = None
    fusion: str = DEFAULT_FUSION  # weighted | rrf
    weights: tuple[float, float] = DEFAULT_WEIGHTS
    timings: dict[str, list[float]] = field(default_factory=dict)
    reranker: Any = None  # rerank.load(...): mode="rerank" re-scores the hybrid top ``rerank_pool``
    texts: dict[str, str] = field(default_factory=dict)  # evidence id -> text, for the reranker
    rerank_pool: int = 10

    @contextmanager
    def _timed(self, stage: str):
        start = time.perf_counter()
        yield
        self.timings.setdefault(stage, []).append((time.perf_counter() - start) * 1000)

    def search(self, query: str, k: int = 10, mode: str = "hybrid", use_rewrite: bool = True) -> list[tuple[str, float]]:
        """``mode``: bm25, dense, hybrid, or rerank (the hybrid's top ``rerank_pool`` re-ordered by
        the cross-encoder). Raises ValueError on an empty or over-long query."""
        if not query or not query.strip():
            raise ValueError("empty query")
        if len(query) > MAX_QUERY_CHARS:
            raise ValueError(f"query of {len(query)} characters is over the {MAX_QUERY_CHARS}-character limit")
        if mode == "rerank":
            if self.reranker is None:
                raise ValueError("mode='rerank' needs a reranker (HybridRetriever.reranker)")
            pool = self.search(query, max(k, self.rerank_pool), "hybrid", use_rewrite)
            with self._timed("rerank"):
                # the cross-encoder reads the user's own words: rewriting only helps the first stage
                return self.reranker.rerank(query, pool, self.texts)[:k]
        with self._timed("rewrite"):
            q = self.rewrite(query) if (use_rewrite and self.rewrite) else query
        rankings = []
        for stage, index in (("bm25", self.bm25), ("dense", self.dense)):
            if mode in (stage, "hybrid"):
                with self._timed(stage):
                    rankings.append(index.search(q, k))
        if mode != "hybrid":
            return rankings[0]
        with self._timed("fusion"):
            if self.fusion == "rrf":
                return reciprocal_rank_fusion(rankings, top=k)
            return weighted_score_fusion(rankings, list(self.weights), top=k)
