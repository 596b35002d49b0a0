"""How retrieval cost grows with the corpus: build time and query latency at 1k, 10k, 50k documents.

The larger corpora are synthetic copies of the course chunks (each copy gets its own id and a
few words of its own, so BM25 sees distinct documents). Embedding is linear in the number of
documents, so it is measured once on real chunks and scaled; what grows non-linearly (BM25
indexing, chroma's HNSW inserts, query latency) is measured at every size.

    python -m medkit.rag scale --sizes 1000,10000,50000
"""
from __future__ import annotations

import random
import tempfile
import time
from typing import Any

import numpy as np

from . import dense, pipeline, sparse

_FILLER = ("clinic review note patient follow-up advice summary leaflet guidance record update "
           "version section reference adult child community hospital").split()


def synthetic_corpus(chunks: list[dict[str, Any]], n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        c = chunks[i % len(chunks)]
        extra = " ".join(rng.sample(_FILLER, 3))
        out.append({"id": f"{c['id']}~{i}", "text": f"{c['text']} {extra}", "source_id": c["id"]})
    return out


def measure(chunks: list[dict[str, Any]], encoder, queries: list[str], sizes=(1000, 10000, 50000),
            embed_sample: int = 500, n_queries: int = 100, seed: int = 0, warmup: int = 5,
            log=print) -> list[dict[str, Any]]:
    """Per size: BM25 index seconds, chroma insert seconds, embedding seconds (measured rate ×
    size), build docs/s, and query p50/p95 (rewrite off, no reranker) over ``n_queries``, after
    ``warmup`` untimed queries."""
    sample = [c["text"] for c in chunks[:embed_sample]]
    t = time.perf_counter()
    base = encoder.encode(sample, batch_size=16, normalize_embeddings=True, show_progress_bar=False)
    embed_rate = len(sample) / (time.perf_counter() - t)
    rng = np.random.default_rng(seed)
    rows = []
    for n in sizes:
        corpus = synthetic_corpus(chunks, n, seed)
        # reuse real embeddings with a little noise: the same geometry chroma will see at scale
        emb = base[np.arange(n) % len(base)] + rng.normal(0, 0.01, (n, base.shape[1])).astype(base.dtype)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        t = time.perf_counter()
        bm25 = sparse.BM25Index(corpus)
        bm25_s = time.perf_counter() - t
        with tempfile.TemporaryDirectory() as tmp:
            client = dense.chroma_client(tmp)
            index = dense.DenseIndex([], encoder, client, collection=f"scale{n}")
            t = time.perf_counter()
            for i in range(0, n, 1000):
                index.add(corpus[i: i + 1000], emb[i: i + 1000])
            insert_s = time.perf_counter() - t
            retriever = pipeline.HybridRetriever(bm25, index)
            for q in queries[:warmup]:  # untimed: chroma loads a new collection's index on first use
                retriever.search(q, 10, "hybrid", use_rewrite=False)
            lat = []
            for q in queries[:n_queries]:
                t = time.perf_counter()
                retriever.search(q, 10, "hybrid", use_rewrite=False)
                lat.append((time.perf_counter() - t) * 1000)
            del client, index, retriever
        embed_s = n / embed_rate
        row = {"docs": n, "bm25_index_s": bm25_s, "chroma_insert_s": insert_s, "embed_s_scaled": embed_s,
               "build_s": bm25_s + insert_s + embed_s, "build_docs_per_s": n / (bm25_s + insert_s + embed_s),
               "query_p50_ms": float(np.percentile(lat, 50)), "query_p95_ms": float(np.percentile(lat, 95)),
               "embed_docs_per_s": embed_rate}
        log(f"{n:>6} docs: build {row['build_s']:.1f} s (bm25 {bm25_s:.1f}, chroma {insert_s:.1f}, "
            f"embed {embed_s:.1f} scaled), query p95 {row['query_p95_ms']:.1f} ms")
        rows.append(row)
    return rows
