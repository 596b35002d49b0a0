"""Rule-based triage (LOW / MEDIUM / HIGH) from ``data/kb/triage_rules.yaml`` and the red-flag
lexicon ``data/kb/red_flags.yaml``. The highest level any rule reaches wins; the reasons of the
winning level are kept, and every fired red flag carries its emergency instruction."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..kb import KnowledgeBase

LEVEL_RANK = {"LOW": 0, "MEDIUM": 1, "HIGH": 2}
# a phrase right after one of these (within a few words) is denied, not reported
_NEGATION = re.compile(r"\b(no|not|never|without|denies|don't have|dont have|do not have|haven't had|"
                       r"havent had|isn't|isnt|free of|no sign of|no signs of)\b(?:\W+\w+){0,3}\W*$")
_NUMBER = {"a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7,
           "eight": 8, "nine": 9, "ten": 10, "few": 3, "couple of": 2, "several": 4}
_DURATION = re.compile(r"\b(?:for|since|over|past|last)\s+(?:the\s+)?(?:last\s+|past\s+)?(\d+(?:\.\d+)?|a|an|one|two|"
                       r"three|four|five|six|seven|eight|nine|ten|few|couple of|several)\s+"
                       r"(hours?|days?|nights?|weeks?|months?|years?)\b", re.I)
_UNIT_DAYS = {"hour": 1 / 24, "day": 1, "night": 1, "week": 7, "month": 30, "year": 365}


def duration_days(text: str) -> float | None:
    """The longest stated duration in days ("for 3 weeks" → 21), or None."""
    best = None
    for m in _DURATION.finditer(text):
        n = m.group(1).lower()
        value = float(n) if n[0].isdigit() else _NUMBER[n]
        days = value * _UNIT_DAYS[m.group(2).lower().rstrip("s")]
        best = days if best is None else max(best, days)
    if best is None and re.search(r"\bsince yesterday\b", text, re.I):
        best = 1.0
    return best


_WORD = re.compile(r"[a-z0-9']+")
_IRREGULAR = {"is": "be", "are": "be", "was": "be", "were": "be", "am": "be", "swollen": "swell", "went": "go",
              "gone": "go", "feels": "feel", "felt": "feel"}


def _stem(word: str) -> str:
    """A crude stem, the same for the text and the lexicon: "killing" → "kill", "swelling" →
    "swell", "lips" → "lip"; forms of "be" → "be"."""
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for suffix, keep in (("ing", 3), ("ed", 3), ("es", 4), ("s", 3)):
        if word.endswith(suffix) and len(word) - len(suffix) >= keep and not word.endswith("ss"):
            word = word[: -len(suffix)]
            if suffix in ("ing", "ed") and len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsfz":  # "stopped" → "stop"
                word = word[:-1]
            return word
    return word


def normalise(text: str) -> str:
    return " ".join(_stem(w) for w in _WORD.findall(text.lower().replace("’", "'")))


_LOOSE: dict[str, re.Pattern] = {}


def _loose_pattern(phrase: str) -> re.Pattern:
    """The phrase's stems in order, with at most one other word between neighbours
    ("arm went weak" also finds "arm suddenly went weak")."""
    if phrase not in _LOOSE:
        toks = [re.escape(t) for t in normalise(phrase).split()]
        _LOOSE[phrase] = re.compile(r"\b" + r"(?:\s+\S+)?\s+".join(toks) + r"\b") if toks else re.compile(r"(?!)")
    return _LOOSE[phrase]


def _not_negated(text: str, start: int) -> bool:
    return not _NEGATION.search(text[max(0, start - 40): start])


def mentions(text: str, phrase: str, normalised: str | None = None) -> bool:
    """``phrase`` occurs in ``text`` (lower-case) and is not negated just before it: verbatim,
    or (when ``normalised`` = ``normalise(text)`` is given) as word stems in order with at most
    one other word between them."""
    start = 0
    while True:
        i = text.find(phrase, start)
        if i < 0:
            break
        if _not_negated(text, i):
            return True
        start = i + 1
    if normalised is not None:
        for m in _loose_pattern(phrase).finditer(normalised):
            if _not_negated(normalised, m.start()):
                return True
    return False


@dataclass
class Triage:
    level: str
    reason: str
    rules: list[str] = field(default_factory=list)
    red_flags: list[dict[str, str]] = field(default_factory=list)  # {"id", "name", "action"}

    @property
    def emergency_action(self) -> str | None:
        return self.red_flags[0]["action"] if self.red_flags else None

    def to_dict(self) -> dict[str, Any]:
        return {"level": self.level, "reason": self.reason, "rules": self.rules,
                "red_flags": [f["id"] for f in self.red_flags]}


def red_flags(kb: KnowledgeBase, text: str, context: str = "") -> list[dict[str, str]]:
    """Every red flag whose phrases occur (not negated) in ``text``. The second feature a flag
    may need (``with_any``) can also come from ``context`` (the patient's previous message:
    "I was stung by a wasp." then "I feel faint")."""
    low = " ".join(text.lower().replace("’", "'").split())
    norm = normalise(low)
    both = f"{' '.join(context.lower().split())} {low}"
    norm_both = normalise(both)
    fired = []
    for f in kb.red_flags:
        if any(mentions(low, p, norm) for p in f["any"]) and (
                not f.get("with_any") or any(mentions(both, p, norm_both) for p in f["with_any"])):
            fired.append({"id": f["id"], "name": f["name"], "action": " ".join(f["action"].split())})
    return fired


def triage(kb: KnowledgeBase, text: str, patient: dict[str, Any] | None = None, context: str = "") -> Triage:
    """Triage one message given what is known of the patient (``age`` in years, ``pregnant``)
    and, optionally, the patient's previous message as ``context`` for red flags."""
    patient = patient or {}
    low = " ".join(text.lower().replace("’", "'").split())
    norm = normalise(low)
    flags = red_flags(kb, low, context)
    days = duration_days(low)
    age, pregnant = patient.get("age"), bool(patient.get("pregnant"))
    hits: list[tuple[str, str, str]] = []  # (level, rule id, reason)
    for rule in kb.triage.get("rules", []):
        when = rule["when"]
        if "red_flag" in when and not flags:
            continue
        if "any" in when and not any(mentions(low, p, norm) for p in when["any"]):
            continue
        if "all" in when and not all(mentions(low, p, norm) for p in when["all"]):
            continue
        if "age_max" in when and (age is None or age > when["age_max"]):
            continue
        if "age_min" in when and (age is None or age < when["age_min"]):
            continue
        if when.get("pregnant") and not pregnant:
            continue
        if "duration_days_min" in when and (days is None or days < when["duration_days_min"]):
            continue
        hits.append((rule["level"], rule["id"], rule["reason"]))
    if not hits:
        return Triage("LOW", "No warning signs in what you described; self-care advice applies.", [], [])
    top = max(hits, key=lambda h: LEVEL_RANK[h[0]])[0]
    chosen = [h for h in hits if h[0] == top]
    reason = " ".join(dict.fromkeys(h[2] for h in chosen))
    if flags and top == "HIGH":
        reason = f"{reason} ({'; '.join(f['name'] for f in flags)})"
    return Triage(top, reason, [h[1] for h in chosen], flags if top == "HIGH" else [])


def department(kb: KnowledgeBase, condition_ids: list[str], level: str) -> str:
    """The department to send the patient to: Emergency on HIGH, else the first known
    condition's department, else General Practice."""
    if level == "HIGH":
        return "Emergency"
    for cid in condition_ids:
        if cid in kb.conditions:
            return kb.conditions[cid]["department"]
    return "General Practice"
