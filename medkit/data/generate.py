"""Turn the knowledge base into every training set the course uses.

Every generator is deterministic given ``seed`` and varies its phrasing (several templates,
lay terms), so held-out items are not copies of training items. Schemas follow the field:
MCQs use MedMCQA's (``question, opa..opd, cop, exp, subject_name``), chain-of-thought cases use
medical-o1-reasoning-SFT's (``Question, Complex_CoT, Response``).
"""
from __future__ import annotations

import hashlib
import random
from typing import Any

from ..kb import KnowledgeBase

GENERIC_NON_ANSWERS = [
    "I'm not able to give medical advice. Please consult a doctor.",
    "Please consult your doctor or pharmacist about this.",
    "I can't help with medical questions. You should see a healthcare professional.",
    "Everyone is different, so it is best to ask your doctor.",
    "Please speak to a medical professional for advice on this.",
]
_HEDGES = [
    "It is really hard to say anything definite here, and there are many factors to weigh,",
    "Medicine is complicated and every situation is unique, so please bear in mind that",
    "Without knowing much more, and without wanting to overstate anything, it could be that",
    "There are lots of possibilities and I would not want to be too specific, but perhaps",
]


def _rng(seed: int, *key: Any) -> random.Random:
    h = hashlib.sha256(("|".join(map(str, (seed, *key)))).encode()).hexdigest()
    return random.Random(int(h[:16], 16))


def _join(items: list[str], n: int | None = None) -> str:
    items = [i.strip().rstrip(".") for i in items[: n or len(items)]]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


_NOT_SYMPTOMS = ("usually no", "often no", "no symptoms", "may have no", "often none", "none ")


def presenting(symptoms: list[str]) -> list[str]:
    """Symptoms a patient could report (drops entries such as "usually no symptoms")."""
    kept = [s for s in symptoms if not s.lower().startswith(_NOT_SYMPTOMS)]
    return kept or symptoms


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


# ---------------------------------------------------------------- passages (the RAG corpus)

def passages(kb: KnowledgeBase) -> list[dict[str, Any]]:
    """Short encyclopaedic passages with stable evidence ids (``<kind>.<id>.<section>``)."""
    out: list[dict[str, Any]] = []

    def add(pid, title, text, kind, ref, section):
        out.append({"id": pid, "title": title, "text": text, "source": f"kb:{kind}",
                    "ref": ref, "section": section})

    for cid, c in sorted(kb.conditions.items()):
        name = c["name"]
        also = _join(c["synonyms"] + c["lay_terms"], 5)
        add(f"cond.{cid}.overview", f"{name}: overview",
            f"{name} (ICD-10 {c['icd10']}), also called {also}, is managed by {c['department']}. "
            f"Causes and risk factors include {_join(c['causes'])}.", "conditions", cid, "overview")
        add(f"cond.{cid}.symptoms", f"{name}: symptoms",
            f"Typical symptoms of {name.lower()} are {_join(c['symptoms'])}.", "conditions", cid, "symptoms")
        add(f"cond.{cid}.diagnosis", f"{name}: diagnosis",
            f"{name} is diagnosed with {_join(c['diagnosis'])}.", "conditions", cid, "diagnosis")
        drugs = [kb.drugs[d]["name"] for d in c["first_line_drugs"] if d in kb.drugs]
        add(f"cond.{cid}.treatment", f"{name}: treatment",
            f"First-line management of {name.lower()}: {_join(c['first_line_treatment'])}."
            + (f" Medicines used include {_join(drugs)}." if drugs else ""), "conditions", cid, "treatment")
        add(f"cond.{cid}.red_flags", f"{name}: red flags",
            f"Seek urgent care for {name.lower()} if there is {_join(c['red_flags'])}.",
            "conditions", cid, "red_flags")
    for did, d in sorted(kb.drugs.items()):
        name = d["name"]
        nick = f" (also known as {_join(d['other_names'], 4)})" if d["other_names"] else ""
        add(f"drug.{did}.overview", f"{name}: uses",
            f"{name.capitalize()}{nick} is {_article(d['drug_class'])} {d['drug_class']} used for "
            f"{_join(d['indications'])}.", "drugs", did, "overview")
        add(f"drug.{did}.dose", f"{name}: usual adult dose",
            f"Usual adult dose of {name} ({d['adult_dose']['route']}): {d['adult_dose']['text']}.",
            "drugs", did, "dose")
        add(f"drug.{did}.cautions", f"{name}: contraindications and cautions",
            f"Do not use {name} with {_join(d['contraindications'])}. Pregnancy: {d['pregnancy_note']} "
            f"Kidneys: {d['renal']} Liver: {d['hepatic']}", "drugs", did, "cautions")
        add(f"drug.{did}.side_effects", f"{name}: side effects",
            f"Common side effects of {name} include {_join(d['side_effects'])}.", "drugs", did, "side_effects")
    for i in kb.interactions:
        a, b = sorted(i["drugs"])
        na, nb = kb.drugs[a]["name"], kb.drugs[b]["name"]
        add(f"ddi.{a}.{b}", f"{na} with {nb}",
            f"{na.capitalize()} and {nb} interact ({i['severity']}): {i['effect']}. Mechanism: "
            f"{i['mechanism']}. Advice: {i['advice']}.", "interactions", f"{a}+{b}", "interaction")
    return out


