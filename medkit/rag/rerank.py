"""Reranking: the retriever's top 10 re-scored by a second model and cut to the top 3.

On GPU profiles that model is a pretrained cross-encoder (a BGE reranker: query and passage read
together in one forward pass). On the CPU no pretrained cross-encoder can be downloaded, and
training one here did not work in a 2-core budget (issue #6's closing note has the trials): a
cross-encoder built on MiniLM starts with a random classification head and, after 100 steps on
1,600 pairs, ranked far worse than the hybrid it was meant to improve; fine-tuning the whole
MiniLM bi-encoder costs seconds per step.

So the CPU reranker is a **query adapter**: a linear map on the frozen MiniLM's query embedding,
trained on the course's training questions against their own passage, a BM25 hard negative (the
best-scoring wrong passage) and every other passage of the set. It learns the distinctions the
hybrid misses (a dose question wants the dose passage, not the overview) in seconds, and re-scores
the top 10 with the passage vectors already stored in the dense index.

On sources it was not trained on (MedQuAD leave one source out, issue #19) the adapter moved
recall@1 by less than 0.01; :mod:`medkit.rag.encoder_rerank` fine-tunes MiniLM itself (top layers,
a bounded number of steps) and is the reranker that ``medkit.rag.lso`` trains per fold.
"""
from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import numpy as np

ADAPTER = "query-adapter"


def hard_negative_triplets(questions: list[str], positives: list[set[str]], texts: dict[str, str], bm25,
                           negatives: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """(anchor, positive, negative) rows, with the passages' ids: each question with its own passage and one of the
    ``negatives`` highest-ranked BM25 passages that are not relevant and are in ``texts`` (a random
    passage of ``texts`` when BM25 finds none). Questions whose passage is not in ``texts`` are skipped."""
    rng = random.Random(seed)
    ids = list(texts)
    rows = []
    for q, pos in zip(questions, positives):
        pos = sorted(p for p in pos if p in texts)
        if not pos:
            continue
        # only passages of ``texts`` can be negatives: BM25 may index more (the held-out source's
        # answers in medkit.rag.lso), and those must not reach training
        negs = [d for d, _ in bm25.search(q, negatives + len(pos) + 20) if d not in pos and d in texts][:negatives]
        while len(negs) < negatives:
            d = rng.choice(ids)
            if d not in pos and d not in negs:
                negs.append(d)
        for n in negs:
            p = rng.choice(pos)
            rows.append({"anchor": q, "positive": texts[p], "negative": texts[n], "positive_id": p, "negative_id": n})
    return rows


class CrossEncoderReranker:
    """A pretrained cross-encoder (``BAAI/bge-reranker-base`` on GPU profiles) re-scoring
    (id, score) candidates: query and passage are read together in one forward pass."""

    def __init__(self, model: str | Path, device: str = "cpu", max_length: int = 160, batch_size: int = 32):
        from sentence_transformers.cross_encoder import CrossEncoder

        self.model = CrossEncoder(str(model), device=device, max_length=max_length)
        self.batch_size = batch_size

    def rerank(self, query: str, candidates: list[tuple[str, float]], texts: dict[str, str],
               top: int | None = None) -> list[tuple[str, float]]:
        """All candidates re-ordered by the cross-encoder's score (``top`` keeps the first few)."""
        cands = [c for c, _ in candidates if c in texts]
        if not cands:
            return []
        scores = self.model.predict([(query, texts[c]) for c in cands], batch_size=self.batch_size,
                                    show_progress_bar=False)
        ranked = sorted(zip(cands, (float(s) for s in scores)), key=lambda x: -x[1])
        return ranked[:top] if top else ranked



def train_query_adapter(dense_index, triplets: list[dict[str, Any]], positive_ids: list[str], negative_ids: list[str],
                        epochs: int = 300, lr: float = 3e-3, temperature: float = 0.05, reg: float = 1.0,
                        seed: int = 0) -> tuple[np.ndarray, dict[str, Any]]:
    """A linear map ``W`` (384 x 384, starting at the identity) applied to the *query* embedding of
    the frozen encoder, trained so that each training question scores its own passage above its
    BM25 hard negative and the other passages of the batch (softmax over them, temperature
    ``temperature``), with ``reg * ||W - I||^2`` keeping it near the original space. Passage
    vectors come from the dense index (nothing is re-embedded); only the questions are embedded.
    Seconds on a CPU, where fine-tuning the whole encoder takes many minutes."""
    import torch

    torch.manual_seed(seed)
    q = torch.tensor(np.asarray(dense_index.encoder.encode([t["anchor"] for t in triplets], batch_size=64,
                                                           normalize_embeddings=True, show_progress_bar=False)))
    vec = dense_index.vectors(sorted(set(positive_ids) | set(negative_ids)))
    p = torch.tensor(np.stack([vec[i] for i in positive_ids]))
    n = torch.tensor(np.stack([vec[i] for i in negative_ids]))
    dim = q.shape[1]
    eye = torch.eye(dim)
    w = torch.nn.Parameter(eye.clone())
    opt = torch.optim.Adam([w], lr=lr)
    cands = torch.cat([p, n])  # every positive and negative is a candidate for every question
    labels = torch.arange(len(q))
    t0 = time.perf_counter()
    losses = []

    def loss_at(weight):
        qq = torch.nn.functional.normalize(q @ weight.T, dim=1)
        return torch.nn.functional.cross_entropy(qq @ cands.T / temperature, labels)

    with torch.no_grad():
        start = float(loss_at(eye))
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_at(w) + reg * ((w - eye) ** 2).sum() / dim
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    with torch.no_grad():
        end = float(loss_at(w))
    report = {"examples": len(triplets), "epochs": epochs, "train_s": time.perf_counter() - t0,
              "loss_first": start, "loss_last": end, "losses": losses, "lr": lr, "temperature": temperature, "reg": reg}
    return w.detach().numpy(), report


class QueryAdapterReranker:
    """Re-scores (id, score) candidates by cosine between the adapted query ``W q`` and the
    passages' stored vectors (read from the dense index once per id)."""

    def __init__(self, dense_index, weight: np.ndarray):
        self.dense, self.weight = dense_index, np.asarray(weight, dtype=np.float32)
        self._passages: dict[str, np.ndarray] = {}

    def rerank(self, query: str, candidates: list[tuple[str, float]], texts: dict[str, str],
               top: int | None = None) -> list[tuple[str, float]]:
        cands = [c for c, _ in candidates]
        if not cands:
            return []
        todo = [c for c in cands if c not in self._passages]
        if todo:
            self._passages.update(self.dense.vectors(todo))
        q = self.weight @ np.asarray(self.dense.embed_query(query), dtype=np.float32)
        q /= np.linalg.norm(q) or 1.0
        ranked = sorted(((c, float(self._passages[c] @ q)) for c in cands if c in self._passages), key=lambda x: -x[1])
        return ranked[:top] if top else ranked


def load(name: str, device: str = "cpu", dense_index=None, weight: np.ndarray | None = None):
    """The profile's reranker: ``query-adapter`` (the map made by :func:`train_query_adapter`,
    over ``dense_index``), or else a cross-encoder name or folder."""
    if name == ADAPTER:
        if dense_index is None or weight is None:
            raise ValueError("reranker 'query-adapter' needs the dense index and the trained weight")
        return QueryAdapterReranker(dense_index, weight)
    return CrossEncoderReranker(name, device)
