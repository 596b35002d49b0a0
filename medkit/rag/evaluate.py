"""Retrieval evaluation: the course knowledge base's held-out questions, and any MedQuAD-schema
file (each question must find its own answer document).

    python -m medkit.rag evaluate --data ../shared/data/medquad.jsonl [--limit 2000]

prints JSON: recall@1/5/10, MRR@10 and nDCG@10 per retriever, with and without rewriting.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ..kb import KnowledgeBase
from . import dense, metrics, pipeline, query, sparse, text

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
    for mode in modes:
        for rw in rewrites:
            if rw and retriever.rewrite is None:
                continue
            runs = [([d for d, _ in retriever.search(q, k, mode, rw)], g) for q, g in zip(questions, relevant)]
            rows.append({"retriever": mode, "rewrite": rw, **metrics.summarize(runs)})
    return rows


def medquad_eval(rows: list[dict[str, Any]], encoder, client, limit: int | None = None,
                 max_words: int = 120) -> list[dict[str, Any]]:
    """Each MedQuAD question must retrieve its own answer (answers cut to ``max_words``); the
    hybrid is scored with weighted fusion and with RRF."""
    rows = rows[:limit] if limit else rows
    docs = [{"id": r["id"], "text": " ".join(r["answer"].split()[:max_words])} for r in rows]
    retriever, _ = build(docs, encoder, client)
    questions, relevant = [r["question"] for r in rows], [{r["id"]} for r in rows]
    table = evaluate(retriever, questions, relevant, rewrites=(False,))
    retriever.fusion = "rrf"
    table += [{**r, "retriever": "hybrid (RRF)"} for r in evaluate(retriever, questions, relevant, ("hybrid",), (False,))]
    return table
