"""Query understanding from the knowledge base: lay → clinical rewriting and lexicon NER
(conditions, drugs, symptoms, body parts, durations)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..kb import KnowledgeBase

_DURATION = re.compile(r"\b(?:for|since|over|past|last)\s+(?:the\s+)?(?:\d+|a|an|one|two|three|four|five|six|seven|"
                       r"several|few|couple of)\s+(?:hours?|days?|weeks?|months?|years?)\b|\bsince (?:yesterday|"
                       r"this morning|last night)\b", re.I)


def _pattern(phrases: list[str]) -> re.Pattern | None:
    phrases = sorted({p.lower().strip() for p in phrases if len(p.strip()) > 2}, key=len, reverse=True)
    if not phrases:
        return None
    return re.compile(r"\b(" + "|".join(re.escape(p) for p in phrases) + r")\b", re.I)


@dataclass
class QueryAnalyzer:
    """Built once from the knowledge base; ``entities`` and ``rewrite`` are then cheap."""

    kb: KnowledgeBase
    lexicon: dict[str, dict[str, str]] = field(default_factory=dict)  # kind -> phrase -> canonical

    def __post_init__(self):
        lex: dict[str, dict[str, str]] = {"condition": {}, "drug": {}, "symptom": {}, "body_part": {}}
        for c in self.kb.conditions.values():
            for p in [c["name"], *c["synonyms"], *c["lay_terms"]]:
                lex["condition"].setdefault(p.lower(), c["name"])
            for s in c["symptoms"]:
                if len(s.split()) <= 4:
                    lex["symptom"].setdefault(s.lower(), s.lower())
        for d in self.kb.drugs.values():
            for p in [d["name"], d["id"].replace("_", " "), *d["other_names"]]:
                lex["drug"].setdefault(p.lower(), d["name"])
        for t in self.kb.lay_terms:
            kind = t["kind"] if t["kind"] in lex else None
            if kind:
                lex[kind].setdefault(t["lay"].lower(), t["clinical"])
        self.lexicon = lex
        self._patterns = {k: _pattern(list(v)) for k, v in lex.items()}
        self._lay = sorted(((t["lay"].lower(), t["clinical"]) for t in self.kb.lay_terms
                            if t["lay"].lower() != t["clinical"].lower()), key=lambda kv: -len(kv[0]))
        for c in self.kb.conditions.values():
            self._lay += [(lay.lower(), c["name"]) for lay in c["lay_terms"] if lay.lower() != c["name"].lower()]
        self._lay_pattern = _pattern([lay for lay, _ in self._lay])
        self._lay_map = dict(self._lay)

    def entities(self, text: str) -> dict[str, list[str]]:
        """Canonical entities by kind, in order of appearance, plus ``duration`` spans."""
        out: dict[str, list[str]] = {}
        for kind, pat in self._patterns.items():
            if pat is None:
                continue
            found = [self.lexicon[kind][m.group(1).lower()] for m in pat.finditer(text)]
            if found:
                out[kind] = list(dict.fromkeys(found))
        durations = [m.group(0) for m in _DURATION.finditer(text)]
        if durations:
            out["duration"] = durations
        return out

    def rewrite(self, query: str) -> str:
        """The query plus the clinical term of every lay phrase in it ("sugar" → "+ diabetes mellitus")."""
        if self._lay_pattern is None:
            return query
        extra = [self._lay_map[m.group(1).lower()] for m in self._lay_pattern.finditer(query)]
        extra = [e for e in dict.fromkeys(extra) if e.lower() not in query.lower()]
        return query if not extra else f"{query} ({'; '.join(extra)})"

    def enrich(self, query: str) -> str:
        """Rewrite, then append the recognised entities (what MediAssist's NER step does)."""
        ents = self.entities(query)
        terms = [e for kind in ("condition", "drug", "symptom") for e in ents.get(kind, [])]
        q = self.rewrite(query)
        terms = [t for t in terms if t.lower() not in q.lower()]
        return q if not terms else f"{q} [{'; '.join(terms)}]"
