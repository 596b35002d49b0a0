"""A fine-tuned MiniLM bi-encoder as a reranker (issue #19).

The frozen MiniLM finds the right *topic* but often not the right *answer about it*: on MedQuAD's
leave-one-source-out folds two thirds of the hybrid's wrong first answers were another answer of
the same focus (symptoms vs causes vs treatment of the same disease). So the encoder is fine-tuned
on the tuning questions with in-batch negatives (the multiple-negatives ranking loss) plus two hard
negatives per question: another answer of the *same focus* (the question-type confusion) and the
best-scoring wrong BM25 answer. It is then used as a reranker: the hybrid's top ``pool`` candidates
are re-embedded with the fine-tuned encoder, and their cosine is blended with the hybrid's score.

Training cost is bounded by ``steps`` x ``batch_size`` (printed per fold); nothing here reads the
scored questions. The loop is written out (no trainer) so that the cost and what the model sees
are plain.
"""
from __future__ import annotations

import random
import re
import time
from typing import Any, Callable

import numpy as np


def training_triplets(questions: list[str], positives: list[str], texts: dict[str, str], focus: dict[str, str],
                      bm25, seed: int = 0) -> list[dict[str, Any]]:
    """One row per question whose answer is in ``texts``: the question, its answer and up to two hard
    negatives, all taken from ``texts`` (the only passages training may see): another answer of the
    same focus (``focus``: passage id -> focus), and the best-ranked wrong BM25 passage. Passages
    whose text equals the positive's are never negatives."""
    rng = random.Random(seed)
    by_focus: dict[str, list[str]] = {}
    for pid in texts:
        if focus.get(pid):
            by_focus.setdefault(focus[pid], []).append(pid)
    rows = []
    for q, pos in zip(questions, positives):
        if pos not in texts:
            continue
        negs = []
        same = [p for p in by_focus.get(focus.get(pos, ""), []) if p != pos and texts[p] != texts[pos]]
        if same:
            negs.append(rng.choice(same))
        for d, _ in bm25.search(q, 25):
            if d in texts and d != pos and d not in negs and texts[d] != texts[pos]:
                negs.append(d)
                break
        rows.append({"anchor": q, "positive_id": pos, "negative_ids": negs})
    return rows


def finetune(triplets: list[dict[str, Any]], texts: dict[str, str], base: str | None = None, steps: int = 60,
             batch_size: int = 16, max_seq_length: int = 128, lr: float = 3e-5, scale: float = 20.0,
             train_layers: int | None = 3, threads: int | None = 2, seed: int = 0,
             log: Callable[[str], None] | None = None):
    """Fine-tune a fresh copy of ``base`` (the offline all-MiniLM-L6-v2 by default) for ``steps``
    steps of ``batch_size`` questions (cycling over ``triplets``, shuffled). Loss: softmax over the
    batch's positives and hard negatives (each question's own answer is its label; a candidate with
    the same text as the label is masked). Only the top ``train_layers`` transformer layers are trained
    (``None``: every layer); the embeddings always stay frozen (half the parameters, and vocabulary
    the other sources may never use), so the backward pass stops early. Returns ``(model, report)``; ``report`` states
    the examples, steps, seconds and the loss at the start and end."""
    import torch
    from sentence_transformers import SentenceTransformer

    from ..metrics import minilm_path

    if not triplets:
        raise ValueError("fine-tuning the reranker needs at least one training question")
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    model = SentenceTransformer(base or minilm_path(), device="cpu")
    model.max_seq_length = max_seq_length
    n_layers = model[0].auto_model.config.num_hidden_layers
    trained = set(range(n_layers - train_layers, n_layers)) if train_layers is not None else set(range(n_layers))
    for name, p in model.named_parameters():
        layer = re.search(r"encoder\.layer\.(\d+)\.", name)
        p.requires_grad_(bool(layer) and int(layer.group(1)) in trained)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, steps // 10)))
    order = list(range(len(triplets)))
    rng = random.Random(seed)
    rng.shuffle(order)
    model.train()

    def embed(strings: list[str]):
        feats = model.preprocess(strings)
        return torch.nn.functional.normalize(model(feats)["sentence_embedding"], dim=-1)

    losses, cursor = [], 0
    for _ in range(steps):
        if cursor + batch_size > len(order):
            rng.shuffle(order)
            cursor = 0
        batch = [triplets[i] for i in order[cursor: cursor + batch_size]]
        cursor += batch_size
        cand_ids = [t["positive_id"] for t in batch] + [n for t in batch for n in t["negative_ids"]]
        q = embed([t["anchor"] for t in batch])
        c = embed([texts[i] for i in cand_ids])
        logits = scale * q @ c.T
        # a candidate whose text is the question's own answer (duplicates in the file) is not a negative
        mask = torch.tensor([[texts[cid] == texts[t["positive_id"]] and j != r for j, cid in enumerate(cand_ids)]
                             for r, t in enumerate(batch)])
        logits = logits.masked_fill(mask, -1e4)
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(batch)))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    head = max(1, min(5, len(losses) // 4))
    report = {"examples": len(triplets), "steps": steps, "train_layers": len(trained), "batch_size": batch_size, "max_seq_length": max_seq_length,
              "lr": lr, "train_s": time.perf_counter() - t0, "loss_first": float(np.mean(losses[:head])),
              "loss_last": float(np.mean(losses[-head:])),
              "hard_negatives": sum(len(t["negative_ids"]) for t in triplets)}
    if log:
        log(f"encoder reranker: {steps} steps x {batch_size} questions in {report['train_s']:.0f} s, "
            f"loss {report['loss_first']:.3f} -> {report['loss_last']:.3f}")
    return model, report


def for_inference(model, int8: bool = True):
    """The fine-tuned encoder for reranking: with ``int8``, every ``Linear`` quantised to int8 as
    the tiny profile's embedder is (about 3x faster on the CPU)."""
    if not int8:
        return model
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)


class EncoderReranker:
    """Re-scores the hybrid's (id, fused score) candidates: ``blend`` x the fused score (min-max over
    the candidates) + (1 - ``blend``) x the fine-tuned encoder's cosine (min-max over the candidates).
    Each call embeds the query and the candidates it has not embedded before (``cache=False``: all
    of them, the cost a deployment without stored fine-tuned vectors pays)."""

    def __init__(self, model, blend: float = 0.0, cache: bool = True, batch_size: int = 32):
        self.model, self.blend, self.cache, self.batch_size = model, blend, cache, batch_size
        self._vec: dict[str, np.ndarray] = {}

    def _embed(self, strings: list[str]) -> np.ndarray:
        return np.asarray(self.model.encode(strings, batch_size=self.batch_size, normalize_embeddings=True,
                                            show_progress_bar=False), dtype=np.float32)

    def rerank(self, query: str, candidates: list[tuple[str, float]], texts: dict[str, str],
               top: int | None = None) -> list[tuple[str, float]]:
        cands = [(c, s) for c, s in candidates if c in texts]
        if not cands:
            return []
        if not self.cache:
            self._vec.clear()
        todo = [c for c, _ in cands if c not in self._vec]
        if todo:
            self._vec.update(zip(todo, self._embed([texts[c] for c in todo])))
        q = self._embed([query])[0]
        cos = np.array([float(self._vec[c] @ q) for c, _ in cands])
        fused = np.array([s for _, s in cands], dtype=float)
        score = (1 - self.blend) * _minmax(cos) + self.blend * _minmax(fused)
        ranked = sorted(zip((c for c, _ in cands), score.tolist()), key=lambda x: -x[1])
        return ranked[:top] if top else ranked


def _minmax(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.ones_like(x)