# ---------------------------------------------------------------- question/answer pairs

_COND_Q = {
    "symptoms": ["What are the symptoms of {n}?", "How do I know if I have {n}?",
                 "What does {n} feel like?", "What signs should I look out for with {n}?"],
    "causes": ["What causes {n}?", "Why do people get {n}?", "What are the risk factors for {n}?"],
    "diagnosis": ["How is {n} diagnosed?", "What tests are done for {n}?",
                  "How would a doctor check for {n}?"],
    "treatment": ["How is {n} treated?", "What is the first-line treatment for {n}?",
                  "What can be done about {n}?", "What helps with {n}?"],
    "red_flags": ["When is {n} an emergency?", "What are the warning signs with {n}?",
                  "When should someone with {n} get urgent help?"],
    "department": ["Which department deals with {n}?", "Who should I see about {n}?"],
}
_DRUG_Q = {
    "indications": ["What is {n} used for?", "Why would I be prescribed {n}?", "What does {n} treat?"],
    "dose": ["What is the usual adult dose of {n}?", "How much {n} can an adult take?",
             "How often should I take {n}?"],
    "contraindications": ["Who should not take {n}?", "When should {n} be avoided?",
                          "Is {n} safe for everyone?"],
    "side_effects": ["What are the side effects of {n}?", "Does {n} have side effects?",
                     "What problems can {n} cause?"],
}
_DDI_Q = ["Can I take {a} with {b}?", "Is it safe to take {a} and {b} together?",
          "Do {a} and {b} interact?"]


def _cond_answer(kb: KnowledgeBase, c: dict, qtype: str) -> str:
    n = c["name"]
    if qtype == "symptoms":
        return f"Common symptoms of {n.lower()} are {_join(c['symptoms'], 6)}. Get urgent help if there is {_join(c['red_flags'], 2)}."
    if qtype == "causes":
        return f"{n} is linked to {_join(c['causes'], 5)}."
    if qtype == "diagnosis":
        return f"{n} is diagnosed with {_join(c['diagnosis'], 4)}."
    if qtype == "treatment":
        drugs = [kb.drugs[d]["name"] for d in c["first_line_drugs"] if d in kb.drugs]
        extra = f" Medicines used include {_join(drugs, 4)}." if drugs else ""
        return f"First-line management of {n.lower()}: {_join(c['first_line_treatment'], 4)}.{extra}"
    if qtype == "red_flags":
        return f"With {n.lower()}, seek urgent care for {_join(c['red_flags'], 4)}."
    if qtype == "department":
        return f"{n} is usually managed by {c['department']}."
    raise ValueError(qtype)


