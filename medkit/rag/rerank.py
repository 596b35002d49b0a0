"""Cross-encoder reranking: the retriever's top 10 re-scored jointly (query and passage in one
forward pass) and cut to the top 3.

On GPU profiles the reranker is a pretrained BGE reranker. On the CPU no pretrained
cross-encoder can be downloaded, so :func:`train` makes one here: it starts from the offline
MiniLM encoder (its classification head starts untrained) and learns from the course's
question → passage pairs, with BM25's best-scoring *wrong* passages as hard negatives. The result
is cached by a hash of its training data and settings, like the tiny base models.
"""
from __future__ import annotations

import hashlib
import json
import random
import time
from pathlib import Path
from typing import Any, Callable

from ..metrics import OFFLINE_MINILM, minilm_path

TRAIN_HERE = "train-here"


def hard_negative_pairs(questions: list[str], positives: list[set[str]], texts: dict[str, str], bm25,
                        negatives: int = 3, seed: int = 0) -> list[dict[str, Any]]:
    """(query, passage, label) rows: each question's own passage(s) labelled 1, and its
    ``negatives`` highest-ranked BM25 passages that are not relevant labelled 0 (random passages
    when BM25 finds too few). Questions whose passage is not in ``texts`` are skipped."""
    rng = random.Random(seed)
    ids = list(texts)
    rows = []
    for q, pos in zip(questions, positives):
        pos = [p for p in pos if p in texts]
        if not pos:
            continue
        for p in pos:
            rows.append({"query": q, "passage": texts[p], "label": 1.0})
        negs = [d for d, _ in bm25.search(q, negatives + len(pos) + 5) if d not in pos][:negatives]
        while len(negs) < negatives:
            d = rng.choice(ids)
            if d not in pos and d not in negs:
                negs.append(d)
        rows += [{"query": q, "passage": texts[d], "label": 0.0} for d in negs]
    return rows


def _fingerprint(rows: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for r in rows:
        h.update(f"{r['query']}\0{r['passage']}\0{r['label']}\n".encode())
    return h.hexdigest()[:16]


def train(rows: list[dict[str, Any]], cache_dir: str | Path, base: str = OFFLINE_MINILM, epochs: int = 1,
          batch_size: int = 32, lr: float = 5e-5, max_length: int = 160, seed: int = 0,
          log: Callable[[str], None] = print) -> tuple[Path, dict[str, Any]]:
    """Fine-tune a cross-encoder on ``rows`` (binary cross-entropy on the label) with
    sentence-transformers' ``CrossEncoderTrainer``. Returns (model folder, training report);
    a folder already made from the same rows and settings is reused."""
    settings = {"base": base, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                "max_length": max_length, "seed": seed, "version": 1}
    out = Path(cache_dir) / f"reranker-{_fingerprint(rows, settings)}"
    report_file = out / "medkit_reranker.json"
    if report_file.exists():
        report = json.loads(report_file.read_text())
        log(f"reranker: reusing {out} (trained on {report['pairs']} pairs in {report['train_s']:.0f} s)")
        return out, {**report, "cached": True}

    from datasets import Dataset
    from sentence_transformers.cross_encoder import (CrossEncoder, CrossEncoderTrainer,
                                                     CrossEncoderTrainingArguments)
    from sentence_transformers.cross_encoder.losses import BinaryCrossEntropyLoss

    model = CrossEncoder(minilm_path() if base == OFFLINE_MINILM else base, num_labels=1,
                         max_length=max_length, device="cpu")
    data = Dataset.from_list(rows).shuffle(seed=seed)
    args = CrossEncoderTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=epochs, per_device_train_batch_size=batch_size,
        learning_rate=lr, warmup_steps=max(1, int(0.1 * len(rows) / batch_size)), logging_steps=10,
        save_strategy="no", report_to="none", seed=seed, use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=False)
    trainer = CrossEncoderTrainer(model=model, args=args, train_dataset=data,
                                  loss=BinaryCrossEntropyLoss(model))
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    model.save_pretrained(str(out))
    report = {"base": base, "pairs": len(rows), "positives": int(sum(r["label"] for r in rows)),
              "steps": trainer.state.global_step, "train_s": train_s, "loss_first": losses[0] if losses else None,
              "loss_last": losses[-1] if losses else None, "losses": losses, **settings}
    report_file.write_text(json.dumps(report, indent=2))
    log(f"reranker: trained on {len(rows)} pairs, {report['steps']} steps in {train_s:.0f} s, "
        f"loss {report['loss_first']} -> {report['loss_last']}")
    return out, {**report, "cached": False}


class Reranker:
    """``Reranker(model)`` re-scores (id, score) candidates with a cross-encoder and keeps ``top``.
    ``model`` is a folder (trained here) or a hub id (``BAAI/bge-reranker-base`` on GPU)."""

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
