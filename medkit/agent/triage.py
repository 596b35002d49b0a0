"""Rule-based triage (LOW / MEDIUM / HIGH) from ``data/kb/triage_rules.yaml`` and the red-flag
lexicon ``data/kb/red_flags.yaml``. The highest level any rule reaches wins; the reasons of the
winning level are kept, and every fired red flag carries its emergency instruction."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..kb import KnowledgeBase

LEVEL_RANK = {"LOW": 0, "MEDIUM": 1, "HIGH": 2}
# a phrase right after one of these (within three words, in the same clause) is denied, not
# reported: "no chest pain", "I don't feel suicidal", "denies shortness of breath". Punctuation
# and the words in _BREAK end the negation's reach: "my spray isn't helping, the chest pain..."
_NEGATOR = (r"no|not|never|without|deni\w*|don't|dont|do not|doesn't|doesnt|does not|didn't|didnt|haven't|havent|"
            r"hasn't|hasnt|isn't|isnt|wasn't|wasnt|aren't|arent|free of|no sign of|no signs of|negative for|ruled out")
_BREAK = r"but|why|what|how|and|so|because|since|though|although|yet|however|except|if|whether|now|then|until|when"
_NEGATION = re.compile(rf"\b(?:{_NEGATOR})\b(?:[ \t]+(?!(?:{_BREAK})\b)[\w']+){{0,3}}[ \t]*$")
# a phrase named as a topic, not as something happening: "risk of having a heart attack",
# "preventing a stroke", "the seizure threshold"
_TOPIC_BEFORE = re.compile(r"\b(?:risks?|chances?|likelihood|odds) of\s+(?:[\w']+\s+)?$|"
                           r"\b(?:prevent\w*|avoid\w*)\s+(?:[\w']+\s+)?$")
_TOPIC_AFTER = re.compile(r"^\W{0,2}\s*(?:risks?|threshold|prevention|vaccin\w*|medic\w*|awareness|scores?)\b")
# many tablets at once (an overdose, whatever the medicine): "took 30 paracetamol", "ate a
# handful of pills", "taken 20 of my diazepam tablets"; not "12 tablets a day"
_MANY_TABLETS = re.compile(
    r"\b(?:took|taken|swallowed|ate|eaten|downed|necked)\s+(?:about\s+|around\s+|over\s+|nearly\s+|almost\s+|like\s+)?"
    r"(?P<n>\d+|a dozen|dozens|a handful|handfuls|loads|lots|a load|(?:a|the|a whole|the whole) (?:box|packet|pack|"
    r"bottle|strip|tub|blister pack)|all (?:of )?(?:my |his |her |their )?[\w-]+'s)\s+"
    r"(?:of\s+)?(?:[\w'-]+\s+){0,4}?(?:tablets?|pills?|capsules?|caps|paracetamol|ibuprofen|aspirin|painkillers?|"
    r"sleeping|meds|medicines?|antidepressants?)\b(?!\s+(?:a|per|each|every)\s+day|\s+daily|\s+over\b)")
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


_WORD = re.compile(r"[a-z0-9']+|\|")  # "|" marks the end of a clause (., ; : ! ?)
_IRREGULAR = {"is": "be", "are": "be", "was": "be", "were": "be", "am": "be", "swollen": "swell", "went": "go",
              "gone": "go", "feels": "feel", "felt": "feel"}
# one form for people: the lexicon says "my arm", a carer writes "his arm" or "her arm"
_PEOPLE = {"he": "i", "she": "i", "they": "i", "you": "i", "we": "i", "his": "my", "her": "my", "their": "my",
           "your": "my", "our": "my", "him": "me", "them": "me", "us": "me", "i'm": "i be", "im": "i be",
           "he's": "i be", "she's": "i be", "they're": "i be", "you're": "i be", "we're": "i be"}
# one spelling for negative contractions: "inhaler isn't working" = "inhaler is not working"
_CONTRACTIONS = {"isn't": "be not", "isnt": "be not", "aren't": "be not", "arent": "be not", "wasn't": "be not",
                 "wasnt": "be not", "weren't": "be not", "don't": "do not", "dont": "do not", "doesn't": "do not",
                 "doesnt": "do not", "didn't": "do not", "didnt": "do not", "can't": "can not", "cant": "can not",
                 "cannot": "can not", "couldn't": "can not", "couldnt": "can not", "won't": "will not",
                 "wont": "will not", "hasn't": "have not", "hasnt": "have not", "haven't": "have not",
                 "havent": "have not"}
# one word for everyday synonyms, on both sides of a match
_SYNONYMS = {"pill": "tablet", "pills": "tablet", "capsule": "tablet", "capsules": "tablet", "tummy": "stomach",
             "belly": "stomach", "abdomen": "stomach", "abdominal": "stomach", "wee": "pee", "urinate": "pee",
             "mum": "mother", "mom": "mother", "mam": "mother", "dad": "father", "raise": "lift", "raised": "lifted",
             "puffy": "swollen", "puffed": "swollen", "wheezy": "wheezing", "wheeze": "wheezing"}
_PHRASES = [(re.compile(r"\b(?:all of a sudden|out of nowhere|out of the blue|without warning)\b"), "suddenly"),
            (re.compile(r"\bsudden(?=\s)"), "suddenly")]


def _stem(word: str) -> str:
    """A crude stem, the same for the text and the lexicon: "killing" → "kill", "swelling" →
    "swell", "lips" → "lip"; forms of "be" → "be"; pronouns and a few synonyms to one form."""
    if word in _PEOPLE:
        return _PEOPLE[word]
    if word in _CONTRACTIONS:
        return _CONTRACTIONS[word]
    if word in _SYNONYMS:
        word = _SYNONYMS[word]
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
    low = text.lower().replace("’", "'")
    for pat, repl in _PHRASES:
        low = pat.sub(repl, low)
    low = re.sub(r"[.!?;,:]+(?=\s|$)", " | ", low)  # a match never runs across a clause boundary
    return " ".join(_stem(w) for w in _WORD.findall(low))


_LOOSE: dict[str, re.Pattern] = {}


def _loose_pattern(phrase: str) -> re.Pattern:
    """The phrase's stems in order, with at most one other word between neighbours
    ("arm went weak" also finds "arm suddenly went weak"); " ... " in a phrase allows up to six
    words ("swallowed ... battery" finds "swallowed one of those small watch batteries")."""
    if phrase not in _LOOSE:
        parts = []
        for part in phrase.split("..."):
            toks = [re.escape(t) for t in normalise(part).split()]
            if toks:
                parts.append(r"(?:\s+[^\s|]+)?\s+".join(toks))
        _LOOSE[phrase] = (re.compile(r"(?<![^\s])" + r"(?:\s+[^\s|]+){0,6}\s+".join(parts) + r"(?![^\s])") if parts
                          else re.compile(r"(?!)"))
    return _LOOSE[phrase]


def _not_negated(text: str, start: int, end: int | None = None) -> bool:
    before = text[max(0, start - 60): start]
    if _NEGATION.search(before) or _TOPIC_BEFORE.search(before):
        return False
    return end is None or not _TOPIC_AFTER.search(text[end: end + 30])


def mentions(text: str, phrase: str, normalised: str | None = None) -> bool:
    """``phrase`` occurs in ``text`` (lower-case), not negated just before it ("no chest pain")
    and not named as a topic ("risk of a heart attack"): verbatim, or (when ``normalised`` =
    ``normalise(text)`` is given) as word stems in order with at most one other word between
    them (up to six at a " ... " in the phrase)."""
    start = 0
    while "..." not in phrase:
        i = text.find(phrase, start)
        if i < 0:
            break
        if _not_negated(text, i, i + len(phrase)):
            return True
        start = i + 1
    if normalised is not None:
        for m in _loose_pattern(phrase).finditer(normalised):
            if _not_negated(normalised, m.start(), m.end()):
                return True
    return False


def many_tablets(text: str) -> bool:
    """Many tablets taken at once (ten or more, a handful, a whole packet), not negated."""
    for m in _MANY_TABLETS.finditer(text.lower()):
        n = m.group("n")
        if (not n.isdigit() or int(n) >= 10) and _not_negated(text.lower(), m.start()):
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
        if (any(mentions(low, p, norm) for p in f["any"]) or (f["id"] == "overdose_or_poisoning" and many_tablets(low))) and (
                not f.get("with_any") or any(mentions(both, p, norm_both) for p in f["with_any"])):
            fired.append({"id": f["id"], "name": f["name"], "action": " ".join(f["action"].split())})
    return fired


_ACTION_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def action_sentences(action: str) -> list[str]:
    """A red flag's instruction, sentence by sentence (what :func:`personal_action` may replace)."""
    return _ACTION_SENTENCE.split(" ".join(action.split()))


