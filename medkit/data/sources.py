"""Which data a training stage reads: the profile decides.

A stage's ``dataset`` is either ``course:<set>`` (the sets 01_data builds, every split of them)
or a real dataset's hub id that :mod:`medkit.data.loaders` parses: ``openlifescienceai/medmcqa``
(04 on the GPU profiles, as the Phi-2 system trains) or
``FreedomIntelligence/medical-o1-reasoning-SFT`` (05, FEMOZ's data). The profile sets how many
rows (``train_limit``, ``eval_limit``) and may keep the course's held-out cases for scoring
(``eval_dataset``: 05 scores diagnoses against the knowledge base, which only course cases name).

    splits = sources.stage_splits(cfg, data_dir)
    splits.train, splits.validation, splits.test, splits.description
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import loaders, pipeline


@dataclass
class StageData:
    train: list[dict[str, Any]]
    validation: list[dict[str, Any]]
    test: list[dict[str, Any]]
    description: str  # what trained the model, for the notebook and the model card
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def __getitem__(self, split: str) -> list[dict[str, Any]]:
        return getattr(self, split)


def loader_for(dataset: str) -> str:
    """The loader (a key of ``loaders.LOADERS``) of a hub id or loader name."""
    if dataset in loaders.LOADERS:
        return dataset
    for name, (_, hf_id, _, _) in loaders.LOADERS.items():
        if hf_id == dataset:
            return name
    raise ValueError(f"dataset {dataset!r}: no loader in medkit.data.loaders parses it; "
                     f"use course:<set> or one of {sorted(h for _, h, _, _ in loaders.LOADERS.values() if h)}")


def _course(data_dir, name: str) -> dict[str, list[dict[str, Any]]]:
    return {s: pipeline.load_split(data_dir, name, s) for s in ("train", "validation", "test")}


def _real(name: str, source: str | Path, split: str | None, limit: int | None, allow_hub: bool):
    res = loaders.load(name, source, split=split, limit=limit, allow_hub=allow_hub)
    return res.rows, res.dropped


def stage_splits(cfg: dict[str, Any], data_dir, source: str | Path | None = None, seed: int | None = None) -> StageData:
    """The train/validation/test rows of ``cfg``'s stage (``qlora`` or ``cot``).

    ``source``: a local file in the dataset's schema instead of the hub (tests, offline copies).
    Real rows are shuffled with the seed; MedMCQA's train split trains and its validation split
    (its test split has no answers) is halved into validation and test; medical-o1 has one split,
    held out by position after shuffling."""
    dataset = cfg["dataset"]
    seed = cfg.get("seed", 0) if seed is None else seed
    if dataset.startswith("course:"):
        s = _course(data_dir, dataset.split(":", 1)[1])
        return StageData(s["train"], s["validation"], s["test"], f"course {dataset.split(':', 1)[1]} set "
                         f"({Path(str(data_dir)).name}): {len(s['train'])} training rows")
    name = loader_for(dataset)
    n_train, n_eval = int(cfg.get("train_limit", 2000)), int(cfg.get("eval_limit", 200))
    allow_hub = source is None
    src = source if source is not None else dataset
    rng = random.Random(seed)
    dropped: list[dict[str, Any]] = []
    if name == "medmcqa":
        # multiple-answer questions have no single letter to learn
        train, d1 = _real(name, src, None if source else f"train[:{n_train * 2}]", None, allow_hub)
        held, d2 = (train[n_train:], []) if source else _real(name, src, f"validation[:{n_eval * 2}]", None, allow_hub)
        dropped = d1 + d2
        train = [r for r in train[:n_train] if r.get("choice_type", "single") == "single"]
        held = [r for r in held if r.get("choice_type", "single") == "single"]
        rng.shuffle(train)
        rng.shuffle(held)
        train = train[:n_train]
        half = min(len(held) // 2, n_eval)
        validation, test = held[:half], held[half: half + n_eval]
    else:
        rows, dropped = _real(name, src, None, n_train + 2 * n_eval if source is None else None, allow_hub)
        rng.shuffle(rows)
        validation, test, train = rows[:n_eval], rows[n_eval: 2 * n_eval], rows[2 * n_eval: 2 * n_eval + n_train]
    if not train:
        raise loaders.DataError(f"{src}: no usable {name} rows for training ({len(dropped)} dropped)")
    if cfg.get("eval_dataset", "").startswith("course:"):
        course = _course(data_dir, cfg["eval_dataset"].split(":", 1)[1])
        test = course["test"]
    desc = (f"{dataset} ({'local copy ' + str(source) if source else 'Hugging Face hub'}): {len(train)} training, "
            f"{len(validation)} validation rows; test: {cfg.get('eval_dataset') or dataset} ({len(test)} rows)")
    return StageData(train, validation, test, desc, dropped)
