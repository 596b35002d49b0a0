"""Leave-one-source-out (LSO) retrieval evaluation: does retrieval hold on a source it was never
tuned on?

One index (BM25 + dense) holds every answer of the file, as a deployed assistant's would. Each
fold holds out one source (MedQuAD's NIH sites): its questions are scored, and anything learnt
(the tuned fusion weight of the comparison row, the reranker) sees only the *other* sources'
questions, minus every question whose focus also appears in the held-out source (grouped by
focus), and the reranker's negatives come only from the other sources' answers. The report gives
each fold and the mean over folds.

    python -m medkit.rag evaluate --data ../shared/data/medquad.jsonl [--rerank]

Each question is sent to BM25 and to the dense index once (the pipeline's own ``search``); the
fused rankings are made from those pools with the same fusion functions as
:class:`~medkit.rag.pipeline.HybridRetriever`, so the ``hybrid`` row is what the retriever returns.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from . import encoder_rerank, fusion, metrics, pipeline, rerank

SOURCE_KEY, GROUP_KEY = "medquad_source", "topic"


@dataclass
class Fold:
    source: str
    tune: list[int]  # row indices: other sources, foci of the held-out source removed
    test: list[int]  # row indices of the held-out source


def folds(rows: list[dict[str, Any]], key: str = SOURCE_KEY, group: str = GROUP_KEY) -> list[Fold]:
    """One fold per value of ``key``. Raises ValueError naming the field when a row lacks it or
    there are fewer than two sources."""
    missing = [r.get("id", i) for i, r in enumerate(rows) if not r.get(key)]
    if missing:
        raise ValueError(f"{len(missing)} rows have no `{key}` (first: {missing[0]!r}); "
                         "leave-one-source-out needs a source per row")
    sources = sorted({r[key] for r in rows})
    if len(sources) < 2:
        raise ValueError(f"leave-one-source-out needs at least 2 values of `{key}`, found {sources}")
    out = []
    for s in sources:
        test = [i for i, r in enumerate(rows) if r[key] == s]
        foci = {str(rows[i].get(group) or rows[i]["id"]).lower() for i in test}
        tune = [i for i, r in enumerate(rows) if r[key] != s and str(r.get(group) or r["id"]).lower() not in foci]
        out.append(Fold(s, tune, test))
    return out


class _KnownQueries:
    """The dense index, with the query embeddings already made (one per question, embedded one
    at a time as the pipeline does): rerankers re-score without embedding each question again."""

    def __init__(self, dense_index, vectors: dict[str, list[float]]):
        self.dense, self.known, self.encoder = dense_index, vectors, dense_index.encoder

    def embed_query(self, query: str) -> list[float]:
        return self.known[query] if query in self.known else self.dense.embed_query(query)

    def vectors(self, ids):
        return self.dense.vectors(ids)


def _pools(retriever: pipeline.HybridRetriever, questions: list[str], log) -> tuple[list, list, dict]:
    """Each question's BM25 and dense candidates (``fusion_pool`` of each), asked once, and its
    query embedding."""
    pool = retriever.fusion_pool
    bm, dn, qvec = [], [], {}
    t = time.perf_counter()
    for n, q in enumerate(questions, 1):
        bm.append(retriever.bm25.search(q, pool))
        qvec[q] = retriever.dense.embed_query(q)
        dn.append(retriever.dense.search_vector(qvec[q], pool))
        if n % 1000 == 0:
            log(f"lso: {n}/{len(questions)} questions retrieved ({time.perf_counter() - t:.0f} s)")
    return bm, dn, qvec


def _weighted(b, d, w: float, k: int = 10) -> list[str]:
    return [x for x, _ in fusion.weighted_score_fusion([b, d], [w, 1 - w], top=k)]


def tune_weight(bm, dn, idx: list[int], gold: list[str], grid=(0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5)) -> float:
    """The BM25 weight with the best recall@5 (ties: MRR@10, then the smaller weight) on ``idx``."""
    best = None
    for w in grid:
        m = metrics.summarize([(_weighted(bm[i], dn[i], w), {gold[i]}) for i in idx])
        key = (m["recall@5"], m["mrr@10"], -w)
        best = max(best, (key, w)) if best else (key, w)
    return best[1]


# the per-fold reranker: MiniLM fine-tuned on the tuning sources (medkit.rag.encoder_rerank), its
# cost bounded by steps x batch_size; the rag section of medkit.config sets these per profile
ENCODER_RERANK = {"method": "encoder", "steps": 30, "batch_size": 16, "max_seq_length": 64, "lr": 1e-4,
                  "train_layers": 3, "pool": 20, "blend": 0.4, "int8": True, "cost_queries": 50,
                  "compare_blends": []}


def run(rows: list[dict[str, Any]], retriever: pipeline.HybridRetriever, use_rerank: bool = False,
        tune_limit: int = 1500, adapter: dict | None = None, extra_rerankers: dict[str, Any] | None = None,
        seed: int = 0, log: Callable[[str], None] = print, reranker: dict | None = None) -> dict[str, Any]:
    """Score every fold. ``retriever`` indexes every row's answer under the row's id (see
    :func:`index`). Rows scored per fold: bm25, dense, hybrid (the pipeline's fusion and default
    weights: what users get), hybrid with the weight tuned on the tuning sources, hybrid (RRF),
    and with ``use_rerank`` the per-fold reranker (``reranker``: settings over
    :data:`ENCODER_RERANK`): by default MiniLM fine-tuned on at most ``tune_limit`` tuning questions
    (and ``steps`` x ``batch_size`` examples) re-scores the hybrid's top ``pool``
    (:mod:`medkit.rag.encoder_rerank`); ``{"method": "query-adapter"}`` is the older query adapter
    (``adapter``: epochs, lr) over the top ``rerank_pool``. Each entry of
    ``extra_rerankers`` (name -> a query-adapter weight trained elsewhere, e.g. on the course's
    questions, or a reranker object such as a pretrained cross-encoder) re-scores the same pool on
    every fold. Returns ``{"folds": [...], "mean": [...], ...}``."""
    adapter = {"epochs": 100, "lr": 1e-2, **(adapter or {})}
    rr_cfg = {**ENCODER_RERANK, **(reranker or {})}
    if rr_cfg["method"] not in ("encoder", "query-adapter"):
        raise ValueError(f"reranker method {rr_cfg['method']!r}: expected 'encoder' or 'query-adapter'")
    focus = {r["id"]: str(r.get(GROUP_KEY) or r["id"]).lower() for r in rows}
    rr_cost: list[float] = []
    fl = folds(rows)
    questions, gold = [r["question"] for r in rows], [r["id"] for r in rows]
    bm, dn, qvec = _pools(retriever, questions, log)
    known = _KnownQueries(retriever.dense, qvec)
    texts = retriever.texts or retriever.dense.texts
    k, pool_k = 10, retriever.rerank_pool
    w_default = retriever.weights[0] if retriever.fusion == "weighted" else None
    rng = np.random.default_rng(seed)
    table, rerank_info = [], []

    def fused(i: int, top: int) -> list[tuple[str, float]]:  # HybridRetriever.search, mode "hybrid"
        if retriever.fusion == "rrf":
            return fusion.reciprocal_rank_fusion([bm[i], dn[i]], top=top)
        return fusion.weighted_score_fusion([bm[i], dn[i]], list(retriever.weights), top=top)

    def hybrid(i: int) -> list[str]:
        return [x for x, _ in fused(i, k)]

    def reranked(rr, i: int, pool: int = pool_k) -> list[str]:  # HybridRetriever.search, mode "rerank"
        return [x for x, _ in rr.rerank(questions[i], fused(i, max(k, pool)), texts)][:k]

    for f in fl:
        tune_idx = [int(i) for i in rng.permutation(f.tune)[:tune_limit]]
        w_tuned = tune_weight(bm, dn, tune_idx, gold)
        rankers: dict[str, Callable[[int], list[str]]] = {
            "bm25": lambda i: [x for x, _ in bm[i][:k]], "dense": lambda i: [x for x, _ in dn[i][:k]],
            "hybrid": hybrid,
            "hybrid, weight tuned on the tuning sources": lambda i, w=w_tuned: _weighted(bm[i], dn[i], w, k),
            "hybrid (RRF)": lambda i: [x for x, _ in fusion.reciprocal_rank_fusion([bm[i], dn[i]], top=k)]}
        if use_rerank and rr_cfg["method"] == "encoder":
            t = time.perf_counter()
            tune_texts = {gold[i]: texts[gold[i]] for i, r in enumerate(rows) if r[SOURCE_KEY] != f.source}
            budget = tune_idx[: rr_cfg["steps"] * rr_cfg["batch_size"]]
            trip = encoder_rerank.training_triplets([questions[i] for i in budget], [gold[i] for i in budget],
                                                    tune_texts, focus, retriever.bm25, seed=seed)
            model, rep = encoder_rerank.finetune(
                trip, tune_texts, steps=rr_cfg["steps"], batch_size=rr_cfg["batch_size"],
                max_seq_length=rr_cfg["max_seq_length"], lr=rr_cfg["lr"], train_layers=rr_cfg["train_layers"],
                seed=seed, log=log)
            rr = encoder_rerank.EncoderReranker(encoder_rerank.for_inference(model, rr_cfg["int8"]), rr_cfg["blend"])
            rankers["hybrid + rerank"] = lambda i, rr=rr: reranked(rr, i, rr_cfg["pool"])
            for b in rr_cfg["compare_blends"]:  # the same fine-tuned model, other blends (vectors shared)
                other = encoder_rerank.EncoderReranker(rr.model, b)
                other._vec = rr._vec
                rankers[f"hybrid + rerank (blend {b})"] = lambda i, other=other: reranked(other, i, rr_cfg["pool"])
            # the cost a query pays: the query and its pool embedded afresh (no stored fine-tuned vectors)
            cold = encoder_rerank.EncoderReranker(rr.model, rr_cfg["blend"], cache=False)
            for i in f.test[: rr_cfg["cost_queries"]]:
                cands = fused(i, rr_cfg["pool"])
                t1 = time.perf_counter()
                cold.rerank(questions[i], cands, texts)
                rr_cost.append((time.perf_counter() - t1) * 1000)
            rerank_info.append({"fold": f.source, "train_questions": len(trip), "train_s": rep["train_s"],
                                "steps": rep["steps"], "loss_first": rep["loss_first"], "loss_last": rep["loss_last"],
                                "fold_s": time.perf_counter() - t})
        elif use_rerank:
            t = time.perf_counter()
            tune_texts = {gold[i]: texts[gold[i]] for i, r in enumerate(rows) if r[SOURCE_KEY] != f.source}
            trip = rerank.hard_negative_triplets([questions[i] for i in tune_idx], [{gold[i]} for i in tune_idx],
                                                 tune_texts, retriever.bm25, seed=seed)
            weight, rep = rerank.train_query_adapter(retriever.dense, trip, [x["positive_id"] for x in trip],
                                                     [x["negative_id"] for x in trip], seed=seed, **adapter)
            rr = rerank.QueryAdapterReranker(known, weight)
            rankers["hybrid + rerank"] = lambda i, rr=rr: reranked(rr, i)
            rerank_info.append({"fold": f.source, "train_questions": len(trip), "train_s": time.perf_counter() - t,
                                "loss_first": rep["loss_first"], "loss_last": rep["loss_last"]})
        for name, extra in (extra_rerankers or {}).items():
            rr = rerank.QueryAdapterReranker(known, extra) if isinstance(extra, np.ndarray) else extra
            rankers[name] = lambda i, rr=rr: reranked(rr, i)
        for name, ranker in rankers.items():
            m = metrics.summarize([(ranker(i), {gold[i]}) for i in f.test])
            table.append({"fold": f.source, "retriever": name, **m, "tune_questions": len(tune_idx),
                          "bm25_weight": w_tuned if "tuned" in name else w_default})
        log(f"lso fold {f.source}: " + ", ".join(f"{r['retriever']} r@5 {r['recall@5']:.3f}"
                                               for r in table if r["fold"] == f.source))
    names = list(dict.fromkeys(r["retriever"] for r in table))
    mean = []
    for name in names:
        rs = [r for r in table if r["retriever"] == name]
        mean.append({"retriever": name, "folds": len(rs), "queries": sum(r["queries"] for r in rs),
                     **{m: float(np.mean([r[m] for r in rs])) for m in ("recall@1", "recall@5", "recall@10", "mrr@10", "ndcg@10")}})
    by = {(r["fold"], r["retriever"]): r for r in table}
    gap = [by[(f.source, "hybrid")]["recall@5"] - by[(f.source, "dense")]["recall@5"] for f in fl]
    return {"protocol": "leave-one-source-out", "corpus": len(rows), "folds": table, "mean": mean,
            "fold_sizes": {f.source: {"scored": len(f.test), "tuning_pool": len(f.tune)} for f in fl},
            "hybrid_minus_dense_recall5_min": float(min(gap)),
            "fusion": {"rule": retriever.fusion, "weights": list(retriever.weights)},
            "reranker": None if not use_rerank else _encoder_report(rr_cfg, tune_limit, rerank_info, rr_cost)
            if rr_cfg["method"] == "encoder" else {
                "method": "query adapter (linear map on the frozen MiniLM query embedding), trained per fold",
                "training_data": f"per fold: up to {tune_limit} questions of the other sources (foci of the held-out "
                                 "source removed), their own answer as positive and a BM25 hard negative drawn "
                                 "from the other sources' answers only; the held-out source is never seen",
                "pool": pool_k, **adapter, "per_fold": rerank_info}}


def _encoder_report(cfg: dict, tune_limit: int, per_fold: list[dict], cost_ms: list[float]) -> dict[str, Any]:
    n = min(tune_limit, cfg["steps"] * cfg["batch_size"])
    return {"method": f"all-MiniLM-L6-v2 fine-tuned per fold (top {cfg['train_layers']} layers, multiple-negatives "
                      f"ranking loss), re-embedding the hybrid's top {cfg['pool']}; score = {cfg['blend']} x hybrid "
                      f"+ {1 - cfg['blend']:.2f} x fine-tuned cosine (each min-max over the pool)",
            "training_data": f"per fold: up to {n} questions of the other sources (foci of the held-out source removed), "
                             f"{cfg['steps']} steps of {cfg['batch_size']}; positive: the question's own answer; hard "
                             "negatives: another answer of the same focus and the best wrong BM25 answer, both from "
                             "the other sources' answers only; the held-out source is never seen",
            **{k: cfg[k] for k in ("steps", "batch_size", "max_seq_length", "lr", "train_layers", "pool", "blend", "int8")},
            "per_fold": per_fold, "train_s_total": float(sum(r["train_s"] for r in per_fold)),
            "query_ms_p50": float(np.percentile(cost_ms, 50)) if cost_ms else None,
            "query_ms_p95": float(np.percentile(cost_ms, 95)) if cost_ms else None, "cost_queries": len(cost_ms)}


def passage(row: dict[str, Any], max_words: int = 120, titles: bool = True) -> str:
    """The text indexed for a row: its answer cut to ``max_words``, after the title of the page it
    comes from (``title``: MedQuAD's focus) when ``titles`` and the row has one, as a search index
    stores a page section with its page's title. The title is the same for every answer of a page,
    so it tells pages apart, never which section answers the question."""
    text = " ".join(row["answer"].split()[:max_words])
    return f"{row['title']}. {text}" if titles and row.get("title") else text


def index(rows: list[dict[str, Any]], encoder, client, max_words: int = 120,
          titles: bool = True) -> tuple[pipeline.HybridRetriever, dict]:
    """Every row's :func:`passage` indexed under the row's id."""
    from .evaluate import build

    docs = [{"id": r["id"], "text": passage(r, max_words, titles)} for r in rows]
    return build(docs, encoder, client)


def fold_table(result: dict[str, Any], metric: str = "recall@5") -> list[dict[str, Any]]:
    """One row per retriever, one column per fold plus the mean: the table the notes print."""
    folds_ = list(result["fold_sizes"])
    by = {(r["fold"], r["retriever"]): r[metric] for r in result["folds"]}
    return [{"retriever": m["retriever"], **{f: by[(f, m["retriever"])] for f in folds_}, "mean": m[metric]}
            for m in result["mean"]]