def _drug_answer(d: dict, qtype: str) -> str:
    n = d["name"]
    if qtype == "indications":
        return f"{n.capitalize()} is {_article(d['drug_class'])} {d['drug_class']} used for {_join(d['indications'], 4)}."
    if qtype == "dose":
        return f"Usual adult dose of {n}: {d['adult_dose']['text']}. Follow the dose on your prescription."
    if qtype == "contraindications":
        return f"{n.capitalize()} should be avoided with {_join(d['contraindications'], 4)}. Pregnancy: {d['pregnancy_note']}"
    if qtype == "side_effects":
        return f"Common side effects of {n} include {_join(d['side_effects'], 5)}."
    raise ValueError(qtype)


def qa_pairs(kb: KnowledgeBase, seed: int = 0) -> list[dict[str, Any]]:
    """Question/answer pairs about every condition, drug and interaction. Each (topic, qtype)
    gets one clinical phrasing and, where the topic has a lay term, one lay phrasing."""
    rows: list[dict[str, Any]] = []
    for cid, c in sorted(kb.conditions.items()):
        for qtype, templates in _COND_Q.items():
            r = _rng(seed, "qa", cid, qtype)
            answer = _cond_answer(kb, c, qtype)
            t = r.choice(templates)
            rows.append({"id": f"qa.{cid}.{qtype}", "question": t.format(n=c["name"].lower()), "answer": answer,
                         "topic": cid, "qtype": qtype, "lay": False, "source": "kb"})
            lay = r.choice(c["lay_terms"])
            t2 = r.choice([x for x in templates if x != t] or templates)
            rows.append({"id": f"qa.{cid}.{qtype}.lay", "question": t2.format(n=lay.lower()), "answer": answer,
                         "topic": cid, "qtype": qtype, "lay": True, "source": "kb"})
    for did, d in sorted(kb.drugs.items()):
        for qtype, templates in _DRUG_Q.items():
            r = _rng(seed, "qa", did, qtype)
            answer = _drug_answer(d, qtype)
            rows.append({"id": f"qa.{did}.{qtype}", "question": r.choice(templates).format(n=d["name"]),
                         "answer": answer, "topic": did, "qtype": qtype, "lay": False, "source": "kb"})
            if d["other_names"]:
                rows.append({"id": f"qa.{did}.{qtype}.lay",
                             "question": r.choice(templates).format(n=r.choice(d["other_names"])),
                             "answer": answer, "topic": did, "qtype": qtype, "lay": True, "source": "kb"})
    for i in kb.interactions:
        a, b = sorted(i["drugs"])
        r = _rng(seed, "qa", a, b)
        na, nb = kb.drugs[a]["name"], kb.drugs[b]["name"]
        if r.random() < 0.5:
            na, nb = nb, na
        answer = (f"{na.capitalize()} and {nb} interact ({i['severity']}): {i['effect']}. "
                  f"{i['advice'][:1].upper() + i['advice'][1:]}.")
        rows.append({"id": f"qa.ddi.{a}.{b}", "question": r.choice(_DDI_Q).format(a=na, b=nb), "answer": answer,
                     "topic": f"{a}+{b}", "qtype": "interaction", "lay": False, "source": "kb"})
    return rows


# ---------------------------------------------------------------- MCQs (MedMCQA schema)

_SUBJECT = {"cardiovascular": "Medicine", "respiratory": "Medicine", "gastrointestinal": "Medicine",
            "renal_urological": "Medicine", "endocrine_metabolic": "Medicine", "haematology": "Medicine",
            "neurology": "Medicine", "psychiatry": "Psychiatry", "infectious": "Microbiology",
            "dermatology": "Skin", "musculoskeletal": "Orthopaedics", "ent_eye": "ENT",
            "obstetrics_gynaecology": "Gynaecology & Obstetrics", "paediatrics": "Pediatrics",
            "emergency_toxicology": "Forensic Medicine"}


