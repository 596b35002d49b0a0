"""The course's medical knowledge base (``data/kb/*.yaml``): loading and schema validation.

    kb = load()                  # validated; raises KBError listing every problem
    kb.conditions["asthma"], kb.drugs["amoxicillin"], kb.interaction("warfarin", "aspirin")

Written for this course from standard references; not a clinical reference. The schema is
documented in ``data/kb/SCHEMA.md``.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from . import paths

SYSTEMS = {"cardiovascular", "respiratory", "gastrointestinal", "renal_urological",
           "endocrine_metabolic", "haematology", "neurology", "psychiatry", "infectious",
           "dermatology", "musculoskeletal", "ent_eye", "obstetrics_gynaecology", "paediatrics",
           "emergency_toxicology"}
LEVELS = ("LOW", "MEDIUM", "HIGH")
ALLERGY_CLASSES = {"penicillin", "cephalosporin", "sulfonamide", "nsaid", "macrolide", "opioid",
                   "fluoroquinolone", "tetracycline", None}
PREGNANCY = {"avoid", "caution", "generally_compatible"}
SEVERITIES = ("minor", "moderate", "major", "contraindicated")
FLAG_CATEGORIES = {"cardiac", "neurological", "respiratory", "allergy", "mental_health", "obstetric",
                   "paediatric", "bleeding", "sepsis", "trauma", "toxicology", "other"}
TERM_KINDS = {"condition", "drug", "symptom", "body_part", "test"}
ICD10 = re.compile(r"^[A-Z][0-9]{2}(\.[0-9A-Z]{1,2})?$")
ID = re.compile(r"^[a-z0-9_]+$")

MINIMUM_COUNTS = {"conditions": 150, "drugs": 100, "interactions": 150, "red_flags": 25,
                  "lay_terms": 100, "triage_rules": 20}


class KBError(ValueError):
    """The knowledge base does not match its schema; ``problems`` lists every finding."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        shown = "\n  ".join(problems[:30])
        more = f"\n  … and {len(problems) - 30} more" if len(problems) > 30 else ""
        super().__init__(f"{len(problems)} knowledge-base problem(s):\n  {shown}{more}")


# field -> (type, minimum length for lists / None)
_CONDITION_FIELDS = {"id": (str, None), "name": (str, None), "icd10": (str, None), "system": (str, None),
                     "department": (str, None), "synonyms": (list, 1), "lay_terms": (list, 1),
                     "symptoms": (list, 3), "causes": (list, 1), "diagnosis": (list, 1),
                     "first_line_treatment": (list, 1), "first_line_drugs": (list, 0),
                     "red_flags": (list, 1), "acuity": (str, None)}
_DRUG_FIELDS = {"id": (str, None), "name": (str, None), "drug_class": (str, None),
                "other_names": (list, 0), "indications": (list, 1), "adult_dose": (dict, None),
                "contraindications": (list, 1), "pregnancy": (str, None), "pregnancy_note": (str, None),
                "renal": (str, None), "hepatic": (str, None), "side_effects": (list, 3)}
_INTERACTION_FIELDS = {"drugs": (list, 2), "severity": (str, None), "effect": (str, None),
                       "mechanism": (str, None), "advice": (str, None)}
_FLAG_FIELDS = {"id": (str, None), "name": (str, None), "category": (str, None), "any": (list, 1),
                "action": (str, None)}
_TERM_FIELDS = {"lay": (str, None), "clinical": (str, None), "kind": (str, None)}


def _check_fields(where: str, row: Any, spec: dict, problems: list[str]) -> bool:
    if not isinstance(row, dict):
        problems.append(f"{where}: expected a mapping, got {type(row).__name__}")
        return False
    ok = True
    for name, (typ, minimum) in spec.items():
        if name not in row or row[name] is None:
            problems.append(f"{where}: missing field `{name}`")
            ok = False
            continue
        value = row[name]
        if not isinstance(value, typ):
            problems.append(f"{where}: field `{name}` should be {typ.__name__}, got {type(value).__name__}")
            ok = False
        elif typ is str and not value.strip():
            problems.append(f"{where}: field `{name}` is empty")
            ok = False
        elif typ is list:
            if len(value) < (minimum or 0):
                problems.append(f"{where}: field `{name}` needs at least {minimum} item(s), has {len(value)}")
                ok = False
            if any(not isinstance(v, str) or not v.strip() for v in value):
                problems.append(f"{where}: field `{name}` must hold non-empty strings")
                ok = False
    return ok


