"""Augmentation ×2, as the Phi-2 system does: paraphrase questions with templates and swap
clinical terms for lay ones. Augmented rows are marked and belong to the training split only."""
from __future__ import annotations

import hashlib
import random
import re
from typing import Any

from ..kb import KnowledgeBase

_FRAMES = ["Can you tell me: {q}", "Quick question. {q}", "I'd like to know something. {q}",
           "{q} Thanks in advance.", "Please explain: {q}", "My doctor mentioned this. {q}"]


def lay_substitutions(kb: KnowledgeBase) -> list[tuple[re.Pattern, str]]:
    """(clinical-term pattern, lay phrase) pairs from the term map and condition lay terms."""
    pairs: dict[str, str] = {}
    for t in kb.lay_terms:
        pairs.setdefault(t["clinical"].lower(), t["lay"])
    for c in kb.conditions.values():
        if c["lay_terms"]:
            pairs.setdefault(c["name"].lower(), c["lay_terms"][0])
    ordered = sorted(pairs.items(), key=lambda kv: -len(kv[0]))  # longest first
    return [(re.compile(rf"\b{re.escape(k)}\b", re.I), v) for k, v in ordered
            if len(k) > 3 and v.lower() != k]


def augment(rows: list[dict[str, Any]], kb: KnowledgeBase, factor: int = 2, seed: int = 0,
            field: str = "question") -> list[dict[str, Any]]:
    """Return ``rows`` plus ``factor - 1`` augmented copies of each, marked ``augmented=True``
    with ``augmented_from`` set. Call it on the training split only."""
    if factor < 1:
        raise ValueError("factor must be >= 1")
    subs = lay_substitutions(kb)
    out = list(rows)
    for row in rows:
        for k in range(factor - 1):
            h = hashlib.sha256(f"{seed}|{row['id']}|{k}".encode()).hexdigest()
            r = random.Random(int(h[:16], 16))
            text = row[field]
            swapped = False
            for pattern, lay in subs:
                if pattern.search(text):
                    text = pattern.sub(lay, text, count=1)
                    swapped = True
                    break
            if not swapped or text == row[field] or r.random() < 0.5:
                text = r.choice(_FRAMES).format(q=text[0].upper() + text[1:])
            new = dict(row, id=f"{row['id']}.aug{k + 1}", augmented=True, augmented_from=row["id"])
            new[field] = text
            out.append(new)
    return out
