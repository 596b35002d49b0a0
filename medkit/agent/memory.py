"""Patient memory.

- **Entity memory**: allergies, conditions, medications, age, sex, pregnancy, read from what the
  patient says (lexicon + patterns over the knowledge base) and persisted per patient id in the
  store, so it survives a new session. The user can see, edit and clear it (``Store.memory``,
  ``Store.remember``, ``Store.forget``).
- **Summary memory**: once a session's turns pass a token budget, the older turns are
  compressed into a summary (extractive here; an LLM summary on GPU profiles) and only the
  recent turns are kept verbatim.
"""
from __future__ import annotations

import re
from typing import Any, Callable

from ..kb import KnowledgeBase
from ..rag.query import QueryAnalyzer
from . import ddi

# Long-term conditions worth remembering across sessions (acute ones, like a cold, are not).
CHRONIC = {"asthma", "copd", "type_1_diabetes", "type_2_diabetes", "hypertension", "heart_failure",
           "atrial_fibrillation", "chronic_kidney_disease", "epilepsy", "hypothyroidism", "hyperthyroidism",
           "stable_angina", "peptic_ulcer", "gord", "liver_cirrhosis", "rheumatoid_arthritis", "osteoarthritis",
           "depression", "bipolar_disorder", "gout", "crohns_disease", "ulcerative_colitis", "irritable_bowel_syndrome",
           "migraine", "osteoporosis", "hyperlipidaemia", "benign_prostatic_hyperplasia", "polycystic_ovary_syndrome",
           "peripheral_arterial_disease", "generalised_anxiety_disorder", "bronchiectasis", "myocardial_infarction",
           "ischaemic_stroke", "transient_ischaemic_attack", "deep_vein_thrombosis", "pulmonary_embolism",
           "acute_kidney_injury"}
RENAL = {"chronic_kidney_disease", "acute_kidney_injury"}

# everyday names for medicines that the knowledge base's name lists do not spell out
EXTRA_DRUG_PHRASES = {"combined pill": "combined_oral_contraceptive", "contraceptive pill": "combined_oral_contraceptive",
                      "gtn spray": "glyceryl_trinitrate"}

# words patients use for an allergy class (the KB's allergy_class values)
_CLASS_WORDS = {"penicillin": "penicillin", "cephalosporin": "cephalosporin", "sulfa": "sulfonamide",
                "sulpha": "sulfonamide", "sulfonamide": "sulfonamide", "sulphonamide": "sulfonamide",
                "nsaid": "nsaid", "anti-inflammator": "nsaid", "macrolide": "macrolide", "opioid": "opioid",
                "opiate": "opioid", "quinolone": "fluoroquinolone", "tetracycline": "tetracycline"}
_SENTENCE = re.compile(r"[^.!?\n]+[.!?]?")
_QUESTION_START = re.compile(r"^\s*(can|could|should|is|are|may|what|which|how|do|does|will|would|why|when)\b", re.I)
_ALLERGY = re.compile(r"\ballerg(?:ic|y|ies)\b|\breaction to\b|\bcan'?t take\b|\bcannot take\b|\bbad reaction\b|"
                      r"\b(gives?|gave|brings?|brought|made|makes) me (come )?(out in )?(a |an )?(rash|hives|swell|wheez)", re.I)
_NO_ALLERGY = re.compile(r"\b(no (known )?allergies|not allergic|nkda|no drug allergies)\b", re.I)
_TAKING = re.compile(r"\b(i take|i'?m taking|i am taking|i'?m on|i am on|i use|(been|was|got) (started|put) on|i started|i'?ve been taking|i have been taking|"
                     r"i'?ve been on|i have been on|prescribed|my (daily |regular |usual )?(tablets?|pills?|medicines?|"
                     r"medication|inhaler)|on (daily |regular )?(tablets|medication) (for|called)|takes|he'?s on|she'?s on)\b",
                     re.I)
_STOPPED = re.compile(r"\b(stopped|no longer take|no longer on|came off|come off|quit taking|don'?t take .* any ?more)\b",
                      re.I)
_HAS_CONDITION = re.compile(r"\b(i have|i'?ve got|i'?ve had|diagnosed with|i suffer from|history of|i'?m (an? )?"
                            r"(asthmatic|diabetic|epileptic)|he has|she has|known)\b", re.I)