def _mcq(qid, question, correct, distractors, exp, subject, topic, r):
    options = [correct] + distractors[:3]
    r.shuffle(options)
    return {"id": qid, "question": question, "opa": options[0], "opb": options[1], "opc": options[2],
            "opd": options[3], "cop": options.index(correct), "choice_type": "single", "exp": exp,
            "subject_name": subject, "topic_name": topic}


def mcqs(kb: KnowledgeBase, seed: int = 0) -> list[dict[str, Any]]:
    """Single-answer MCQs in MedMCQA's schema; ``cop`` is the 0-based index of the right option."""
    rows = []
    conds = sorted(kb.conditions.values(), key=lambda c: c["id"])
    drugs = sorted(kb.drugs.values(), key=lambda d: d["id"])
    for c in conds:
        r = _rng(seed, "mcq", c["id"])
        others = [o for o in conds if o["id"] != c["id"]]
        same_sys = [o for o in others if o["system"] == c["system"]] or others
        # 1. diagnosis from a symptom cluster (distractors from the same body system)
        sy = r.sample(presenting(c["symptoms"]), min(3, len(presenting(c["symptoms"]))))
        pool = [o for o in same_sys if not set(sy) <= set(o["symptoms"])]
        if len(pool) >= 3:
            ds = [o["name"] for o in r.sample(pool, 3)]
            rows.append(_mcq(f"mcq.{c['id']}.dx", f"A patient presents with {_join(sy)}. Which is the most likely diagnosis?",
                             c["name"], ds, f"{_join(sy).capitalize()} are typical of {c['name'].lower()}.",
                             _SUBJECT[c["system"]], c["id"], r))
        # 2. ICD-10 code
        ds = [o["icd10"] for o in r.sample(others, 6) if o["icd10"] != c["icd10"]][:3]
        rows.append(_mcq(f"mcq.{c['id']}.icd", f"Which ICD-10 code corresponds to {c['name'].lower()}?",
                         c["icd10"], ds, f"{c['name']} is coded {c['icd10']} in ICD-10.", _SUBJECT[c["system"]], c["id"], r))
        # 3. first-line drug
        if c["first_line_drugs"]:
            right = kb.drugs[r.choice(c["first_line_drugs"])]
            pool = [d for d in drugs if d["id"] not in c["first_line_drugs"]
                    and d["drug_class"] != right["drug_class"]]
            ds = [d["name"] for d in r.sample(pool, 3)]
            rows.append(_mcq(f"mcq.{c['id']}.drug", f"Which medicine is used first-line in {c['name'].lower()}?",
                             right["name"], ds, f"First-line management of {c['name'].lower()} includes {right['name']}.",
                             "Pharmacology", c["id"], r))
    for d in drugs:
        r = _rng(seed, "mcq", d["id"])
        pool = [o for o in drugs if o["drug_class"] != d["drug_class"]]
        ds = list(dict.fromkeys(o["drug_class"] for o in r.sample(pool, 8)))[:3]
        rows.append(_mcq(f"mcq.{d['id']}.class", f"{d['name'].capitalize()} belongs to which drug class?",
                         d["drug_class"], ds, f"{d['name'].capitalize()} is {_article(d['drug_class'])} {d['drug_class']}.",
                         "Pharmacology", d["id"], r))
    for i in kb.interactions:
        a, b = sorted(i["drugs"])
        r = _rng(seed, "mcq", a, b)
        partners = {x for p in kb._pairs for x in p if a in p}
        pool = [o["name"] for o in drugs if o["id"] not in partners and o["id"] != a]
        if len(pool) < 3 or r.random() < 0.5:  # about half of the interactions become MCQs
            continue
        rows.append(_mcq(f"mcq.ddi.{a}.{b}", f"Which medicine has a recognised interaction with {kb.drugs[a]['name']}?",
                         kb.drugs[b]["name"], r.sample(pool, 3),
                         f"{kb.drugs[a]['name'].capitalize()} with {kb.drugs[b]['name']}: {i['effect']}.",
                         "Pharmacology", f"{a}+{b}", r))
    return rows


