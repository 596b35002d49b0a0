"""The agent's tools, function-calling style: each has a JSON schema (what an LLM is shown) and
a Python function. ``ToolBox.call(name, arguments)`` validates the arguments against the schema
and never raises: bad arguments come back as ``{"ok": False, "error": "..."}`` for the model to read."""
from __future__ import annotations

import json
from typing import Any, Callable

from ..kb import KnowledgeBase
from . import ddi, triage
from .store import Store

SCHEMAS: list[dict[str, Any]] = [
    {"name": "bmi", "description": "Body-mass index from weight and height, with the WHO adult category.",
     "parameters": {"type": "object", "required": ["weight_kg", "height_m"], "properties": {
         "weight_kg": {"type": "number", "minimum": 1, "maximum": 500},
         "height_m": {"type": "number", "minimum": 0.3, "maximum": 2.8}}}},
    {"name": "drug_inventory", "description": "Is a medicine in stock at the pharmacy? Form, strength, stock.",
     "parameters": {"type": "object", "required": ["drug"], "properties": {"drug": {"type": "string"}}}},
    {"name": "department_triage", "description": "Urgency (LOW/MEDIUM/HIGH), reason and department for symptoms.",
     "parameters": {"type": "object", "required": ["text"], "properties": {
         "text": {"type": "string"}, "age": {"type": "number", "minimum": 0, "maximum": 120},
         "pregnant": {"type": "boolean"}}}},
    {"name": "ddi_check", "description": "Interactions among two or more medicines.",
     "parameters": {"type": "object", "required": ["drugs"], "properties": {
         "drugs": {"type": "array", "items": {"type": "string"}, "minItems": 2}}}},
    {"name": "dose_check", "description": "Is a dose within the knowledge base's usual adult range?",
     "parameters": {"type": "object", "required": ["drug", "amount", "unit"], "properties": {
         "drug": {"type": "string"}, "amount": {"type": "number", "minimum": 0},
         "unit": {"type": "string", "enum": ["mg", "g", "microgram", "unit", "mL", "puff"]},
         "per": {"type": "string", "enum": ["dose", "day"]}}}},
    {"name": "kb_lookup", "description": "Knowledge-base facts about a condition or a drug.",
     "parameters": {"type": "object", "required": ["topic"], "properties": {
         "topic": {"type": "string"},
         "section": {"type": "string", "enum": ["overview", "symptoms", "treatment", "red_flags", "dose",
                                                "cautions", "side_effects"]}}}},
]
_TYPES = {"number": (int, float), "string": str, "boolean": bool, "array": list, "object": dict}


class ToolError(ValueError):
    pass


def validate_arguments(schema: dict[str, Any], args: Any) -> None:
    """Raise ToolError naming the first argument that does not fit ``schema``."""
    params = schema["parameters"]
    if not isinstance(args, dict):
        raise ToolError(f"{schema['name']}: arguments must be a JSON object, got {type(args).__name__}")
    for key in params.get("required", []):
        if key not in args:
            raise ToolError(f"{schema['name']}: missing required argument `{key}`")
    for key, value in args.items():
        spec = params["properties"].get(key)
        if spec is None:
            raise ToolError(f"{schema['name']}: unknown argument `{key}`")
        typ = _TYPES[spec["type"]]
        if not isinstance(value, typ) or (spec["type"] == "number" and isinstance(value, bool)):
            raise ToolError(f"{schema['name']}: `{key}` must be a {spec['type']}, got {value!r}")
        if spec["type"] == "number":
            if value != value or ("minimum" in spec and value < spec["minimum"]) or (
                    "maximum" in spec and value > spec["maximum"]):
                raise ToolError(f"{schema['name']}: `{key}`={value!r} is outside "
                                f"[{spec.get('minimum')}, {spec.get('maximum')}]")
        if "enum" in spec and value not in spec["enum"]:
            raise ToolError(f"{schema['name']}: `{key}` must be one of {spec['enum']}, got {value!r}")
        if spec["type"] == "string" and not value.strip():
            raise ToolError(f"{schema['name']}: `{key}` is empty")
        if spec["type"] == "array":
            if len(value) < spec.get("minItems", 0):
                raise ToolError(f"{schema['name']}: `{key}` needs at least {spec['minItems']} items")
            if not all(isinstance(v, _TYPES[spec["items"]["type"]]) for v in value):
                raise ToolError(f"{schema['name']}: every item of `{key}` must be a {spec['items']['type']}")


def bmi_category(bmi: float) -> str:
    """WHO adult categories."""
    if bmi < 18.5:
        return "underweight"
    if bmi < 25:
        return "healthy weight"
    if bmi < 30:
        return "overweight"
    return "obese"