def personal_action(kb: KnowledgeBase, flag: dict[str, Any], patient: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """A red flag's emergency instruction for this patient. The flag names the medicines its
    instruction offers that a record may rule out (``withhold_if_ruled_out``: aspirin in chest
    pain, never adrenaline in anaphylaxis or a reliever inhaler, which nothing rules out in an
    emergency). A sentence naming one of them, for a patient whose record rules it out (allergy, a
    major interaction with what they take, age, pregnancy, kidneys: ``auditor.drug_issues`` at
    ``block``), is replaced by one that tells them not to take it unless the emergency call
    handler says so, and why. The generic wording ("if you are not allergic to aspirin and have
    not been told to avoid it") asks the patient to know this; the assistant does know it.
    Returns the text and the medicines held back."""
    from .auditor import drug_issues

    candidates = [d for d in flag.get("withhold_if_ruled_out", []) if d in kb.drugs]
    out, held = [], []
    for sentence in action_sentences(flag["action"]):
        named = [did for did in candidates
                 if any(re.search(rf"\b{re.escape(n)}\b", sentence, re.I)
                        for n in [kb.drugs[did]["name"], *kb.drugs[did].get("other_names", [])])]
        issue = next((i for did in named for i in drug_issues(kb, did, patient) if i["severity"] == "block"), None)
        if issue is None:
            out.append(sentence)
            continue
        name = kb.drugs[issue["drug"]]["name"]
        if issue["type"] == "allergy":
            why = f"you told me you are allergic to {issue['detail'].rsplit('allergic to ', 1)[1]}"
        elif issue["type"] == "interaction":
            why = f"you take {kb.drugs[issue['with']]['name']} ({issue['detail'].split(': ', 1)[1]})"
        else:
            why = issue["detail"]
        out.append(f"Do not take {name} unless the emergency call handler tells you to: {why}.")
        held.append({"drug": issue["drug"], "type": issue["type"], "detail": issue["detail"]})
    return " ".join(out), held


def triage(kb: KnowledgeBase, text: str, patient: dict[str, Any] | None = None, context: str = "") -> Triage:
    """Triage one message given what is known of the patient (``age`` in years, ``pregnant``,
    and the ``allergies``, ``medications`` and ``conditions`` that make a red flag's instruction
    personal: :func:`personal_action`) and, optionally, the patient's previous message as
    ``context`` for red flags."""
    patient = patient or {}
    low = " ".join(text.lower().replace("’", "'").split())
    norm = normalise(low)
    flags = []
    by_id = {f["id"]: f for f in kb.red_flags}
    for f in red_flags(kb, low, context):
        action, held = personal_action(kb, by_id[f["id"]], patient)
        flags.append({**f, "action": action, **({"held": held} if held else {})})
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


def levels(texts: list[str], kb: KnowledgeBase | None = None) -> list[str]:
    """The level 07's agent gives each text on its own (no patient record): a column to set beside
    a model's raw replies in 02 and 03, which have no safety layer, so that a reader sees which
    questions the assistant would open with the emergency instruction."""
    if kb is None:
        from .. import kb as knowledge_base

        kb = knowledge_base.load()
    return [triage(kb, t).level for t in texts]


def department(kb: KnowledgeBase, condition_ids: list[str], level: str) -> str:
    """The department to send the patient to: Emergency on HIGH, else the first known
    condition's department, else General Practice."""
    if level == "HIGH":
        return "Emergency"
    for cid in condition_ids:
        if cid in kb.conditions:
            return kb.conditions[cid]["department"]
    return "General Practice"
