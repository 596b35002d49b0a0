"""Cleaning with a drop report: normalisation, HTML removal, PII scrubbing, length filters,
exact and near-duplicate removal (MinHash), hashed splits grouped by topic, and a leakage check.

Nothing is dropped silently: every dropped row is kept with its reason and the stage that
dropped it, and ``write_drop_report`` writes them as JSONL plus a summary table.
"""
from __future__ import annotations

import hashlib
import html
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

_TAG = re.compile(r"<[^>]{1,200}>")
_WS = re.compile(r"\s+")
_EMAIL = re.compile(r"\b[\w.+-]+@[\w-]+(\.[\w-]+)+\b")
_PHONE = re.compile(r"(?<![\w/])(\+?\d{1,3}[\s.-]?)?(\(?\d{3,5}\)?[\s.-]?)\d{3}[\s.-]?\d{3,4}(?![\w/])")
_SSN = re.compile(r"\b\d{3}-\d{2}-\d{4}\b")
_IDNUM = re.compile(r"\b(MRN|NHS(?: number)?|patient id|ID|record)[\s:#-]*\d[\d\s-]{4,}\d\b", re.I)
_NAME = re.compile(r"\b(my name is|i am called|i'm called|this is)\s+([A-Z][a-z]+(?:\s+[A-Z][a-z]+)?)")


def normalize_text(text: str) -> str:
    """Unicode NFKC, HTML entities and tags removed, whitespace collapsed."""
    text = html.unescape(str(text))
    text = _TAG.sub(" ", text)
    text = unicodedata.normalize("NFKC", text)
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return _WS.sub(" ", text).strip()


def scrub_pii(text: str) -> tuple[str, int]:
    """Replace emails, phone numbers, identifiers and names after "my name is"; returns the
    text and how many replacements were made."""
    n = 0
    for pattern, repl in ((_EMAIL, "[EMAIL]"), (_SSN, "[ID]"), (_IDNUM, r"\1 [ID]"), (_PHONE, "[PHONE]")):
        text, k = pattern.subn(repl, text)
        n += k
    text, k = _NAME.subn(lambda m: f"{m.group(1)} [NAME]", text)
    return text, n + k


def n_tokens(text: str, tokenizer=None) -> int:
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(text.split())


def _shingles(text: str, k: int = 3) -> set[str]:
    words = re.findall(r"\w+", text.lower())
    return {" ".join(words[i: i + k]) for i in range(max(1, len(words) - k + 1))}


def _minhash(text: str, num_perm: int = 64):
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=1)
    for s in _shingles(text):
        m.update(s.encode())
    return m


@dataclass
class CleanResult:
    kept: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)
    clusters: list[list[str]] = field(default_factory=list)
    pii_replacements: int = 0

    def drop_counts(self) -> dict[str, int]:
        return dict(Counter(d["reason"].split(" (")[0] for d in self.dropped))


