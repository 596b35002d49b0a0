"""Draft → Medical Auditor critique → refine, on the sentence form of ``answer``.

The auditor checks each draft against the patient's memory and the knowledge base:
contraindicated drugs (allergy class, pregnancy, renal limits, age limits), interactions with
current medications, doses outside the knowledge base's range, a missed red flag, and claims
without a citation. It returns a structured critique; ``refine`` acts on every issue in it.
On the tiny profile drafting and refining are rule- and knowledge-base-driven (extractive from
the retrieved evidence); on GPU profiles an LLM writes the draft and the refinement (see
``medkit.agent.llm``) and this same auditor checks it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from ..kb import KnowledgeBase
from . import ddi
from .answer import WARNING_CUE, Sentence
from .memory import RENAL

_TREAT_Q = re.compile(r"\b(what (medicine|medication|tablets?|pills?|antibiotic|painkiller|treatment|can i|should i|"
                      r"helps?|do i take|is best)|how (is|do you|can i|should i) (it |this )?treat|how to treat|"
                      r"what can (i|we) (take|give|do)|anything (i|we) can take|treatment for|treat (it|this|my))\b", re.I)
_CAN_TAKE = re.compile(r"\b(can|could|should|may) (i|we|he|she|they) (take|have|use|start|give|try)|\bis (it )?(ok|okay|safe|"
                       r"alright|fine)\b|\bsafe to (take|use|give)\b|\bok to (take|use|give)\b|\bwhat about\b", re.I)
_DOSE_Q = re.compile(r"\b(how much|how many|dose|dosage|how often|mg\b)", re.I)
_AMOUNT = re.compile(r"(\d+(?:\.\d+)?)\s*(mg|g|micrograms?|mcg|ml|units?|puffs?)\b", re.I)
_PER_DAY = re.compile(r"\b(a day|per day|daily|each day|in 24 hours|every day|a night)\b", re.I)
_AGE_LIMIT = re.compile(r"(?:children|child|infants?|adolescents?|people|patients)?[^;,()]*?\bunder (\d+) (years?|months?)", re.I)


@dataclass
class Evidence:
    """The numbered evidence of one turn ([E1], [E2], ...), from retrieval and KB lookups."""

    passages: dict[str, str]
    items: list[dict[str, str]] = field(default_factory=list)

    def add(self, pid: str, text: str | None = None) -> int | None:
        for n, e in enumerate(self.items, 1):
            if e["id"] == pid:
                return n
        text = text if text is not None else self.passages.get(pid)
        if text is None:
            return None
        self.items.append({"id": pid, "text": text})
        return len(self.items)


@dataclass
class TurnState:
    message: str
    memory: dict[str, Any]
    triage: Any                       # triage.Triage
    evidence: Evidence
    retrieved: list[tuple[str, float]]
    message_drugs: list[str]
    message_conditions: list[str]
    stated_doses: list[dict[str, Any]]
    intents: set[str]
    new_facts: list = field(default_factory=list)
    entity_terms: list = field(default_factory=list)  # canonical conditions, drugs and symptoms named

    def topic_conditions(self) -> list[str]:
        if self.message_conditions:  # the conditions named in the question come first
            question = next((q for q in reversed(re.findall(r"[^.!?]+\?", self.message))), "").lower()
            return sorted(self.message_conditions, key=lambda c: c.replace("_", " ").split()[-1] not in question)
        return list(dict.fromkeys(pid.split(".")[1] for pid, _ in self.retrieved if pid.startswith("cond.")))[:1]


def intents(message: str) -> set[str]:
    out = set()
    if _TREAT_Q.search(message):
        out.add("treatment")
    if _CAN_TAKE.search(message):
        out.add("can_take")
    if _DOSE_Q.search(message):
        out.add("dose")
    return out


def stated_doses(message: str, drug_ids) -> list[dict[str, Any]]:
    """Doses the patient names ("2 g of paracetamol", "ibuprofen 800 mg three times a day")."""
    out = []
    for s in re.findall(r"[^.!?\n]+", message):
        drugs = drug_ids(s)
        if len(drugs) != 1:
            continue
        for m in _AMOUNT.finditer(s):
            unit = m.group(2).lower()
            unit = {"mcg": "microgram", "micrograms": "microgram", "units": "unit", "ml": "mL", "puffs": "puff"}.get(unit, unit)
            per = "day" if _PER_DAY.search(s) else "dose"
            out.append({"drug": drugs[0], "amount": float(m.group(1)), "unit": unit, "per": per})
    return out


# ---------------------------------------------------------------- draft

def _passage_sentence(state: TurnState, pid: str, drug_ids, kind: str | None = None) -> Sentence | None:
    n = state.evidence.add(pid)
    if n is None:
        return None
    text = state.evidence.items[n - 1]["text"]
    drugs = drug_ids(text)
    if kind is None:
        kind = "warning" if WARNING_CUE.search(text) else ("recommend" if drugs else "info")
    return Sentence(text, [n], kind, drugs)


def _relevant(state: TurnState, pid: str) -> bool:
    """A passage is about what the patient mentioned: its condition or drug, or one of the
    conditions, drugs or symptoms named in the message appears in it."""
    topics = {f"cond.{c}." for c in state.message_conditions} | {f"drug.{d}." for d in state.message_drugs}
    text = state.evidence.passages.get(pid, "").lower()
    return any(pid.startswith(t) for t in topics) or any(t.lower() in text for t in state.entity_terms)


def asked_drugs(state: TurnState) -> list[str]:
    """The medicines the patient asks about (named in the message, not ones they already take)."""
    return [d for d in state.message_drugs if d not in state.memory.get("medications", [])]


def drugs_in_question(state: TurnState, kb: KnowledgeBase) -> list[str]:
    """Every medicine this turn's answer is about, whatever the draft says: the ones the patient asks
    about and, for a treatment question, the first-line medicines of its condition (the knowledge
    base's). The auditor warns about these from the patient's record even when a draft leaves them out."""
    out = asked_drugs(state)
    topics = state.topic_conditions() if "treatment" in state.intents else []
    if topics:
        out += list(kb.conditions.get(topics[0], {}).get("first_line_drugs", []))
    return list(dict.fromkeys(d for d in out if d in kb.drugs))


def rule_draft(state: TurnState, kb: KnowledgeBase, drug_ids) -> list[Sentence]:
    """An extractive first draft that answers the question from the evidence. It does not look
    at the patient's memory: that is the auditor's job, so the draft can be unsafe."""
    out: list[Sentence] = []
    if state.triage.level == "HIGH":  # the emergency comes first; add only what to watch for
        for pid, _ in state.retrieved:
            pid = pid.split("#")[0]
            if pid.endswith(".red_flags") and _relevant(state, pid):
                s = _passage_sentence(state, pid, drug_ids, "info")
                return [s] if s else []
        return []
    if not state.intents and "?" not in state.message and state.new_facts:
        return []  # the patient told us something; the agent acknowledges what it remembered
    asked = asked_drugs(state)
    if asked and (state.intents & {"can_take", "dose"} or "treatment" not in state.intents):
        for d in asked[:2]:
            for section, kind in (("overview", "recommend"), ("dose", "dose")):
                s = _passage_sentence(state, f"drug.{d}.{section}", drug_ids, kind)
                if s:
                    s.drugs = [d]
                    out.append(s)
    elif "treatment" in state.intents and state.topic_conditions():
        c = state.topic_conditions()[0]
        s = _passage_sentence(state, f"cond.{c}.treatment", drug_ids, "recommend")
        if s:
            s.drugs = list(kb.conditions[c]["first_line_drugs"])
            out.append(s)
    if not out:  # a general question: the top passages about what the patient mentioned
        for pid, _ in state.retrieved:
            pid = pid.split("#")[0]
            if _relevant(state, pid):
                s = _passage_sentence(state, pid, drug_ids)
                if s:
                    out.append(s)
            if len(out) == 2:
                break
    return out


# ---------------------------------------------------------------- critique

def _age_limit_years(text: str) -> float | None:
    m = _AGE_LIMIT.search(text)
    if not m:
        return None
    n = float(m.group(1))
    return n / 12 if m.group(2).lower().startswith("month") else n


def drug_issues(kb: KnowledgeBase, did: str, memory: dict[str, Any]) -> list[dict[str, Any]]:
    """Why drug ``did`` may be unsafe for this patient (allergy, pregnancy, kidneys, age,
    interactions with current medicines). ``severity`` is block or caution."""
    d = kb.drugs[did]
    issues = []
    allergies = set(memory.get("allergies") or [])
    if did in allergies or (d.get("allergy_class") and d["allergy_class"] in allergies):
        allergen = did if did in allergies else d["allergy_class"]
        issues.append({"type": "allergy", "severity": "block", "drug": did, "evidence": f"drug.{did}.cautions",
                       "detail": f"{d['name']} ({d['drug_class']}): the patient is allergic to {allergen}"})
    if memory.get("pregnant"):
        if d["pregnancy"] == "avoid":
            issues.append({"type": "pregnancy", "severity": "block", "drug": did, "evidence": f"drug.{did}.cautions",
                           "detail": f"{d['name']} is to be avoided in pregnancy: {d['pregnancy_note']}"})
        elif d["pregnancy"] == "caution":
            issues.append({"type": "pregnancy", "severity": "caution", "drug": did, "evidence": f"drug.{did}.cautions",
                           "detail": f"{d['name']} needs caution in pregnancy: {d['pregnancy_note']}"})
    if set(memory.get("conditions") or []) & RENAL:
        renal = d["renal"]
        if re.search(r"\bavoid\b", renal, re.I):
            issues.append({"type": "renal", "severity": "block", "drug": did, "evidence": f"drug.{did}.cautions",
                           "detail": f"kidney disease: {renal}"})
        elif not re.search(r"no (dose )?adjustment", renal, re.I):
            issues.append({"type": "renal", "severity": "caution", "drug": did, "evidence": f"drug.{did}.cautions",
                           "detail": f"kidney disease: {renal}"})
    age = memory.get("age")
    if age is not None:
        for ci in d["contraindications"]:
            limit = _age_limit_years(ci)
            if limit is not None and age < limit:
                issues.append({"type": "age", "severity": "block", "drug": did, "evidence": f"drug.{did}.cautions",
                               "detail": f"{d['name']} is contraindicated here: {ci}"})
                break
    for hit in ddi.check(kb, [did], [m for m in memory.get("medications") or [] if m != did]):
        if hit["severity"] == "minor":
            continue
        other = hit["drugs"][0] if hit["drugs"][1] == did else hit["drugs"][1]
        sev = "block" if hit["severity"] in ("major", "contraindicated") else "caution"
        issues.append({"type": "interaction", "severity": sev, "drug": did, "with": other,
                       "evidence": hit["evidence"] or f"ddi_class.{hit['source'].split(':', 1)[1]}",
                       "evidence_text": None if hit["evidence"] else
                       f"{hit['effect'].capitalize()} ({hit['severity']} interaction, class rule). Advice: {hit['advice']}.",
                       "detail": f"{d['name']} with {kb.drugs[other]['name']} ({hit['severity']}): {hit['effect']}"})
    return issues


def dose_issue(kb: KnowledgeBase, dose: dict[str, Any], memory: dict[str, Any]) -> dict[str, Any] | None:
    d = kb.drugs[dose["drug"]]
    ref = d["adult_dose"]
    amount, unit = dose["amount"], dose["unit"]
    if unit == "g" and ref["unit"] == "mg":
        amount, unit = amount * 1000, "mg"
    if unit != ref["unit"]:
        return None
    limit = ref["single_dose_max"] if dose["per"] == "dose" else ref["max_daily"]
    if limit is not None and amount > limit:
        return {"type": "dose", "severity": "block", "drug": d["id"], "evidence": f"drug.{d['id']}.dose",
                "detail": f"{amount:g} {unit} per {dose['per']} of {d['name']} is above the usual adult maximum "
                          f"of {limit:g} {unit} per {dose['per']}"}
    return None


def critique(sentences: list[Sentence], state: TurnState, kb: KnowledgeBase, round_no: int) -> dict[str, Any]:
    """The Medical Auditor's structured critique of one draft."""
    issues: list[dict[str, Any]] = []
    warned = {(s.drugs[0] if s.drugs else None, s.issue) for s in sentences if s.kind == "warning"}
    seen = set()
    for i, s in enumerate(sentences):
        if s.kind in ("recommend", "dose", "info"):
            for did in s.drugs:
                for issue in drug_issues(kb, did, state.memory):
                    key = (issue["type"], did, issue.get("with"))
                    if key in seen or (issue["severity"] == "caution" and (did, issue["type"]) in warned):
                        continue
                    seen.add(key)
                    issues.append({**issue, "sentence": i})
        if s.kind == "dose" and state.memory.get("age") is not None and state.memory["age"] < 12:
            issues.append({"type": "adult_dose_for_child", "severity": "block", "drug": s.drugs[0] if s.drugs else None,
                           "sentence": i, "evidence": None,
                           "detail": "an adult dose was given for a child; children's doses depend on age and weight"})
        # every claim cites; so does a warning the auditor did not write itself (an LLM's)
        if s.kind in ("info", "recommend", "dose") or (s.kind == "warning" and s.issue is None):
            bad = [n for n in s.cites if not 1 <= n <= len(state.evidence.items)]
            if not s.cites or bad:
                issues.append({"type": "uncited", "severity": "block", "sentence": i, "drug": None, "evidence": None,
                               "detail": f"claim without a valid citation: {s.text[:80]!r}"})
    # what the patient's record says about the medicines in question, said even when the draft
    # leaves them out (a draft that names no penicillin must still warn a penicillin-allergic
    # patient asking how tonsillitis is treated)
    for did in drugs_in_question(state, kb):
        for issue in drug_issues(kb, did, state.memory):
            key = (issue["type"], did, issue.get("with"))
            if key in seen or (did, issue["type"]) in warned:
                continue
            seen.add(key)
            issues.append({**issue, "sentence": None, "unwarned": True})
    for dose in state.stated_doses:
        issue = dose_issue(kb, dose, state.memory)
        if issue and (issue["drug"], "dose") not in warned:
            issues.append({**issue, "sentence": None})
    if state.triage.level == "HIGH" and not (sentences and sentences[0].kind == "emergency"):
        issues.append({"type": "missed_red_flag", "severity": "block", "drug": None, "sentence": None, "evidence": None,
                       "detail": f"triage is HIGH ({state.triage.reason}) but the answer does not start with the "
                                 "emergency instruction"})
    return {"round": round_no, "issues": issues, "ok": not issues}


# ---------------------------------------------------------------- refine

def _warning_text(kb: KnowledgeBase, issue: dict[str, Any]) -> str:
    d = kb.drugs.get(issue.get("drug") or "", {})
    name = d.get("name", "this medicine")
    t = issue["type"]
    if t == "allergy":
        cls = d["drug_class"]
        return (f"Do not take {name}: you told me you are allergic to {issue['detail'].rsplit('allergic to ', 1)[1]}, "
                f"and {name} is {'an' if cls[0] in 'aeiou' else 'a'} {cls}.")
    if t == "pregnancy":
        verb = "Avoid" if issue["severity"] == "block" else "Check with your midwife, GP or pharmacist before using"
        return f"{verb} {name} in pregnancy: {d['pregnancy_note']}"
    if t == "renal":
        verb = "Do not take" if issue["severity"] == "block" else "Check with your doctor before taking"
        return f"{verb} {name} without your kidney team's advice: {d['renal']}"
    if t == "age":
        return f"Do not give {name}: {issue['detail'].split(': ', 1)[1]}."
    if t == "interaction":
        other = kb.drugs[issue["with"]]["name"]
        if issue["severity"] == "block":
            return f"Do not take {name} with your {other} unless your prescriber says so: {issue['detail'].split(': ', 1)[1]}."
        return f"Caution: {name} interacts with your {other}: {issue['detail'].split(': ', 1)[1]}; ask your pharmacist."
    if t == "dose":
        return f"Do not take that much: {issue['detail']}; stay within the usual dose or ask a pharmacist."
    return issue["detail"]


def refine(sentences: list[Sentence], crit: dict[str, Any], state: TurnState, kb: KnowledgeBase,
           levels: dict[str, Any]) -> list[Sentence]:
    """Act on every issue of the critique and return the next draft."""
    issues = crit["issues"]
    blocked = {i["drug"] for i in issues if i["severity"] == "block" and i["drug"]
               and i["type"] not in ("adult_dose_for_child", "dose")}  # a bad amount is not a bad drug
    drop = {i["sentence"] for i in issues if i["type"] in ("uncited", "adult_dose_for_child") and i["sentence"] is not None}
    out: list[Sentence] = []
    replaced_topic = False
    for i, s in enumerate(sentences):
        if i in drop:
            continue
        if s.kind in ("recommend", "dose", "info") and set(s.drugs) & blocked:
            keep = [d for d in s.drugs if d not in blocked]
            if len(s.drugs) > 1 and not replaced_topic:  # a list of options: offer what remains
                replaced_topic = True
                if keep:
                    names = ", ".join(kb.drugs[d]["name"] for d in keep)
                    out.append(Sentence(f"Of the usual first-line medicines, these remain to discuss with a pharmacist "
                                        f"or doctor: {names}.", list(s.cites), "recommend", keep))
                else:
                    out.append(Sentence("Ask a pharmacist or doctor for an alternative that suits you.", [], "advice"))
            continue
        out.append(s)
    if any(i["type"] == "adult_dose_for_child" for i in issues):
        out.append(Sentence("Children's doses depend on age and weight: use the dose on a children's product's label "
                            "or ask a pharmacist.", [], "advice"))
    done = set()
    for issue in issues:
        if issue["type"] in ("uncited", "missed_red_flag", "adult_dose_for_child"):
            continue
        key = (issue["type"], issue["drug"], issue.get("with"))
        if key in done:
            continue
        done.add(key)
        n = state.evidence.add(issue["evidence"], issue.get("evidence_text")) if issue.get("evidence") else None
        out.append(Sentence(_warning_text(kb, issue), [n] if n else [], "warning", [issue["drug"]] if issue["drug"] else [],
                            issue["type"]))
    if any(i["type"] == "missed_red_flag" for i in issues):
        actions = list(dict.fromkeys(f["action"] for f in state.triage.red_flags)) or [
            " ".join(levels["HIGH"]["action"].split())]
        out = [Sentence(a, [], "emergency") for a in actions] + [s for s in out if s.kind != "emergency"]
    return out


def final_fallback(sentences: list[Sentence], crit: dict[str, Any]) -> list[Sentence]:
    """When the rounds run out with issues left: drop every sentence an issue points at."""
    bad = {i["sentence"] for i in crit["issues"] if i.get("sentence") is not None}
    bad_drugs = {i["drug"] for i in crit["issues"] if i.get("drug")}
    return [s for i, s in enumerate(sentences)
            if i not in bad and not (s.kind in ("recommend", "dose", "info") and set(s.drugs) & bad_drugs)]