@dataclass
class KnowledgeBase:
    conditions: dict[str, dict]
    drugs: dict[str, dict]
    interactions: list[dict]
    red_flags: list[dict]
    lay_terms: list[dict]
    triage: dict[str, Any]
    source: Path
    fingerprint: str = ""  # hash of the YAML files as loaded: versions every dataset built from it
    _pairs: dict[frozenset, dict] = field(default_factory=dict, repr=False)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        self._pairs = {frozenset(i["drugs"]): i for i in self.interactions}

    def derived(self, key: str, build):
        """A structure computed from this (read-only) knowledge base once and kept with it, e.g.
        the drug-name index the agent consults for every sentence: ``build()`` runs on first use."""
        if key not in self._derived:
            self._derived[key] = build()
        return self._derived[key]

    def interaction(self, a: str, b: str) -> dict | None:
        """The interaction record of drugs ``a`` and ``b`` (ids), in either order, or None."""
        return self._pairs.get(frozenset((a, b)))

    def counts(self) -> dict[str, int]:
        return {"conditions": len(self.conditions), "drugs": len(self.drugs),
                "interactions": len(self.interactions), "red_flags": len(self.red_flags),
                "lay_terms": len(self.lay_terms), "triage_rules": len(self.triage.get("rules", []))}


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise KBError([f"{path}: not UTF-8 text ({exc})"]) from exc
    except yaml.YAMLError as exc:
        raise KBError([f"{path}: YAML error: {exc}"]) from exc


def _read_list(folder: Path, stem: str, problems: list[str]) -> list:
    """``<stem>.yaml`` plus any ``<stem>_*.yaml`` parts, concatenated in name order."""
    files = sorted(p for p in folder.glob(f"{stem}*.yaml") if p.stem == stem or p.stem.startswith(stem + "_"))
    if not files:
        problems.append(f"{folder}: no {stem}.yaml")
        return []
    rows: list = []
    for f in files:
        data = _read_yaml(f)
        if not isinstance(data, list):
            problems.append(f"{f}: expected a YAML list at the top level")
            continue
        rows += [(f.name, i, r) for i, r in enumerate(data)]
    return rows


