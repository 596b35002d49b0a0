"""BM25 with ``bm25s`` over the medical-aware tokens."""
from __future__ import annotations

from typing import Any

from .text import tokenize


class BM25Index:
    def __init__(self, chunks: list[dict[str, Any]], k1: float = 1.5, b: float = 0.75):
        import bm25s

        self.ids = [c["id"] for c in chunks]
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index([tokenize(c["text"]) for c in chunks], show_progress=False)

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        tokens = tokenize(query)
        if not tokens:
            return []
        k = min(k, len(self.ids))
        docs, scores = self.retriever.retrieve([tokens], k=k, show_progress=False, n_threads=1)
        return [(self.ids[int(d)], float(s)) for d, s in zip(docs[0], scores[0]) if float(s) > 0]