_AGE = [
    (re.compile(r"\b(?:i am|i'?m|im|aged|age|he'?s|she'?s|he is|she is|is)\s+(\d{1,3})(?:\s*(?:years?|yrs?)(?:\s*old)?)?"
                r"(?!\s*(?:weeks?|months?|days?|kg|kilos?|cm|mg|%|st\b|stone|lbs?|pounds|feet|ft|times|tablets|'|\.\d|:|am\b|pm\b))\b",
                re.I), 1.0),
    (re.compile(r"\b(\d{1,3})[- ](?:years?|yrs?)[- ]old\b", re.I), 1.0),
    (re.compile(r"\b(\d{1,2})[- ]months?[- ]old\b", re.I), 1 / 12),
    (re.compile(r"\b(\d{1,2})[- ]weeks?[- ]old\b", re.I), 1 / 52),
    (re.compile(r"\b(?:son|daughter|baby|child|boy|girl|toddler)\s+(?:is|who is|who's|aged)\s+(\d{1,2})\s+months?\b",
                re.I), 1 / 12),
    (re.compile(r"\b(?:son|daughter|baby|child|boy|girl|toddler)\s+(?:is|who is|who's|aged)\s+(\d{1,2})\s+weeks?\b",
                re.I), 1 / 52),
]
_PREGNANT = re.compile(r"\b(i'?m|i am|im|she'?s|she is)\s+(\d{1,2}\s+weeks\s+|\w+\s+months\s+)?pregnant\b|"
                       r"\bweeks pregnant\b|\bexpecting a baby\b|\bmy pregnancy\b|\bwhile pregnant\b|\bi'?m expecting\b",
                       re.I)
_NOT_PREGNANT = re.compile(r"\b(not pregnant|no longer pregnant|had (my|the) baby|gave birth|trying to (get|become) pregnant)\b",
                           re.I)
_SEX = re.compile(r"\b(?:i'?m|i am)\s+an?\s+(\d{1,3}[- ]year[- ]old\s+)?(man|woman|male|female|guy|lady)\b", re.I)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE.findall(text) if s.strip()]


def _is_statement(s: str) -> bool:
    return not s.rstrip().endswith("?") and not _QUESTION_START.match(s)