def validate(folder: str | Path | None = None, minimum_counts: dict[str, int] | None = None) -> KnowledgeBase:
    """Load ``folder`` (default ``data/kb``) and check it against the schema; raise KBError
    listing every problem, naming the file, the row and the field."""
    folder = Path(folder) if folder else paths.data_dir() / "kb"
    problems: list[str] = []
    mins = MINIMUM_COUNTS if minimum_counts is None else minimum_counts

    conditions: dict[str, dict] = {}
    for fname, i, row in _read_list(folder, "conditions", problems):
        where = f"{fname} row {i} ({row.get('id', '?') if isinstance(row, dict) else '?'})"
        if not _check_fields(where, row, _CONDITION_FIELDS, problems):
            continue
        if not ID.match(row["id"]):
            problems.append(f"{where}: id must be lowercase snake_case")
        if row["id"] in conditions:
            problems.append(f"{where}: duplicate condition id `{row['id']}`")
        if not ICD10.match(row["icd10"]):
            problems.append(f"{where}: icd10 `{row['icd10']}` is not an ICD-10 code")
        if row["system"] not in SYSTEMS:
            problems.append(f"{where}: system `{row['system']}` not in {sorted(SYSTEMS)}")
        if row["acuity"] not in LEVELS:
            problems.append(f"{where}: acuity `{row['acuity']}` not in {LEVELS}")
        conditions[row["id"]] = row

    drugs: dict[str, dict] = {}
    for fname, i, row in _read_list(folder, "drugs", problems):
        where = f"{fname} row {i} ({row.get('id', '?') if isinstance(row, dict) else '?'})"
        if not _check_fields(where, row, _DRUG_FIELDS, problems):
            continue
        if row["id"] in drugs:
            problems.append(f"{where}: duplicate drug id `{row['id']}`")
        if row.get("allergy_class") not in ALLERGY_CLASSES:
            problems.append(f"{where}: allergy_class `{row.get('allergy_class')}` not allowed")
        if row["pregnancy"] not in PREGNANCY:
            problems.append(f"{where}: pregnancy `{row['pregnancy']}` not in {sorted(PREGNANCY)}")
        dose = row["adult_dose"]
        for key in ("text", "route", "unit"):
            if not isinstance(dose.get(key), str) or not dose[key].strip():
                problems.append(f"{where}: adult_dose.{key} missing")
        lo, hi, day = dose.get("single_dose_min"), dose.get("single_dose_max"), dose.get("max_daily")
        if not all(isinstance(v, (int, float)) for v in (lo, hi)):
            problems.append(f"{where}: adult_dose single_dose_min/max must be numbers")
        elif lo > hi:
            problems.append(f"{where}: adult_dose single_dose_min {lo} > single_dose_max {hi}")
        elif day is not None and (not isinstance(day, (int, float)) or day < hi):
            problems.append(f"{where}: adult_dose.max_daily {day} must be a number >= single_dose_max {hi}")
        drugs[row["id"]] = row

    for cid, row in conditions.items():
        unknown = [d for d in row["first_line_drugs"] if d not in drugs]
        if unknown:
            problems.append(f"conditions ({cid}): first_line_drugs not in drugs.yaml: {unknown}")

    interactions: list[dict] = []
    seen: set[frozenset] = set()
    for fname, i, row in _read_list(folder, "interactions", problems):
        where = f"{fname} row {i}"
        if not _check_fields(where, row, _INTERACTION_FIELDS, problems):
            continue
        pair = row["drugs"]
        if len(pair) != 2 or pair[0] == pair[1]:
            problems.append(f"{where}: `drugs` must name two different drugs, got {pair}")
            continue
        unknown = [d for d in pair if d not in drugs]
        if unknown:
            problems.append(f"{where}: drugs not in drugs.yaml: {unknown}")
        if frozenset(pair) in seen:
            problems.append(f"{where}: duplicate pair {sorted(pair)}")
        if row["severity"] not in SEVERITIES:
            problems.append(f"{where}: severity `{row['severity']}` not in {SEVERITIES}")
        seen.add(frozenset(pair))
        interactions.append(row)

    red_flags: list[dict] = []
    flag_ids: set[str] = set()
    for fname, i, row in _read_list(folder, "red_flags", problems):
        where = f"{fname} row {i}"
        if not _check_fields(where, row, _FLAG_FIELDS, problems):
            continue
        if row["id"] in flag_ids:
            problems.append(f"{where}: duplicate red flag id `{row['id']}`")
        if row["category"] not in FLAG_CATEGORIES:
            problems.append(f"{where}: category `{row['category']}` not in {sorted(FLAG_CATEGORIES)}")
        if not isinstance(row.get("with_any", []), list):
            problems.append(f"{where}: with_any must be a list")
        held = row.get("withhold_if_ruled_out", [])
        if not isinstance(held, list) or any(not isinstance(d, str) for d in held):
            problems.append(f"{where}: withhold_if_ruled_out must be a list of drug ids")
        flag_ids.add(row["id"])
        red_flags.append(row)

    lay_terms: list[dict] = []
    for fname, i, row in _read_list(folder, "lay_terms", problems):
        where = f"{fname} row {i}"
        if not _check_fields(where, row, _TERM_FIELDS, problems):
            continue
        if row["kind"] not in TERM_KINDS:
            problems.append(f"{where}: kind `{row['kind']}` not in {sorted(TERM_KINDS)}")
        ref = row.get("ref")
        if ref is not None and ref not in drugs and ref not in conditions:
            problems.append(f"{where}: ref `{ref}` is neither a drug nor a condition id")
        lay_terms.append(row)

    triage: dict[str, Any] = {}
    tpath = folder / "triage_rules.yaml"
    if not tpath.exists():
        problems.append(f"{folder}: no triage_rules.yaml")
    else:
        triage = _read_yaml(tpath) or {}
        levels = triage.get("levels", {})
        for lvl in LEVELS:
            if not isinstance(levels.get(lvl), dict) or not levels[lvl].get("action"):
                problems.append(f"triage_rules.yaml: levels.{lvl} needs a label and an action")
        allowed = {"red_flag", "any", "all", "age_max", "age_min", "pregnant", "duration_days_min"}
        for i, rule in enumerate(triage.get("rules", [])):
            where = f"triage_rules.yaml rule {i} ({rule.get('id', '?')})"
            if rule.get("level") not in ("HIGH", "MEDIUM"):
                problems.append(f"{where}: level must be HIGH or MEDIUM")
            if not rule.get("reason"):
                problems.append(f"{where}: missing reason")
            when = rule.get("when")
            if not isinstance(when, dict) or not when:
                problems.append(f"{where}: `when` must be a non-empty mapping")
            elif set(when) - allowed:
                problems.append(f"{where}: unknown condition keys {sorted(set(when) - allowed)}")

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.yaml")):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    kb = KnowledgeBase(conditions, drugs, interactions, red_flags, lay_terms, triage, folder, h.hexdigest()[:12])
    for name, n in kb.counts().items():
        if n < mins.get(name, 0):
            problems.append(f"{folder}: {name} has {n} entries, the course needs at least {mins[name]}")
    if problems:
        raise KBError(problems)
    return kb


@lru_cache(maxsize=4)
def _load_cached(folder: str) -> KnowledgeBase:
    return validate(folder)


def load(folder: str | Path | None = None) -> KnowledgeBase:
    """The validated knowledge base (cached per folder)."""
    folder = Path(folder) if folder else paths.data_dir() / "kb"
    return _load_cached(str(folder.resolve()))