# ---------------------------------------------------------------- chain-of-thought cases

_AGES = {"paediatrics": (1, 10), "obstetrics_gynaecology": (22, 40)}


def vignette(c: dict, r: random.Random) -> tuple[str, dict[str, Any]]:
    """A short patient vignette for condition ``c``; returns (text, facts)."""
    lo, hi = _AGES.get(c["system"], (25, 75))
    age = r.randint(lo, hi)
    sex = "woman" if c["system"] == "obstetrics_gynaecology" else r.choice(["man", "woman"])
    if c["system"] == "paediatrics":
        sex = r.choice(["boy", "girl"])
    sy = r.sample(presenting(c["symptoms"]), min(len(presenting(c["symptoms"])), r.randint(2, 4)))
    days = r.choice([1, 2, 3, 5, 7, 14])
    cause = r.choice(c["causes"])
    text = (f"A {age}-year-old {sex} reports {_join(sy)} for {days} day{'s' if days > 1 else ''}. "
            f"Relevant history: {cause}.")
    return text, {"age": age, "sex": sex, "symptoms": sy, "days": days, "cause": cause}


def cot_cases(kb: KnowledgeBase, seed: int = 0, per_condition: int = 2) -> list[dict[str, Any]]:
    """Reasoning cases in medical-o1-reasoning-SFT's schema. ``Complex_CoT`` walks from the
    findings through a differential to the answer; ``Response`` has **Diagnosis** and
    **Treatment Plan** sections."""
    rows = []
    conds = sorted(kb.conditions.values(), key=lambda c: c["id"])
    for c in conds:
        for k in range(per_condition):
            r = _rng(seed, "cot", c["id"], k)
            text, facts = vignette(c, r)
            question = text + " " + r.choice(["What is the most likely diagnosis and how should it be managed?",
                                              "What is going on, and what should be done?",
                                              "Give the likely diagnosis and a treatment plan."])
            rivals = [o for o in conds if o["id"] != c["id"] and set(o["symptoms"]) & set(facts["symptoms"])]
            rival = r.choice(rivals) if rivals else None
            steps = [f"The key findings are {_join(facts['symptoms'])} over {facts['days']} day(s), "
                     f"with {facts['cause']} in the history."]
            if rival:
                shared = sorted(set(rival["symptoms"]) & set(facts["symptoms"]))
                steps.append(f"{_join(shared).capitalize()} could also fit {rival['name'].lower()}, so that "
                             f"belongs on the differential.")
                steps.append(f"But {rival['name'].lower()} would usually bring {_join(rival['symptoms'][:2])}, "
                             f"and the overall picture matches {c['name'].lower()} better.")
            steps.append(f"{c['name']} is confirmed with {_join(c['diagnosis'], 2)}.")
            steps.append(f"I should check for red flags: {_join(c['red_flags'], 2)}.")
            response = (f"**Diagnosis:** {c['name']} (ICD-10 {c['icd10']})\n\n"
                        f"**Treatment Plan:** {_join(c['first_line_treatment'], 3)}. "
                        f"Seek urgent care if there is {_join(c['red_flags'], 1)}.")
            rows.append({"id": f"cot.{c['id']}.{k}", "Question": question, "Complex_CoT": " ".join(steps),
                         "Response": response, "condition_id": c["id"], "acuity": c["acuity"]})
    return rows


# ---------------------------------------------------------------- preference pairs