class FactExtractor:
    """Reads patient facts out of a message: ``extract(text)`` → (additions, removals) as
    ``[(kind, value)]`` with kinds from ``store.ENTITY_KINDS``."""

    def __init__(self, kb: KnowledgeBase, analyzer: QueryAnalyzer):
        self.kb, self.analyzer = kb, analyzer
        self._cond_by_name = {}
        for cid, c in kb.conditions.items():
            for n in [c["name"], *c["synonyms"], *c["lay_terms"]]:
                self._cond_by_name.setdefault(n.lower(), cid)

    def drug_ids(self, text: str) -> list[str]:
        """Knowledge-base drug ids mentioned in ``text``, in order."""
        names = self.analyzer.entities(text).get("drug", [])
        ids = [ddi.resolve(self.kb, n) for n in names]
        low = text.lower()
        ids += [did for phrase, did in EXTRA_DRUG_PHRASES.items() if did in self.kb.drugs and phrase in low]
        return list(dict.fromkeys(i for i in ids if i))

    def condition_ids(self, text: str) -> list[str]:
        pat = self.analyzer._patterns.get("condition")
        found = [self._cond_by_name.get(m.group(1).lower()) for m in pat.finditer(text)] if pat else []
        return list(dict.fromkeys(c for c in found if c))

    def chronic_conditions(self, s: str) -> list[str]:
        """Long-term conditions the patient says they have ("I have asthma", "my diabetes",
        "a man with kidney disease"), not ones they ask about."""
        out = []
        pat = self.analyzer._patterns.get("condition")
        for m in pat.finditer(s) if pat else []:
            cid = self._cond_by_name.get(m.group(1).lower())
            before = s[max(0, m.start() - 40): m.start()]
            statement_for = _is_statement(s) and re.search(r"\bfor\s+$", before, re.I)
            if cid in CHRONIC and (_HAS_CONDITION.search(before) or statement_for
                                   or re.search(r"\b(my|with)\s+(\w+\s+)?$", before, re.I)):
                out.append(cid)
        low = s.lower()
        if re.search(r"\b(i'?m|i am) (an )?asthmatic\b", low):
            out.append("asthma")
        if re.search(r"\b(i'?m|i am) (an )?epileptic\b", low):
            out.append("epilepsy")
        return list(dict.fromkeys(out))

    def allergies(self, s: str) -> list[str]:
        low = s.lower()
        if _NO_ALLERGY.search(low) or not _ALLERGY.search(low):
            return []
        out = [cls for word, cls in _CLASS_WORDS.items() if word in low]
        for did in self.drug_ids(s):
            cls = self.kb.drugs[did].get("allergy_class")
            out.append(cls if cls else did)
        return list(dict.fromkeys(out))

    def extract(self, text: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        add: list[tuple[str, str]] = []
        remove: list[tuple[str, str]] = []
        text = text.replace("’", "'")
        for s in sentences(text):
            allergic = self.allergies(s)
            add += [("allergy", a) for a in allergic]
            if _is_statement(s) and not allergic:
                if _STOPPED.search(s):
                    remove += [("medication", d) for d in self.drug_ids(s)]
                elif _TAKING.search(s):
                    add += [("medication", d) for d in self.drug_ids(s)]
            add += [("condition", c) for c in self.chronic_conditions(s)]
            if _NOT_PREGNANT.search(s):
                add.append(("pregnant", "false"))
            elif _PREGNANT.search(s) and not re.search(r"\b(am i|could i be|might i be|if i'?m)\b", s, re.I):
                add.append(("pregnant", "true"))
                add.append(("sex", "female"))
            m = _SEX.search(s)
            if m:
                add.append(("sex", "male" if m.group(2).lower() in ("man", "male", "guy") else "female"))
            for pat, scale in _AGE:
                m = pat.search(s)
                if m and not re.search(r"\bpregnant\b", s[m.end(): m.end() + 20], re.I):
                    age = int(m.group(1)) * scale
                    if 0 < age <= 110:
                        add.append(("age", f"{age:.3g}"))
                        break
        return list(dict.fromkeys(add)), list(dict.fromkeys(remove))


def apply(memory: dict[str, Any], add: list[tuple[str, str]], remove: list[tuple[str, str]]) -> dict[str, Any]:
    """The memory dict after these changes (what ``Store.memory`` will return once committed)."""
    mem = {k: (list(v) if isinstance(v, list) else v) for k, v in memory.items()}
    plural = {"allergy": "allergies", "condition": "conditions", "medication": "medications"}
    for kind, value in remove:
        if kind in plural and value in mem[plural[kind]]:
            mem[plural[kind]].remove(value)
    for kind, value in add:
        if kind in plural:
            if value not in mem[plural[kind]]:
                mem[plural[kind]].append(value)
        elif kind == "age":
            mem["age"] = float(value)
        elif kind == "pregnant":
            mem["pregnant"] = value == "true"
        else:
            mem[kind] = value
    return mem


def count_tokens(text: str) -> int:
    """Whitespace tokens: the budget unit on every profile (cheap, model-independent)."""
    return len(text.split())


def extractive_summary(turns: list[dict[str, Any]], extractor: FactExtractor, max_sentences: int = 8) -> str:
    """Keep the patient's sentences that carry clinical content (drugs, conditions, symptoms,
    durations, allergies, age, pregnancy) and each answer's triage level, oldest first."""
    keep: list[str] = []
    for t in turns:
        for s in sentences(t["user"]):
            ents = extractor.analyzer.entities(s)
            facts, _ = extractor.extract(s)
            if facts or any(k in ents for k in ("drug", "condition", "symptom", "duration")):
                keep.append(f"Patient: {s}")
        if t.get("triage") and t["triage"] != "LOW":
            keep.append(f"(triage {t['triage']})")
    keep = list(dict.fromkeys(keep))
    return " ".join(keep[-max_sentences:])


_CITE = re.compile(r"\[E\d+\]")


def summary_problem(text: str, turns: list[dict[str, Any]], extractor: FactExtractor) -> str | None:
    """Why a model-written summary of ``turns`` must not be stored, or None when it may be: it is
    empty, it loops (``medkit.metrics.is_looping``), it carries evidence labels ([E#]: they only
    mean something inside one answer), or it names a medicine or condition that the patient never
    mentioned (a made-up fact would be "remembered" in every later turn; the assistant's own
    answers do not count: run smol-r15's summary carried the self-care line's "ask for paracetamol"
    into a heart-failure patient's memory)."""
    from ..metrics import is_looping

    if not text.strip():
        return "empty"
    if is_looping(text):
        return "loops"
    if _CITE.search(text):
        return "evidence labels"
    said = " ".join(t["user"] for t in turns)
    for kind, found, known in (("medicine", extractor.drug_ids(text), set(extractor.drug_ids(said))),
                               ("condition", extractor.condition_ids(text), set(extractor.condition_ids(said)))):
        new = [x for x in found if x not in known]
        if new:
            return f"{kind} not in the conversation: {new[0]}"
    return None


def compress(summary: str, turns: list[dict[str, Any]], budget: int, keep_recent: int,
             summarise: Callable[[list[dict[str, Any]]], str]) -> tuple[str, list[dict[str, Any]]]:
    """If the verbatim turns pass ``budget`` tokens, fold all but the last ``keep_recent`` into
    the summary. Returns (summary, turns kept verbatim)."""
    used = sum(count_tokens(t["user"]) + count_tokens(t["answer"]) for t in turns)
    if used <= budget or len(turns) <= keep_recent:
        return summary, turns
    old, recent = turns[:-keep_recent] if keep_recent else turns, turns[-keep_recent:] if keep_recent else []
    new = summarise(old)
    merged = " ".join(x for x in (summary, new) if x)
    return merged, recent


def describe(facts: list[tuple[str, str]], kb: KnowledgeBase) -> str:
    """Remembered facts in words ("allergy to penicillin, takes warfarin sodium, age 34")."""
    words = []
    for kind, value in facts:
        if kind == "allergy":
            words.append(f"allergy to {kb.drugs[value]['name'] if value in kb.drugs else value}")
        elif kind == "medication":
            words.append(f"takes {kb.drugs[value]['name'] if value in kb.drugs else value}")
        elif kind == "condition":
            words.append(kb.conditions[value]["name"].lower() if value in kb.conditions else value)
        elif kind == "age":
            age = float(value)
            words.append(f"age {age:g}" if age >= 2 else f"age {round(age * 12)} months")
        elif kind == "pregnant":
            words.append("pregnant" if value == "true" else "not pregnant")
        else:
            words.append(f"{kind} {value}")
    return ", ".join(words)
