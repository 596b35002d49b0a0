"""Drug-interaction checking: the knowledge base's pair table first, then class-level rules
(``data/agent/ddi_classes.yaml``), plus the name → drug-id resolver the checker, the tools and the
real-data check (CRESCENDDI) share."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .. import paths
from ..kb import SEVERITIES, KnowledgeBase

SEVERITY_RANK = {s: i for i, s in enumerate(SEVERITIES)}  # minor < moderate < major < contraindicated


class RuleError(ValueError):
    """The class-rule file does not match its schema (the message names the file, row and field)."""


@dataclass(frozen=True)
class ClassRules:
    classes: dict[str, frozenset]
    rules: tuple


def load_class_rules(kb: KnowledgeBase, path: str | Path | None = None) -> ClassRules:
    """Read and validate the class rules; every member must be a knowledge-base drug id."""
    path = Path(path) if path else paths.data_dir() / "agent" / "ddi_classes.yaml"
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    classes, problems = {}, []
    for name, members in (data.get("classes") or {}).items():
        if not isinstance(members, list):
            problems.append(f"{path}: classes.{name} must be a list of drug ids")
            continue
        unknown = [m for m in members if m not in kb.drugs]
        if unknown:
            problems.append(f"{path}: classes.{name}: not in drugs.yaml: {unknown}")
        classes[name] = frozenset(members)
    rules = []
    for i, r in enumerate(data.get("rules") or []):
        where = f"{path}: rules[{i}]"
        for key in ("a", "b", "severity", "effect", "advice"):
            if not isinstance(r, dict) or not r.get(key):
                problems.append(f"{where}: missing `{key}`")
                break
        else:
            if r["a"] not in classes or r["b"] not in classes:
                problems.append(f"{where}: unknown class {r['a']!r} or {r['b']!r}")
            if r["severity"] not in SEVERITY_RANK:
                problems.append(f"{where}: severity {r['severity']!r} not in {list(SEVERITY_RANK)}")
            rules.append(r)
    if problems:
        raise RuleError("\n".join(problems))
    return ClassRules(classes, tuple(rules))


def class_rules(kb: KnowledgeBase) -> ClassRules:
    """The shipped class rules for ``kb``, read and checked once per knowledge base."""
    return kb.derived("ddi.class_rules", lambda: load_class_rules(kb))


def name_index(kb: KnowledgeBase) -> dict[str, str]:
    """Lower-case names (generic, id, brand and lay names) → drug id, built once per knowledge base."""
    def build() -> dict[str, str]:
        out: dict[str, str] = {}
        for d in kb.drugs.values():
            for n in [d["name"], d["id"].replace("_", " "), d["id"], *d["other_names"]]:
                out.setdefault(n.lower().strip(), d["id"])
        return out

    return kb.derived("ddi.name_index", build)


def resolve(kb: KnowledgeBase, name: str) -> str | None:
    """A drug id for a name or id ("Tylenol" → paracetamol), or None."""
    if not isinstance(name, str):
        return None
    key = " ".join(name.lower().replace("-", " ").split())
    idx = name_index(kb)
    return idx.get(key) or idx.get(key.replace(" ", "_")) or idx.get(name.lower().strip())


def check_pair(kb: KnowledgeBase, a: str, b: str) -> dict[str, Any] | None:
    """The interaction of drug ids ``a`` and ``b``: ``{drugs, severity, effect, advice, source}``
    (source ``kb`` for the pair table, ``class:<a>+<b>`` for a class rule), or None."""
    if a == b:
        return None
    rec = kb.interaction(a, b)
    if rec:
        return {"drugs": sorted((a, b)), "severity": rec["severity"], "effect": rec["effect"],
                "advice": rec["advice"], "source": "kb", "evidence": "ddi.{}.{}".format(*sorted((a, b)))}
    cr = class_rules(kb)
    best = None
    for r in cr.rules:
        ca, cb = cr.classes[r["a"]], cr.classes[r["b"]]
        if (a in ca and b in cb) or (b in ca and a in cb):
            if best is None or SEVERITY_RANK[r["severity"]] > SEVERITY_RANK[best["severity"]]:
                best = {"drugs": sorted((a, b)), "severity": r["severity"], "effect": r["effect"],
                        "advice": r["advice"], "source": f"class:{r['a']}+{r['b']}", "evidence": None}
    return best


def check(kb: KnowledgeBase, drugs: list[str], against: list[str] | None = None) -> list[dict[str, Any]]:
    """Every interaction among ``drugs`` (ids), or between ``drugs`` and ``against`` when given;
    most severe first."""
    pairs = ([(a, b) for a in drugs for b in against] if against is not None
             else [(a, b) for i, a in enumerate(drugs) for b in drugs[i + 1:]])
    seen, out = set(), []
    for a, b in pairs:
        key = frozenset((a, b))
        if key in seen:
            continue
        seen.add(key)
        hit = check_pair(kb, a, b)
        if hit:
            out.append(hit)
    return sorted(out, key=lambda h: -SEVERITY_RANK[h["severity"]])


def crescenddi_check(kb: KnowledgeBase, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Run the checker on CRESCENDDI rows (schema in ../shared/data/SOURCES.md). Only pairs whose
    two drugs both resolve to knowledge-base drugs count. Returns recall on the covered positive
    pairs, the false-positive rate on the covered negative-control pairs, counts, and the misses."""
    pos, neg = set(), set()
    for i, r in enumerate(rows):
        for key in ("drug_1", "drug_2", "label"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"CRESCENDDI row {i} ({r.get('id', '?')}): field `{key}` missing or not text")
        if r["label"] not in ("positive", "negative"):
            raise ValueError(f"CRESCENDDI row {i} ({r.get('id', '?')}): label {r['label']!r} is not positive/negative")
        a, b = resolve(kb, r["drug_1"]), resolve(kb, r["drug_2"])
        if a and b and a != b:
            (pos if r["label"] == "positive" else neg).add(tuple(sorted((a, b))))
    neg -= pos  # a pair that is positive for some event is not a negative control
    found = {p: check_pair(kb, *p) for p in pos | neg}
    tp = [p for p in pos if found[p]]
    fp = [p for p in neg if found[p]]
    kb_only = [p for p in pos if found[p] and found[p]["source"] == "kb"]
    return {"pairs_covered": len(pos) + len(neg), "positive_pairs": len(pos), "negative_pairs": len(neg),
            "recall": len(tp) / len(pos) if pos else float("nan"),
            "recall_pair_table_only": len(kb_only) / len(pos) if pos else float("nan"),
            "false_positive_rate": len(fp) / len(neg) if neg else float("nan"),
            "missed": sorted(p for p in pos if not found[p]), "false_positives": sorted(fp)}