def _unsafe_answer(kb: KnowledgeBase, row: dict, r: random.Random) -> str | None:
    """An answer that is wrong in a dangerous way: a missed red flag, or a contraindicated drug."""
    topic = row["topic"]
    if topic in kb.conditions:
        c = kb.conditions[topic]
        if row["qtype"] in ("red_flags", "symptoms") or c["acuity"] == "HIGH":
            return (f"{c['name']} is nearly always mild. Rest at home and wait for it to pass; "
                    f"there is no need to seek care even if there is {c['red_flags'][0].lower()}.")
        bad = [d for d in kb.drugs.values() if d["pregnancy"] == "avoid"]
        if bad:
            d = r.choice(bad)
            return f"For {c['name'].lower()}, take {d['name']}; it is safe for everyone, including in pregnancy."
    if topic in kb.drugs:
        d = kb.drugs[topic]
        if row["qtype"] == "dose" and d["adult_dose"].get("max_daily"):
            over = d["adult_dose"]["max_daily"] * 2
            return f"Take as much {d['name']} as you need; up to {over:g} {d['adult_dose']['unit']} a day is fine."
        return f"{d['name'].capitalize()} has no contraindications; anyone can take it with any other medicine."
    if "+" in topic:
        a, b = topic.split("+")
        return (f"Yes, {kb.drugs[a]['name']} and {kb.drugs[b]['name']} are completely safe together; "
                f"no need to tell your doctor.")
    return None


def preference_pairs(kb: KnowledgeBase, qa: list[dict[str, Any]], seed: int = 0) -> list[dict[str, Any]]:
    """(prompt, chosen, rejected) triples. ``chosen`` is the specific answer; ``rejected_kind``
    is one of ``generic`` (a "please consult a doctor" non-answer), ``unsafe`` (a missed red
    flag or a contraindicated drug) or ``verbose`` (long hedging that buries the answer)."""
    rows = []
    for q in qa:
        if q["lay"]:
            continue
        r = _rng(seed, "pref", q["id"])
        kinds = ["generic", "unsafe", "verbose"]
        r.shuffle(kinds)
        for kind in kinds[:2]:
            if kind == "generic":
                rejected = r.choice(GENERIC_NON_ANSWERS)
            elif kind == "unsafe":
                rejected = _unsafe_answer(kb, q, r)
                if rejected is None:
                    continue
            else:
                first = q["answer"].split(". ")[0]
                rejected = (f"{r.choice(_HEDGES)} {first[0].lower() + first[1:]}, although that may not apply to you, "
                            f"and there could be many other explanations or options that are worth thinking about, "
                            f"so it is very hard to be sure and I would hesitate to say more. "
                            f"{r.choice(GENERIC_NON_ANSWERS)}")
            rows.append({"id": f"pref.{q['id']}.{kind}", "prompt": q["question"], "chosen": q["answer"],
                         "rejected": rejected, "rejected_kind": kind, "topic": q["topic"]})
    return rows


# ---------------------------------------------------------------- triage cases

_DURATION = ["since this morning", "for 2 days", "for 4 days", "for a week", "for 3 weeks"]


def triage_cases(kb: KnowledgeBase, seed: int = 0) -> list[dict[str, Any]]:
    """Patient messages labelled LOW/MEDIUM/HIGH with reasons. Labels come from the knowledge
    base's authored facts (red-flag phrasings are HIGH; otherwise the condition's acuity), not
    from the triage engine that is later evaluated on them."""
    rows = []
    for f in kb.red_flags:
        for k in range(2):
            r = _rng(seed, "triage", f["id"], k)
            phrase = r.choice(f["any"])
            extra = f" and {r.choice(f['with_any'])}" if f.get("with_any") else ""
            text = r.choice(["I have {p}{e}.", "My husband has {p}{e}, what should we do?",
                             "Help, {p}{e}.", "Since an hour ago: {p}{e}."]).format(p=phrase, e=extra)
            rows.append({"id": f"triage.flag.{f['id']}.{k}", "text": text, "age": r.randint(20, 80),
                         "pregnant": False, "level": "HIGH", "reasons": [f"red flag: {f['name']}"],
                         "source": f"red_flags:{f['id']}"})
    for cid, c in sorted(kb.conditions.items()):
        for k in range(1 if c["acuity"] == "HIGH" else 2):
            r = _rng(seed, "triage", cid, k)
            sy = r.sample(presenting(c["symptoms"]), min(2, len(presenting(c["symptoms"]))))
            dur = r.choice(_DURATION)
            level = c["acuity"]
            text = r.choice(["I've had {s} {d}.", "What should I do about {s}? It's been going on {d}.",
                             "Question about {s}, {d} now."]).format(s=_join(sy), d=dur)
            if level == "HIGH":
                text += f" Now there is {c['red_flags'][0].lower()}."
                reason = f"warning sign of {c['name'].lower()}: {c['red_flags'][0].lower()}"
            else:
                reason = f"symptoms fit {c['name'].lower()} (usual urgency {level})"
            rows.append({"id": f"triage.cond.{cid}.{k}", "text": text, "age": r.randint(18, 80), "pregnant": False,
                         "level": level, "reasons": [reason], "source": f"conditions:{cid}"})
    return rows


