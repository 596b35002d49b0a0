"""Loaders for the field's real datasets, into the course's schemas.

Each loader reads a local file (jsonl, json, csv, parquet) anywhere, or a Hugging Face dataset
id where hub access is allowed (the GPU profiles). No loading scripts are used: datasets 4+
dropped them. Rows that cannot be mapped are dropped *with a reason*, never silently.

    res = load("medquad", "../shared/data/medquad.jsonl")
    res.rows, res.dropped            # dropped: [{"row": n, "reason": ..., "record": {...}}]
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class DataError(ValueError):
    """Bad input: the message names the file and the line or field."""


@dataclass
class LoadResult:
    name: str
    source: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    dropped: list[dict[str, Any]] = field(default_factory=list)

    def drop_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for d in self.dropped:
            out[d["reason"]] = out.get(d["reason"], 0) + 1
        return out


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}: not UTF-8 text (bad byte 0x{raw[exc.start]:02x} at line {line}, "
                        f"byte {exc.start}); re-save the file as UTF-8") from exc


def read_records(path: str | Path, lenient: bool = False) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Read a jsonl/json/csv/parquet file into dicts. A malformed JSONL line raises DataError
    naming the file and line; with ``lenient=True`` it is skipped and returned in the second
    list instead."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    bad: list[dict[str, Any]] = []
    if suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist(), bad
    text = _decode(path)
    if suffix == ".jsonl":
        rows = []
        # split on "\n" only: str.splitlines() also breaks on U+2028 etc. inside JSON strings
        for lineno, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                if not lenient:
                    raise DataError(f"{path}:{lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
                bad.append({"row": lineno, "reason": f"malformed JSON line ({exc.msg})", "record": line[:200]})
                continue
            if not isinstance(obj, dict):
                if not lenient:
                    raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
                bad.append({"row": lineno, "reason": "not a JSON object", "record": line[:200]})
                continue
            rows.append(obj)
        return rows, bad
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc
        if isinstance(data, dict):  # keyed by id (e.g. PubMedQA's ori_pqal.json)
            data = [{"id": k, **v} if isinstance(v, dict) else {"id": k, "value": v} for k, v in data.items()]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list or an object keyed by id")
        return data, bad
    if suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames:
            raise DataError(f"{path}: empty CSV (no header row)")
        return [dict(r) for r in reader], bad
    raise DataError(f"{path}: unsupported file type {suffix!r} (use jsonl, json, csv, tsv or parquet)")


def _get(rec: dict[str, Any], *names: str) -> Any:
    """The first present, non-empty field among ``names`` (case-insensitive)."""
    lower = {k.lower(): v for k, v in rec.items()}
    for n in names:
        v = lower.get(n.lower())
        if v not in (None, "", []):
            return v
    return None


class _Missing(Exception):
    pass


def _need(rec: dict[str, Any], *names: str) -> Any:
    v = _get(rec, *names)
    if v is None:
        raise _Missing(f"missing field `{names[0]}`")
    return v


def _qa(rec, i, source):
    return {"id": str(_get(rec, "id", "qid") or f"{source}-{i}"), "question": str(_need(rec, "question", "input", "Question")),
            "answer": str(_need(rec, "answer", "output", "Answer", "response")),
            "topic": _get(rec, "focus", "topic"), "qtype": _get(rec, "qtype"), "source": source}


def _medquad(rec, i, source):
    row = _qa(rec, i, source)
    # the page's title (MedQuAD's `focus`: the topic of the NIH page the answer is a section of);
    # None where the file has none (the question is never a title)
    row.update(url=_get(rec, "url"), medquad_source=_get(rec, "source"), title=row["topic"] or None)
    if not row["topic"]:  # HF MedQuad copies lack a focus; group on the question then
        row["topic"] = row["question"].lower()
    return row


def _chatdoctor(rec, i, source):
    return {"id": str(_get(rec, "id") or f"{source}-{i}"), "question": str(_need(rec, "input", "question")),
            "answer": str(_need(rec, "output", "answer")), "topic": None, "qtype": "dialogue",
            "instruction": _get(rec, "instruction"), "source": source}


def _huatuo(rec, i, source):
    q = _need(rec, "question", "questions")
    while isinstance(q, list):  # huatuo_encyclopedia_qa nests questions as [[...]]
        if not q:
            raise _Missing("missing field `questions`")
        q = q[0]
    a = _need(rec, "answer", "answers")
    if isinstance(a, list):
        a = a[0]
    return {"id": str(_get(rec, "id") or f"{source}-{i}"), "question": str(q), "answer": str(a),
            "topic": None, "qtype": None, "source": source}


def _medmcqa(rec, i, source, cop_base: int | None = None):
    row = {"id": str(_get(rec, "id") or f"{source}-{i}"), "question": str(_need(rec, "question"))}
    for k in ("opa", "opb", "opc", "opd"):
        row[k] = str(_need(rec, k))
    cop = _need(rec, "cop") if _get(rec, "cop") != 0 else 0
    try:
        cop = int(cop)
    except (TypeError, ValueError):
        raise _Missing(f"field `cop` is not an option index: {cop!r}") from None
    base = 0 if cop_base is None else cop_base
    if not 0 <= cop - base <= 3:
        raise _Missing(f"field `cop` out of range: {cop}")
    row.update(cop=cop - base, exp=_get(rec, "exp") or "", subject_name=_get(rec, "subject_name") or "",
               topic_name=_get(rec, "topic_name") or "", choice_type=_get(rec, "choice_type") or "single")
    return row


def _pubmedqa(rec, i, source):
    ctx = _get(rec, "contexts", "CONTEXTS")
    if ctx is None and isinstance(_get(rec, "context"), dict):  # the HF pqa_labeled layout
        ctx = _get(rec, "context").get("contexts")
    if not ctx:
        raise _Missing("missing field `contexts`")
    decision = str(_need(rec, "final_decision")).lower()
    if decision not in ("yes", "no", "maybe"):
        raise _Missing(f"field `final_decision` is {decision!r}, not yes/no/maybe")
    return {"id": str(_need(rec, "id", "pubid")), "question": str(_need(rec, "question", "QUESTION")),
            "contexts": list(ctx), "long_answer": str(_get(rec, "long_answer", "LONG_ANSWER") or ""),
            "final_decision": decision, "split": _get(rec, "split") or "unknown"}


def _medical_o1(rec, i, source):
    return {"id": str(_get(rec, "id") or f"{source}-{i}"), "Question": str(_need(rec, "Question")),
            "Complex_CoT": str(_need(rec, "Complex_CoT")), "Response": str(_need(rec, "Response"))}


# name -> (mapper, Hugging Face id, HF config, default split)
LOADERS: dict[str, tuple[Callable, str | None, str | None, str]] = {
    "medmcqa": (_medmcqa, "openlifescienceai/medmcqa", None, "validation"),
    "pubmedqa": (_pubmedqa, "qiaojin/PubMedQA", "pqa_labeled", "train"),
    "medical_o1": (_medical_o1, "FreedomIntelligence/medical-o1-reasoning-SFT", "en", "train"),
    "chatdoctor": (_chatdoctor, "avaliev/chat_doctor", None, "train"),
    "medquad": (_medquad, "keivalya/MedQuad-MedicalQnADataset", None, "train"),
    "huatuo": (_huatuo, "FreedomIntelligence/huatuo_encyclopedia_qa", None, "train"),
    "csv_qa": (_qa, None, None, "train"),
}


def load(name: str, source: str | Path | None = None, split: str | None = None, lenient: bool = False,
         allow_hub: bool = False, limit: int | None = None, **options: Any) -> LoadResult:
    """Load dataset ``name`` (a key of LOADERS) from ``source``: a local path, or (with
    ``allow_hub``) a Hugging Face id; ``None`` means the dataset's usual id."""
    if name not in LOADERS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(LOADERS)}")
    mapper, hf_id, hf_config, default_split = LOADERS[name]
    source = str(source) if source is not None else hf_id
    if source is None:
        raise ValueError(f"{name}: give a file path")
    result = LoadResult(name, source)
    if Path(source).exists():
        records, bad = read_records(source, lenient=lenient)
        result.dropped += bad
    elif allow_hub:
        from datasets import load_dataset
        ds = load_dataset(source, hf_config, split=split or default_split)
        records = list(ds)
    else:
        raise DataError(f"{name}: no file at {source!r}, and hub downloads are off on this profile "
                        f"(pass a local path, or allow_hub=True on a GPU profile)")
    if limit:
        records = records[:limit]
    for i, rec in enumerate(records):
        try:
            result.rows.append(mapper(rec, i, name, **options) if options else mapper(rec, i, name))
        except _Missing as exc:
            result.dropped.append({"row": i + 1, "reason": str(exc), "record": {k: str(v)[:200] for k, v in rec.items()}})
    ids = {}
    for r in result.rows:  # ids must be unique: the split and the leakage check key on them
        ids[r["id"]] = ids.get(r["id"], 0) + 1
    dups = [k for k, v in ids.items() if v > 1]
    if dups:
        raise DataError(f"{source}: {len(dups)} duplicate id(s), e.g. {dups[:3]}")
    return result
