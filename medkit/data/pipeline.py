"""The 01_data pipeline in one call: generate every course set from the knowledge base, clean
it with a drop report, split it by hashed group, augment the training split, check leakage,
and save each set as a Hugging Face dataset plus JSONL."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..kb import KnowledgeBase
from . import augment as aug
from . import clean, generate

VERSION = "1"


def _qa_group(row: dict[str, Any]) -> str:
    # the clinical and lay phrasings of one (topic, question type) stay on one side of a split
    return f"{row['topic']}.{row['qtype']}"


@dataclass
class CourseData:
    sets: dict[str, dict[str, list[dict[str, Any]]]]  # name -> split -> rows
    dropped: list[dict[str, Any]] = field(default_factory=list)
    leakage: list[tuple[str, str]] = field(default_factory=list)
    clusters: int = 0
    version: str = ""

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {split: len(rows) for split, rows in splits.items()} for name, splits in self.sets.items()}

    def total(self, name: str) -> int:
        return sum(len(r) for r in self.sets[name].values())


def build(kb: KnowledgeBase, seed: int = 0, augment_factor: int = 2) -> CourseData:
    """Every course dataset, split and cleaned. Deterministic for the same KB and seed."""
    dropped: list[dict[str, Any]] = []

    passages = generate.passages(kb)
    p_clean = clean.clean_rows(passages, ("text",), min_tokens=3,
                               dataset="passages", scrub=False)
    dropped += p_clean.dropped

    qa = generate.qa_pairs(kb, seed)
    qa_clean = clean.clean_rows(qa, ("question", "answer"), dedup_fields=("question",), dataset="qa")
    dropped += qa_clean.dropped
    qa_splits = clean.split_by_hash(qa_clean.kept, group=_qa_group, salt=f"qa{seed}")
    qa_splits["train"] = aug.augment(qa_splits["train"], kb, augment_factor, seed)

    mcq = generate.mcqs(kb, seed)
    mcq_clean = clean.clean_rows(mcq, ("question", "opa", "opb", "opc", "opd"), min_tokens=1,
                                 dedup_fields=("question", "opa", "opb", "opc", "opd"), dataset="mcq")
    dropped += mcq_clean.dropped
    mcq_splits = clean.split_by_hash(mcq_clean.kept, "id", salt=f"mcq{seed}")
    mcq_splits["train"] = aug.augment(mcq_splits["train"], kb, augment_factor, seed)

    cot = generate.cot_cases(kb, seed)
    cot_clean = clean.clean_rows(cot, ("Question", "Complex_CoT", "Response"), dataset="cot",
                                 dedup_fields=("Question",))
    dropped += cot_clean.dropped
    cot_splits = clean.split_by_hash(cot_clean.kept, "id", salt=f"cot{seed}")

    # preference pairs follow the QA split, so a held-out prompt is never trained on
    qa_side = {_qa_group(r): s for s, rows in qa_splits.items() for r in rows}
    pref = generate.preference_pairs(kb, qa_clean.kept, seed)
    pref_clean = clean.clean_rows(pref, ("prompt", "chosen", "rejected"), min_tokens=1, scrub=False,
                                  dedup_fields=("prompt", "rejected"), dataset="pref_pairs")
    dropped += pref_clean.dropped
    pref_splits: dict[str, list] = {"train": [], "validation": [], "test": []}
    qa_by_question = {r["question"]: r for r in qa_clean.kept}
    for r in pref_clean.kept:
        src = qa_by_question.get(r["prompt"])
        pref_splits[qa_side.get(_qa_group(src), "train") if src else "train"].append(r)

    triage = generate.triage_cases(kb, seed)
    tri_clean = clean.clean_rows(triage, ("text",), min_tokens=2, dataset="triage", scrub=False)
    dropped += tri_clean.dropped
    tri_splits = clean.split_by_hash(tri_clean.kept, "id", ratios=(0.5, 0.0, 0.5), salt=f"tri{seed}")

    dialogues = generate.dialogues(kb, seed)

    leaks = clean.leakage_pairs(qa_splits["train"], qa_splits["test"], ("question", "answer"))
    leaks += clean.leakage_pairs(qa_splits["train"], qa_splits["validation"], ("question", "answer"))
    leaks += clean.leakage_pairs(cot_splits["train"], cot_splits["test"], ("Question",))
    leaks += clean.leakage_pairs(mcq_splits["train"], mcq_splits["test"], ("question", "opa", "opb", "opc", "opd"))
    leaks += clean.leakage_pairs(pref_splits["train"], pref_splits["test"], ("prompt", "chosen"))

    sets = {"passages": {"all": p_clean.kept}, "qa": qa_splits, "mcq": mcq_splits, "cot": cot_splits,
            "pref_pairs": pref_splits, "triage": tri_splits, "dialogues": {"test": dialogues}}
    version = f"v{VERSION}-{kb.fingerprint}-s{seed}"
    clusters = sum(len(c.clusters) for c in (p_clean, qa_clean, mcq_clean, cot_clean, pref_clean, tri_clean))
    return CourseData(sets, dropped, leaks, clusters, version)


def save(data: CourseData, folder: str | Path, hf: bool = True) -> Path:
    """Write ``<folder>/<version>/<set>/<split>.jsonl`` (+ a Hugging Face DatasetDict per set
    under ``hf/``) and a ``manifest.json`` with the counts; returns the version folder."""
    root = Path(folder) / data.version
    for name, splits in data.sets.items():
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for split, rows in splits.items():
            with open(d / f"{split}.jsonl", "w") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        if hf:
            from datasets import Dataset, DatasetDict

            # JSON-encode nested values so every set is a flat, typed table
            def flat(rows):
                return [{k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in r.items()} for r in rows]

            dd = DatasetDict({s: Dataset.from_list(flat(rows)) for s, rows in splits.items() if rows})
            dd.save_to_disk(str(root / "hf" / name))
    (root / "manifest.json").write_text(json.dumps({"version": data.version, "counts": data.counts(),
                                                    "dropped": len(data.dropped),
                                                    "leakage_pairs": len(data.leakage)}, indent=2) + "\n")
    return root


def load_split(folder: str | Path, name: str, split: str) -> list[dict[str, Any]]:
    """Rows of one saved set/split (``folder`` is the version folder that ``save`` returned)."""
    path = Path(folder) / name / f"{split}.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run 01_data first")
    return [json.loads(line) for line in path.read_text().split("\n") if line.strip()]


def _pretraining_texts(passages: list[dict[str, Any]], qa_train: list[dict[str, Any]]) -> list[str]:
    texts = [p["text"] for p in passages]
    texts += [f"{r['question']} {r['answer']}" for r in qa_train if not r.get("augmented")]
    return texts


def pretraining_corpus(data: CourseData) -> list[str]:
    """Text for the tiny bases: the passages and the training QA (never the held-out splits)."""
    return _pretraining_texts(data.sets["passages"]["all"], data.sets["qa"]["train"])


def saved_pretraining_corpus(folder: str | Path) -> list[str]:
    """``pretraining_corpus`` rebuilt from a saved dataset version folder (what 01 pre-trained
    the tiny Qwen2, Phi and T5 bases on)."""
    return _pretraining_texts(load_split(folder, "passages", "all"), load_split(folder, "qa", "train"))


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def seen_in_pretraining(texts: list[str], corpus: list[str]) -> list[bool]:
    """Per text: was it **seen in pre-training**, i.e. does it appear word for word in one text of
    ``corpus`` after normalising both (lower case, punctuation and spacing dropped)? Held-out
    answers that were seen test recall of pre-training, not what a fine-tune taught; before/after
    tables report the two groups apart. An empty text is never seen."""
    hay = "\n".join(f" {_words(t)} " for t in corpus)
    return [bool(w) and f" {w} " in hay for w in map(_words, texts)]


def reasoning_corpus(data: CourseData) -> list[str]:
    """Extra pre-training text for the tiny Llama, which stands in for DeepSeek-R1-Distill: the
    *training* chain-of-thought cases as plain text (question, reasoning, response), so that,
    like the real distilled model, the base has read worked reasoning before 05 teaches it the
    ``<think>`` format. Held-out cases are never included."""
    return [f"{r['Question']}\n{r['Complex_CoT']}\n{r['Response']}" for r in data.sets["cot"]["train"]]