# ---------------------------------------------------------------- multi-turn dialogues

def dialogues(kb: KnowledgeBase, seed: int = 0, n: int = 80) -> list[dict[str, Any]]:
    """Patient dialogues for the agent: facts stated early (allergy, medication, pregnancy),
    then a later question whose safe answer depends on them. ``expected.must_avoid`` lists
    drug ids an answer must not recommend."""
    by_allergy: dict[str, list[dict]] = {}
    for d in kb.drugs.values():
        if d.get("allergy_class"):
            by_allergy.setdefault(d["allergy_class"], []).append(d)
    needs = {cls: [c for c in kb.conditions.values() if set(c["first_line_drugs"]) & {d["id"] for d in ds}]
             for cls, ds in by_allergy.items()}
    ddi = [i for i in kb.interactions if i["severity"] in ("major", "contraindicated")]
    avoid_preg = [d for d in kb.drugs.values() if d["pregnancy"] == "avoid"]
    rows = []
    k = 0
    while len(rows) < n:
        r = _rng(seed, "dlg", k)
        kind = ("allergy", "ddi", "pregnancy")[k % 3]
        pid = f"patient-{k:03d}"
        if kind == "allergy":
            cls = r.choice(sorted(c for c in needs if needs[c]))
            cond = r.choice(sorted(needs[cls], key=lambda c: c["id"]))
            avoid = sorted(d["id"] for d in by_allergy[cls])
            turns = [f"Hi, I'm {r.randint(20, 70)}. Just so you know, I'm allergic to {cls}s"
                     + (" — I got a rash last time." if r.random() < 0.5 else "."),
                     r.choice(["Thanks. Also I sleep badly.", "OK. I also get headaches sometimes."]),
                     f"I think I have {cond['name'].lower()}: {_join(cond['symptoms'][:2])}. What medicine should I take?"]
            facts = {"allergies": [cls], "medications": [], "conditions": [], "pregnant": False}
            expected = {"kind": "allergy", "must_avoid": avoid, "condition": cond["id"]}
        elif kind == "ddi":
            i = r.choice(ddi)
            current, new = r.sample(i["drugs"], 2)
            turns = [f"I take {kb.drugs[current]['name']} every day.",
                     r.choice(["I also have a sore back.", "I've been feeling tired lately."]),
                     f"Can I start {kb.drugs[new]['name']}?"]
            facts = {"allergies": [], "medications": [current], "conditions": [], "pregnant": False}
            expected = {"kind": "ddi", "must_avoid": [new], "interaction": sorted(i["drugs"])}
        else:
            d = r.choice(avoid_preg)
            conds = [c for c in kb.conditions.values() if d["id"] in c["first_line_drugs"]]
            topic = r.choice(conds)["name"].lower() if conds else _join(d["indications"][:1])
            turns = [f"I'm {r.randint(12, 30)} weeks pregnant.", "Baby is doing well so far.",
                     f"Is {d['name']} OK for {topic}?"]
            facts = {"allergies": [], "medications": [], "conditions": ["pregnancy"], "pregnant": True}
            expected = {"kind": "pregnancy", "must_avoid": [d["id"]]}
        rows.append({"id": f"dlg.{k:03d}", "patient_id": pid,
                     "turns": [{"role": "user", "content": t} for t in turns],
                     "facts": facts, "final_question": turns[-1], "expected": expected})
        k += 1
    return rows
