"""The answer as a list of sentences, each with its evidence citations ([E#]) and the drugs it
recommends or warns about. Drafts, audits and refinements all work on this form; free text (an
LLM's draft) is parsed into it with ``parse``."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .. import NOT_MEDICAL_ADVICE

NOTICE = NOT_MEDICAL_ADVICE
CITE = re.compile(r"\[E(\d+)\]")
# a sentence with one of these is a warning about the drugs it names, not a recommendation
WARNING_CUE = re.compile(r"\b(do not|don't|avoid|not suitable|not safe|unsafe|interact|allergic|contraindicated|"
                         r"must not|should not|stop|instead of|above the usual|over the usual|too much|too high)\b", re.I)


@dataclass
class Sentence:
    text: str
    cites: list[int] = field(default_factory=list)   # 1-based evidence numbers
    kind: str = "info"          # emergency | info | recommend | dose | warning | advice
    drugs: list[str] = field(default_factory=list)   # drug ids this sentence is about
    issue: str | None = None                         # for a warning: the audit issue type it answers

    def render(self) -> str:
        tags = "".join(f" [E{n}]" for n in self.cites)
        body = self.text.rstrip()
        if tags and body.endswith("."):
            return f"{body[:-1]}{tags}."
        return f"{body}{tags}"

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "cites": self.cites, "kind": self.kind, "drugs": self.drugs, "issue": self.issue}


def render(sentences: list[Sentence]) -> str:
    return " ".join(s.render() for s in sentences)


def recommended_drugs(sentences: list[Sentence]) -> list[str]:
    return list(dict.fromkeys(d for s in sentences if s.kind in ("recommend", "dose", "info") for d in s.drugs))


def parse(text: str, drug_ids) -> list[Sentence]:
    """Free text → sentences. ``drug_ids(text)`` names the drugs in a sentence; a sentence with a
    warning cue becomes a warning, one naming drugs a recommendation, others info."""
    out = []
    for raw in re.findall(r"[^.!?\n]+[.!?]?", text):
        raw = raw.strip()
        if not raw:
            continue
        cites = [int(n) for n in CITE.findall(raw)]
        body = CITE.sub("", raw).replace(" .", ".").strip()
        drugs = drug_ids(body)
        kind = "warning" if WARNING_CUE.search(body) else ("recommend" if drugs else "info")
        out.append(Sentence(body, cites, kind, drugs))
    return out