class ToolBox:
    def __init__(self, kb: KnowledgeBase, store: Store):
        self.kb, self.store = kb, store
        self.schemas = {s["name"]: s for s in SCHEMAS}
        self.functions: dict[str, Callable[..., Any]] = {
            "bmi": self.bmi, "drug_inventory": self.drug_inventory, "department_triage": self.department_triage,
            "ddi_check": self.ddi_check, "dose_check": self.dose_check, "kb_lookup": self.kb_lookup}

    def call(self, name: str, arguments: Any) -> dict[str, Any]:
        """Run one tool call; ``arguments`` may be a dict or a JSON string (as an LLM writes it)."""
        record: dict[str, Any] = {"name": name, "arguments": arguments}
        try:
            if name not in self.schemas:
                raise ToolError(f"unknown tool {name!r}; available: {sorted(self.schemas)}")
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments)
                except json.JSONDecodeError as exc:
                    raise ToolError(f"{name}: arguments are not valid JSON ({exc.msg} at {exc.pos})") from exc
                record["arguments"] = arguments
            validate_arguments(self.schemas[name], arguments)
            record.update(ok=True, result=self.functions[name](**arguments))
        except ToolError as exc:
            record.update(ok=False, error=str(exc))
        return record

    # ------------------------------------------------------------ the tools
    def _drug(self, name: str) -> str:
        did = ddi.resolve(self.kb, name)
        if not did:
            raise ToolError(f"unknown medicine {name!r} (not in the knowledge base)")
        return did

    def bmi(self, weight_kg: float, height_m: float) -> dict[str, Any]:
        value = weight_kg / height_m ** 2
        return {"bmi": round(value, 1), "category": bmi_category(value),
                "note": "adult categories; children use age- and sex-specific centiles"}

    def drug_inventory(self, drug: str) -> dict[str, Any]:
        row = self.store.inventory(self._drug(drug))
        if row is None:
            raise ToolError(f"{drug!r} is not stocked by this pharmacy")
        return {**row, "in_stock": row["stock"] > 0}

    def department_triage(self, text: str, age: float | None = None, pregnant: bool | None = None) -> dict[str, Any]:
        t = triage.triage(self.kb, text, {"age": age, "pregnant": pregnant})
        conds = []
        for cid, c in self.kb.conditions.items():
            names = [c["name"].lower(), *(x.lower() for x in c["lay_terms"] + c["synonyms"])]
            if any(n in text.lower() for n in names if len(n) > 3):
                conds.append(cid)
        return {"level": t.level, "reason": t.reason, "department": triage.department(self.kb, conds, t.level),
                "red_flags": [f["id"] for f in t.red_flags]}

    def ddi_check(self, drugs: list[str]) -> dict[str, Any]:
        ids = [self._drug(d) for d in drugs]
        return {"drugs": ids, "interactions": ddi.check(self.kb, ids)}

    def dose_check(self, drug: str, amount: float, unit: str, per: str = "dose") -> dict[str, Any]:
        d = self.kb.drugs[self._drug(drug)]
        dose = d["adult_dose"]
        if unit == "g" and dose["unit"] == "mg":
            amount, unit = amount * 1000, "mg"
        if unit != dose["unit"]:
            raise ToolError(f"dose_check: {d['name']} is dosed in {dose['unit']}, not {unit}")
        limit = dose["single_dose_max"] if per == "dose" else dose["max_daily"]
        within = None if limit is None else amount <= limit
        low = dose["single_dose_min"] if per == "dose" else None
        return {"drug": d["id"], "amount": amount, "unit": unit, "per": per, "within_range": within,
                "below_usual": (low is not None and amount < low), "single_dose_max": dose["single_dose_max"],
                "max_daily": dose["max_daily"], "usual": dose["text"]}

    def kb_lookup(self, topic: str, section: str | None = None) -> dict[str, Any]:
        did = ddi.resolve(self.kb, topic)
        if did:
            d = self.kb.drugs[did]
            facts = {"overview": f"{d['name']} ({d['drug_class']}): {', '.join(d['indications'])}",
                     "dose": d["adult_dose"]["text"], "cautions": "; ".join(d["contraindications"]),
                     "side_effects": ", ".join(d["side_effects"])}
            kind, ref = "drug", did
        else:
            key = topic.lower().strip().replace(" ", "_")
            cid = key if key in self.kb.conditions else next(
                (c for c, v in self.kb.conditions.items()
                 if topic.lower().strip() in [v["name"].lower(), *(x.lower() for x in v["synonyms"] + v["lay_terms"])]),
                None)
            if not cid:
                raise ToolError(f"kb_lookup: no drug or condition called {topic!r}")
            c = self.kb.conditions[cid]
            facts = {"overview": f"{c['name']} (ICD-10 {c['icd10']}), {c['department']}",
                     "symptoms": ", ".join(c["symptoms"]), "treatment": "; ".join(c["first_line_treatment"]),
                     "red_flags": "; ".join(c["red_flags"])}
            kind, ref = "cond", cid
        if section and section not in facts:
            raise ToolError(f"kb_lookup: a {kind} has sections {sorted(facts)}, not {section!r}")
        return {"kind": kind, "id": ref, "facts": {section: facts[section]} if section else facts}
