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


def _topic(passage_id: str) -> str:
    """The topic part of a passage id (``cond.asthma.treatment`` -> ``asthma``)."""
    return passage_id.split(".")[1] if passage_id.count(".") >= 2 else passage_id


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
    topic_of = {p["id"]: _topic(p["id"]) for p in passages}
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
                        "answer": ABSTAIN_REPLY, "grounded": "abstain", "shown": {e.label: e.id for e in evidence}})
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
                    "answer": target, "grounded": "cite", "evidence_id": gold_id,
                    "shown": {e.label: e.id for e in evidence}})
    return out


def strip_citations(text: str) -> str:
    """``text`` with every ``[E#]`` label removed (and the space before it)."""
    import re

    return re.sub(r"\s*\[E\d+\]", "", text)


def cited_pairs(qa_rows: list[dict[str, Any]], passages: list[dict[str, Any]], n: int, kb,
                distractors: int = 1, seed: int = 0) -> list[dict[str, Any]]:
    """DPO pairs that prefer citing: the prompt is a grounded row's evidence prompt (messages), the
    chosen answer cites its passages, the rejected answer is the **same text without the labels**
    (``rejected_kind`` ``"uncited"``). Only the citations differ, so the pair teaches the habit and
    nothing else. 02's grounded SFT rows raise the chance of a label at a sentence end (from about
    nothing to 5-10% on SmolLM2 with 2,400 rows), which greedy decoding still loses to the full
    stop; 40 of these pairs in 03 moved the likelihood preference for the cited answer 0 -> 0.3,
    not yet enough for greedy text to cite (run smol-full)."""
    rows = grounded_rows(qa_rows, passages, n, kb, distractors=distractors, abstain_share=0.0, seed=seed)
    return [{"id": r["id"].replace(".grounded", ".uncited"), "prompt": r["prompt"], "chosen": r["answer"],
             "rejected": strip_citations(r["answer"]), "rejected_kind": "uncited", "shown": r["shown"],
             "topic": _topic(r["evidence_id"])}
            for r in rows]


def citation_report(model, tok, rows: list[dict[str, Any]], max_new_tokens: int = 96) -> dict[str, Any]:
    """Greedy answers to evidence prompts (rows of ``grounded_rows`` or ``cited_pairs``), each
    judged by 06's own citation check against the labels its prompt showed: ``valid_rate`` (every
    sentence cites, only shown ids), ``cites_rate`` (at least one label), ``abstain_rate``, the
    texts and the checks. With no rows every rate is None (nothing measured)."""
    from ..rag import answer
    from .common import generate

    if not rows:
        return {"n": 0, "valid_rate": None, "cites_rate": None, "abstain_rate": None, "texts": [], "checks": []}
    texts = [g["text"] for g in generate(model, tok, [r["prompt"] for r in rows], max_new_tokens=max_new_tokens)]
    checks = [answer.check_citations(t, [answer.Evidence(label, pid, "", 1.0) for label, pid in r["shown"].items()])
              for t, r in zip(texts, rows)]
    n = len(rows)
    return {"n": n, "valid_rate": sum(c["valid"] for c in checks) / n,
            "cites_rate": sum(bool(c["cited"] or c["unknown_ids"]) for c in checks) / n,
            "abstain_rate": sum(c["abstained"] for c in checks) / n, "texts": texts, "checks": checks}