def clean_rows(rows: Iterable[dict[str, Any]], text_fields: tuple[str, ...] = ("question", "answer"),
               min_tokens: int = 3, max_tokens: int = 1024, tokenizer=None, near_dup_threshold: float = 0.85,
               scrub: bool = True, id_field: str = "id", dataset: str = "",
               dedup_fields: tuple[str, ...] | None = None) -> CleanResult:
    """Clean rows in order: required text present → normalise → scrub PII → length (in tokens)
    → exact duplicates → near duplicates (MinHash LSH over word 3-shingles of ``dedup_fields``,
    default ``text_fields``)."""
    from datasketch import MinHashLSH

    res = CleanResult()

    def drop(row, reason, stage):
        res.dropped.append({"dataset": dataset, "id": row.get(id_field), "stage": stage, "reason": reason, "row": row})

    seen_exact: dict[str, str] = {}
    lsh = MinHashLSH(threshold=near_dup_threshold, num_perm=64)
    cluster_of: dict[str, list[str]] = {}
    for row in rows:
        row = dict(row)
        empty = [f for f in text_fields if not str(row.get(f) or "").strip()]
        if empty:
            drop(row, f"missing text field `{empty[0]}`", "required")
            continue
        for f in text_fields:
            row[f] = normalize_text(row[f])
            if scrub:
                row[f], k = scrub_pii(row[f])
                res.pii_replacements += k
        if any(not row[f] for f in text_fields):
            drop(row, "empty after normalisation", "normalise")
            continue
        lengths = {f: n_tokens(row[f], tokenizer) for f in text_fields}
        short = [f for f, n in lengths.items() if n < min_tokens]
        long = [f for f, n in lengths.items() if n > max_tokens]
        if short:
            drop(row, f"too short (`{short[0]}` has {lengths[short[0]]} < {min_tokens} tokens)", "length")
            continue
        if long:
            drop(row, f"too long (`{long[0]}` has {lengths[long[0]]} > {max_tokens} tokens)", "length")
            continue
        joined = " \n ".join(row[f] for f in (dedup_fields or text_fields))
        key = hashlib.sha1(joined.lower().encode()).hexdigest()
        rid = str(row.get(id_field))
        if key in seen_exact:
            drop(row, f"exact duplicate (of {seen_exact[key]})", "dedup")
            cluster_of.setdefault(seen_exact[key], [seen_exact[key]]).append(rid)
            continue
        mh = _minhash(joined)
        near = lsh.query(mh)
        if near:
            drop(row, f"near duplicate (of {near[0]})", "dedup")
            cluster_of.setdefault(near[0], [near[0]]).append(rid)
            continue
        seen_exact[key] = rid
        lsh.insert(rid, mh)
        res.kept.append(row)
    res.clusters = list(cluster_of.values())
    return res


def split_by_hash(rows: list[dict[str, Any]], group: Callable[[dict], str] | str = "id",
                  ratios: tuple[float, float, float] = (0.8, 0.1, 0.1), salt: str = "medkit") -> dict[str, list[dict]]:
    """Deterministic train/validation/test split by a hash of each row's group key, so rows
    sharing a topic (e.g. MedQuAD ``focus``) never straddle splits."""
    key_of = (lambda r: str(r.get(group) or r.get("id"))) if isinstance(group, str) else group
    out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for r in rows:
        h = int(hashlib.sha256(f"{salt}|{key_of(r)}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        name = "train" if h < ratios[0] else "validation" if h < ratios[0] + ratios[1] else "test"
        out[name].append(r)
    return out


def leakage_pairs(train: list[dict], test: list[dict], text_fields: tuple[str, ...] = ("question", "answer"),
                  threshold: float = 0.85, id_field: str = "id") -> list[tuple[str, str]]:
    """(train id, test id) pairs whose text is a near duplicate across the split boundary."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=64)
    for i, r in enumerate(train):
        lsh.insert(f"{i}", _minhash(" \n ".join(str(r.get(f, "")) for f in text_fields)))
    pairs = []
    for r in test:
        for hit in lsh.query(_minhash(" \n ".join(str(r.get(f, "")) for f in text_fields))):
            pairs.append((str(train[int(hit)].get(id_field)), str(r.get(id_field))))
    return pairs


def write_drop_report(dropped: list[dict[str, Any]], folder: str | Path) -> tuple[Path, str]:
    """Write ``dropped.jsonl`` (every dropped row with its reason) and ``drop_summary.md``;
    returns the JSONL path and the summary table."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "dropped.jsonl"
    with open(path, "w") as f:
        for d in dropped:
            f.write(json.dumps(d, ensure_ascii=False, default=str) + "\n")
    counts = Counter((d.get("dataset", ""), d.get("stage", ""), d["reason"].split(" (")[0]) for d in dropped)
    lines = ["| dataset | stage | reason | rows |", "| --- | --- | --- | --- |"]
    lines += [f"| {ds} | {st} | {why} | {n} |" for (ds, st, why), n in sorted(counts.items())]
    lines.append(f"| **all** | | | **{len(dropped)}** |")
    table = "\n".join(lines)
    (folder / "drop_summary.md").write_text(table + "\n")
    return path, table
