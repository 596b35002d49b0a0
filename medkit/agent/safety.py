"""The safety validator: the last gate before an answer leaves the agent.

    response, report = validate(response, patient_context)
    response, report = check(response, question, memory, context)   # the one path for callers

``check`` is what the agent (step 8) and the API gateway (``/generate`` with ``use_safety``,
``/chat``) call: it reads the facts the question states (allergies, medicines, pregnancy, age)
into the patient's memory and validates the answer in the context of that question.

``response`` is the answer text; ``patient_context`` holds what is known of the patient
(``allergies``, ``medications``, ``conditions``, ``pregnant``, ``age``), the patient's
``message`` and optionally the previous message as ``context``. Three checks, independent of the auditor: drug interactions and contraindications
of every medicine the answer recommends, emergency detection on the message, and dosage
ceilings of every amount the answer states. Problems are fixed in the returned text (the
emergency instruction goes first, warnings are appended) and listed in the report:
``{"risk_level": LOW|MEDIUM|HIGH, "warnings": [...], "emergency": bool, "emergency_instruction":
str | None, "checked": {...}}``.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from .. import kb as knowledge_base
from ..kb import KnowledgeBase
from ..rag.query import QueryAnalyzer
from . import answer, auditor, triage
from . import memory as memory_mod
from .memory import FactExtractor

_RISK = {"LOW": 0, "MEDIUM": 1, "HIGH": 2}


@lru_cache(maxsize=2)
def _default_extractor(folder: str) -> FactExtractor:
    kb = knowledge_base.load(folder)
    return FactExtractor(kb, QueryAnalyzer(kb))


EMPTY_MEMORY = {"allergies": [], "conditions": [], "medications": [], "age": None, "sex": None, "pregnant": None}


def check(response: str, question: str, memory: dict[str, Any] | None = None, context: str = "",
          kb: KnowledgeBase | None = None, extractor: FactExtractor | None = None) -> tuple[str, dict[str, Any]]:
    """Validate ``response`` as the answer to ``question``: the facts the question states join
    the patient's ``memory`` (what a store remembers; empty when unknown), the question decides
    emergencies (with ``context``, the previous message). Returns ``validate``'s (text, report);
    the report also holds the ``memory`` used."""
    if not isinstance(question, str):
        raise TypeError(f"check: question must be text (str), got {type(question).__name__}")
    if extractor is None:
        extractor = _default_extractor(str((kb.source if kb else knowledge_base.load().source).resolve()))
    base = {**EMPTY_MEMORY, **(memory or {})}
    add, remove = extractor.extract(question)
    mem = memory_mod.apply(base, add, remove)
    text, report = validate(response, {**mem, "message": question, "context": context}, extractor=extractor)
    report["memory"] = {k: mem.get(k) for k in ("allergies", "medications", "conditions", "pregnant", "age")}
    return text, report


def validate(response: str, patient_context: dict[str, Any] | None = None, kb: KnowledgeBase | None = None,
             extractor: FactExtractor | None = None) -> tuple[str, dict[str, Any]]:
    if not isinstance(response, str):
        raise TypeError(f"validate: response must be the answer text (str), got {type(response).__name__}")
    ctx = dict(patient_context or {})
    if extractor is None:
        extractor = _default_extractor(str((kb.source if kb else knowledge_base.load().source).resolve()))
    kb = extractor.kb
    memory = {"allergies": list(ctx.get("allergies") or []), "medications": list(ctx.get("medications") or []),
              "conditions": list(ctx.get("conditions") or []), "pregnant": bool(ctx.get("pregnant")),
              "age": ctx.get("age")}
    unknown = [m for m in memory["medications"] if m not in kb.drugs]
    memory["medications"] = [m for m in memory["medications"] if m in kb.drugs]
    warnings: list[dict[str, Any]] = []
    if unknown:
        warnings.append({"type": "unknown_medication", "level": "MEDIUM", "drugs": unknown,
                         "detail": f"not in the knowledge base, so not checked: {unknown}"})
    sentences = answer.parse(response, extractor.drug_ids)
    recommended = answer.recommended_drugs(sentences)
    warned = {d for s in sentences if s.kind == "warning" for d in s.drugs}
    additions: list[str] = []
    for did in recommended:
        for issue in auditor.drug_issues(kb, did, memory):
            if did in warned:
                continue
            level = "HIGH" if issue["severity"] == "block" else "MEDIUM"
            warnings.append({"type": issue["type"], "level": level, "drugs": [did] + ([issue["with"]] if issue.get("with") else []),
                             "detail": issue["detail"]})
            additions.append(f"Safety check: {issue['detail']}. Do not start it without a pharmacist's or doctor's advice."
                             if level == "HIGH" else f"Safety check: {issue['detail']}.")
    # dosage: any stated amount above the knowledge base's ceiling for that drug
    n_doses = 0
    for s in sentences:
        if s.kind == "warning" or len(s.drugs) != 1:
            continue
        ref = kb.drugs[s.drugs[0]]["adult_dose"]
        for m in auditor._AMOUNT.finditer(s.text):
            n_doses += 1
            amount, unit = float(m.group(1)), m.group(2).lower()
            if unit == "g" and ref["unit"] == "mg":
                amount, unit = amount * 1000, "mg"
            ceiling = max(ref["single_dose_max"], ref["max_daily"] or 0)
            if unit == ref["unit"] and amount > ceiling:
                detail = (f"{m.group(0)} of {kb.drugs[s.drugs[0]]['name']} is above the usual adult ceiling "
                          f"({ceiling:g} {ref['unit']})")
                warnings.append({"type": "dose", "level": "HIGH", "drugs": s.drugs, "detail": detail})
                additions.append(f"Safety check: {detail}; do not exceed the usual dose.")
    # emergencies: the patient's message decides, whatever the answer says
    t = triage.triage(kb, ctx.get("message", ""), memory, ctx.get("context", ""))
    emergency = t.level == "HIGH"
    out = response
    actions: list[str] = []
    if emergency:
        actions = list(dict.fromkeys(f["action"] for f in t.red_flags)) or [
            " ".join(kb.triage["levels"]["HIGH"]["action"].split())]
        for h in {(h["drug"], h["detail"]): h for f in t.red_flags for h in f.get("held", [])}.values():
            warnings.append({"type": "emergency_action_adjusted", "level": "HIGH", "drugs": [h["drug"]],
                             "detail": f"the emergency instruction's {kb.drugs[h['drug']]['name']} is held back "
                                       f"for this patient: {h['detail']}"})
        if not any(out.lstrip().startswith(a) for a in actions):
            out = " ".join(actions) + "\n\n" + out
            warnings.append({"type": "emergency_not_first", "level": "HIGH", "drugs": [],
                             "detail": "the emergency instruction was missing at the top and was added"})
    if additions:
        out = out.rstrip() + "\n\n" + " ".join(dict.fromkeys(additions))
    if answer.NOTICE not in out:
        out = out.rstrip() + "\n\n" + answer.NOTICE
    risk = max([w["level"] for w in warnings] + ["HIGH" if emergency else "LOW"], key=_RISK.get)
    report = {"risk_level": risk, "warnings": warnings, "emergency": emergency,
              "emergency_instruction": " ".join(actions) or None,
              "checked": {"recommended_drugs": recommended, "doses": n_doses, "triage": t.level,
                          "triage_reason": t.reason}}
    return out, report
