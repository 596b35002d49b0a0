"""Grounded SFT rows: teach a model to answer from evidence blocks and cite them as ``[E#]``.

An instruct model told "cite the evidence as [E1]" does not do it by itself when it is small
(SmolLM2-135M answers from memory and cites nothing). 06's answerer needs the habit, so 02 can mix
rows in 06's own prompt format (``medkit.rag.answer.build_messages``) into the SFT data:

- **answerable rows**: a training question, its own passage and ``distractors`` other passages
  (one of them from the same topic where there is one, so the model must pick the right section),
  in shuffled order; the target is the reference answer, each sentence ending with the label of
  the shown passage that holds most of its content words (at least ``min_support`` of them;
  sentences no passage supports are dropped, and a row must cite its own passage);
- **abstention rows** (``abstain_share`` of them): the same question with passages of other
  topics only; the target is the exact abstention sentence of 06's system prompt.

Only training questions and their passages are used; the held-out questions of 02 and 06 never
appear. ``sft.grounded_rows`` in the profile sets how many rows (0 on ``tiny``: its 1M-parameter
models cannot read evidence)."""
from __future__ import annotations

import random
from typing import Any

from ..rag.answer import ABSTAIN_REPLY  # the exact reply 06's system prompt asks for


def _support(sentence: str, passage: str) -> float:
    """Share of the sentence's content words that are in the passage."""
    from ..rag.text import tokenize

    words = set(tokenize(sentence))
    return len(words & set(tokenize(passage))) / len(words) if words else 0.0


def grounded_rows(qa_rows: list[dict[str, Any]], passages: list[dict[str, Any]], n: int, kb,
                  distractors: int = 2, abstain_share: float = 0.2, min_support: float = 0.5,
                  seed: int = 0) -> list[dict[str, Any]]:
    """Up to ``n`` rows ``{"id", "prompt" (messages), "answer", "grounded": "cite"|"abstain"}``
    built from ``qa_rows`` whose evidence passage is in ``passages``. Raises ValueError naming the
    field when a passage lacks ``id`` or ``text``."""
    from ..rag import answer
    from ..rag.evaluate import relevant_passage

    if n <= 0:
        return []
    for i, p in enumerate(passages):
        for field in ("id", "text"):
            if not p.get(field):
                raise ValueError(f"passage row {i} ({p.get('id', '?')}): missing field `{field}`")
    by_id = {p["id"]: p for p in passages}
    topic_of = {p["id"]: p["id"].split(".")[1] if p["id"].count(".") >= 2 else p["id"] for p in passages}
    by_topic: dict[str, list[str]] = {}
    for pid, t in topic_of.items():
        by_topic.setdefault(t, []).append(pid)
    ids = sorted(by_id)
    rng = random.Random(seed)
    rows = list(qa_rows)
    rng.shuffle(rows)
    out: list[dict[str, Any]] = []
    n_abstain, abstained = round(n * abstain_share), 0
    for r in rows:
        if len(out) >= n:
            break
        gold = sorted(relevant_passage(r, kb) & set(by_id))
        if not gold:
            continue
        gold_id = gold[0]
        topic = topic_of[gold_id]
        if abstained < n_abstain:
            abstained += 1
            others = [i for i in ids if topic_of[i] != topic]
            ev_ids = rng.sample(others, distractors + 1)
            evidence = answer.make_evidence([(i, 1.0) for i in ev_ids], {i: by_id[i]["text"] for i in ev_ids})
            out.append({"id": f"{r['id']}.grounded-abstain", "prompt": answer.build_messages(r["question"], evidence),
                        "answer": ABSTAIN_REPLY, "grounded": "abstain"})
            continue
        same = [i for i in by_topic.get(topic, []) if i != gold_id]
        pool = [i for i in ids if i != gold_id and i not in same]
        picked = rng.sample(same, 1) if same and distractors else []
        picked += rng.sample(pool, distractors - len(picked))
        ev_ids = picked + [gold_id]
        rng.shuffle(ev_ids)
        evidence = answer.make_evidence([(i, 1.0) for i in ev_ids], {i: by_id[i]["text"] for i in ev_ids})
        cited = []  # each sentence cites the shown passage that supports it best; unsupported ones are dropped
        for sent in answer.sentences(r["answer"]):
            share, ev = max(((_support(sent, e.text), e) for e in evidence), key=lambda x: x[0])
            if share >= min_support:
                cited.append((sent, ev))
        if not any(ev.id == gold_id for _, ev in cited):
            continue
        target = " ".join(f"{sent.rstrip().rstrip('.!?')} [{ev.label}]." for sent, ev in cited)
        out.append({"id": f"{r['id']}.grounded", "prompt": answer.build_messages(r["question"], evidence),
                    "answer": target, "grounded": "cite", "evidence_id": gold_id})
    return out
