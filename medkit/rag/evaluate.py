"""Retrieval evaluation: the course knowledge base's held-out questions, and any MedQuAD-schema
file (each question must find its own answer document).

    python -m medkit.rag evaluate --data ../shared/data/medquad.jsonl [--limit 2000]

prints JSON: recall@1/5/10, MRR@10 and nDCG@10 per retriever, with and without rewriting.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

from ..kb import KnowledgeBase
from . import dense, fusion, metrics, pipeline, query, sparse

# which passage section answers which question type
SECTION_OF = {"symptoms": "symptoms", "causes": "overview", "diagnosis": "diagnosis", "treatment": "treatment",
              "red_flags": "red_flags", "department": "overview", "indications": "overview", "dose": "dose",
              "contraindications": "cautions", "side_effects": "side_effects"}


def relevant_passage(row: dict[str, Any], kb: KnowledgeBase) -> set[str]:
    """The evidence id that answers a course QA row."""
    if row["qtype"] == "interaction":
        a, b = row["topic"].split("+")
        return {f"ddi.{a}.{b}"}
    kind = "cond" if row["topic"] in kb.conditions else "drug"
    return {f"{kind}.{row['topic']}.{SECTION_OF[row['qtype']]}"}


def build(chunks: list[dict[str, Any]], encoder, client, analyzer: query.QueryAnalyzer | None = None,
          fusion: str = pipeline.DEFAULT_FUSION,
          weights: tuple[float, float] = pipeline.DEFAULT_WEIGHTS, index_dir: str | Path | None = None,
          embedder: str = "", log=print) -> tuple[pipeline.HybridRetriever, dict]:
    """Index ``chunks`` with BM25 and dense; returns the retriever and build timings. With
    ``index_dir`` the dense index is persistent (``client`` is then unused): reloaded without
    re-embedding when the content hash matches, rebuilt with a message otherwise."""
    import chromadb  # noqa: F401 - imported before the clock starts: ~1.3 s once per process, not per document

    t = time.perf_counter()
    bm25 = sparse.BM25Index(chunks)
    t_bm25 = time.perf_counter() - t
    t = time.perf_counter()
    if index_dir is not None:
        dn = dense.open_index(chunks, encoder, index_dir, embedder or "unnamed", log=log)
    else:
        dn = dense.DenseIndex(chunks, encoder, client)
    t_dense = time.perf_counter() - t
    timing = {"docs": len(chunks), "bm25_s": t_bm25, "dense_s": t_dense, "dense_status": dn.status,
              "docs_per_s": len(chunks) / (t_bm25 + t_dense)}
    return pipeline.HybridRetriever(bm25, dn, rewrite=analyzer.enrich if analyzer else None,
                                    fusion=fusion, weights=weights, texts=dn.texts), timing


def evaluate(retriever: pipeline.HybridRetriever, questions: list[str], relevant: list[set[str]],
             modes=("bm25", "dense", "hybrid"), rewrites=(False, True), k: int = 10) -> list[dict[str, Any]]:
    rows = []
    retriever.dense.cache_queries = True  # the same query is embedded once across modes
    try:
        for mode in modes:
            for rw in rewrites:
                if rw and retriever.rewrite is None:
                    continue
                runs = [([d for d, _ in retriever.search(q, k, mode, rw)], g) for q, g in zip(questions, relevant)]
                rows.append({"retriever": mode, "rewrite": rw, **metrics.summarize(runs)})
    finally:
        retriever.dense.cache_queries = False
    return rows


def tune_fusion(retriever: pipeline.HybridRetriever, questions: list[str], relevant: list[set[str]],
                grid=(0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5), use_rewrite: bool = True, k: int = 10) -> dict[str, Any]:
    """Choose the BM25 weight of weighted fusion on *tuning* questions (never the test ones):
    each retriever is queried once per question and the rankings are fused for every weight in
    ``grid``; the best recall@5 wins (ties: MRR@10, then the smaller BM25 weight)."""
    q_runs = []
    for q in questions:
        qq = retriever.rewrite(q) if (use_rewrite and retriever.rewrite) else q
        pool = max(k, retriever.fusion_pool)
        q_runs.append((retriever.bm25.search(qq, pool), retriever.dense.search(qq, pool)))
    scores = []
    for w in grid:
        runs = [([d for d, _ in fusion.weighted_score_fusion([b, dn], [w, 1 - w], top=k)], g)
                for (b, dn), g in zip(q_runs, relevant)]
        m = metrics.summarize(runs)
        scores.append({"bm25_weight": w, "recall@5": m["recall@5"], "mrr@10": m["mrr@10"]})
    best = max(scores, key=lambda r: (r["recall@5"], r["mrr@10"], -r["bm25_weight"]))
    return {"weights": (best["bm25_weight"], round(1 - best["bm25_weight"], 3)), "grid": scores,
            "questions": len(questions)}


def group_split(rows: list[dict[str, Any]], dev_share: float = 0.25, key: str = "topic") -> tuple[list, list]:
    """Split rows into (dev, test) by a stable hash of ``key`` (MedQuAD's focus), so that no
    topic has questions on both sides."""
    dev, test = [], []
    for r in rows:
        h = int(hashlib.sha256(str(r.get(key) or r["id"]).encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (dev if h < dev_share else test).append(r)
    return dev, test


def medquad_eval(rows: list[dict[str, Any]], encoder, client, limit: int | None = None,
                 max_words: int = 120, reranker=None, tune: bool = True, rerank_train: bool = False,
                 tune_limit: int = 1500, seed: int = 0) -> list[dict[str, Any]]:
    """Each MedQuAD question must retrieve its own answer among all the answers (cut to
    ``max_words``). Questions are split into dev and test grouped by focus; the fusion weight is
    tuned on dev and every retriever is scored on test, weighted and RRF hybrids (and the
    reranker when given) included. ``rerank_train`` trains a query adapter on (at most
    ``tune_limit``) dev questions, negatives from dev answers only, and scores it on test. Each row
    says the weights used. Files under 200 questions are scored whole with the default weights
    (and ``rerank_train`` then reports the reranker as skipped: nothing to train it on).
    :mod:`medkit.rag.lso` is the protocol for files with several sources."""
    from .lso import passage

    rows = rows[:limit] if limit else rows
    docs = [{"id": r["id"], "text": passage(r, max_words, titles=False)} for r in rows]
    retriever, _ = build(docs, encoder, client)
    # below ~200 questions a dev split is too small to tune on: score every question, default weights
    dev, test = group_split(rows) if (tune and len(rows) >= 200) else ([], rows)
    if dev and test:
        retriever.weights = tune_fusion(retriever, [r["question"] for r in dev], [{r["id"]} for r in dev],
                                        use_rewrite=False)["weights"]
    else:
        test = rows
    questions, relevant = [r["question"] for r in test], [{r["id"]} for r in test]
    table = evaluate(retriever, questions, relevant, rewrites=(False,))
    if reranker is None and rerank_train and dev:
        import random

        from . import rerank

        pool = random.Random(seed).sample(dev, min(tune_limit, len(dev)))
        dev_texts = {r["id"]: retriever.texts[r["id"]] for r in dev}
        trip = rerank.hard_negative_triplets([r["question"] for r in pool], [{r["id"]} for r in pool], dev_texts,
                                             retriever.bm25, seed=seed)
        weight, _ = rerank.train_query_adapter(retriever.dense, trip, [t["positive_id"] for t in trip],
                                               [t["negative_id"] for t in trip], epochs=100, lr=1e-2, seed=seed)
        reranker = rerank.QueryAdapterReranker(retriever.dense, weight)
    skipped = []
    if reranker is not None:
        retriever.reranker = reranker
        table += evaluate(retriever, questions, relevant, ("rerank",), (False,))
    elif rerank_train:
        skipped = [{"retriever": "rerank", "skipped": "no dev questions to train the reranker on "
                                                      "(files under 200 rows are scored whole)"}]
    retriever.fusion = "rrf"
    table += [{**r, "retriever": "hybrid (RRF)"} for r in evaluate(retriever, questions, relevant, ("hybrid",), (False,))]
    for r in table:
        r.update(corpus=len(docs), dev_questions=len(dev), fusion_weights=list(retriever.weights))
    return table + skipped
