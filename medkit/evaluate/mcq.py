"""Multiple-choice questions in MedMCQA's schema, scored two ways.

A row has ``question``, the options ``opa``..``opd`` and ``cop`` (the 0-based index of the right
option); ``exp`` (an explanation) is optional. The model answers ``Answer: B. <option>`` followed
by ``Explanation: ...``.

- **Log-likelihood:** the model scores each option's answer line; the most likely one is its
  choice. No generation, so a model that cannot yet follow the format is still measured.
- **Generation:** greedy decoding, then strict letter extraction: the reply must open with
  ``Answer: X`` (or a bare ``X.``/``X)``); anything else is a format failure, never a guess.
"""
from __future__ import annotations

import re
from typing import Any

from ..train.common import answer_figures, generate, messages, shared_prefix_logprobs

LETTERS = "ABCD"
OPTION_FIELDS = ("opa", "opb", "opc", "opd")
MCQ_SYSTEM = ("You are a careful medical information assistant. Answer the multiple-choice question "
              "with the letter of the correct option, then explain in one sentence.")


def validate(rows: list[dict[str, Any]], source: str = "mcq") -> list[dict[str, Any]]:
    """Return ``rows`` if every one is a well-formed single-answer MCQ; otherwise raise
    ``ValueError`` naming the source, the row (index and id) and the field."""
    problems = []
    for i, r in enumerate(rows):
        where = f"{source} row {i} (id {r.get('id', '?')})"
        if not str(r.get("question") or "").strip():
            problems.append(f"{where}: field 'question' is empty")
        for f in OPTION_FIELDS:
            if not str(r.get(f) or "").strip():
                problems.append(f"{where}: field '{f}' is empty")
        cop = r.get("cop")
        if not isinstance(cop, int) or isinstance(cop, bool) or not 0 <= cop < len(OPTION_FIELDS):
            problems.append(f"{where}: field 'cop' must be an integer 0-3, got {cop!r}")
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(problems[:20]))
    return rows


def from_mmlu(row: dict[str, Any]) -> dict[str, Any]:
    """An MMLU row (``question``, ``choices`` [4], ``answer`` letter) in MedMCQA's schema."""
    choices, answer = row.get("choices"), row.get("answer")
    if not isinstance(choices, list) or len(choices) != 4 or answer not in tuple(LETTERS):
        raise ValueError(f"MMLU row {row.get('id', '?')}: needs 4 'choices' and an 'answer' in A-D")
    return {"id": row.get("id"), "question": row["question"], **dict(zip(OPTION_FIELDS, choices)),
            "cop": LETTERS.index(answer), "exp": "", "subject_name": row.get("subject", "")}


def question_text(row: dict[str, Any]) -> str:
    return row["question"].strip() + "\n" + "\n".join(
        f"{L}. {row[f]}" for L, f in zip(LETTERS, OPTION_FIELDS))


def answer_line(row: dict[str, Any], index: int | None = None) -> str:
    i = row["cop"] if index is None else index
    return f"Answer: {LETTERS[i]}. {row[OPTION_FIELDS[i]]}"


def target_text(row: dict[str, Any]) -> str:
    """The training target: the answer line, then the explanation when the row has one."""
    exp = str(row.get("exp") or "").strip()
    return answer_line(row) + (f"\nExplanation: {exp}" if exp else "")


def prompts(rows: list[dict[str, Any]], system: str = MCQ_SYSTEM) -> list[list[dict[str, str]]]:
    return [messages(question_text(r), system) for r in rows]


def to_sft_rows(rows: list[dict[str, Any]]) -> list[dict[str, str]]:
    """MCQs as question/answer rows for ``medkit.train.sft`` (prompt = question + options)."""
    return [{"question": question_text(r), "answer": target_text(r)} for r in rows]


def loglik_choices(model, tok, rows: list[dict[str, Any]], system: str = MCQ_SYSTEM,
                   batch_size: int = 32, per_token: bool = True,
                   targets: list[str] | None = None) -> list[dict[str, Any]]:
    """For each row, the log-likelihood of each option's answer line and the option the model
    prefers. ``per_token``: compare the mean log-probability per token, so a long option is
    not penalised for its length (the sum is kept in ``sum_scores``).

    ``targets`` (one text per row, e.g. :func:`target_text`): also score that whole reply after the
    same prompt, in the same pass (the prompt runs once for its options and its target), into
    ``target_logp``, ``target_tokens`` and ``target_right``; :func:`target_figures` turns them into
    the loss, perplexity and token accuracy that ``common.completion_scores`` would report."""
    if targets is not None and len(targets) != len(rows):
        raise ValueError(f"loglik_choices: {len(targets)} targets for {len(rows)} rows")
    n_opt = len(OPTION_FIELDS)
    per_row = n_opt + (targets is not None)
    flat_prompts, flat_answers = [], []
    for k, (p, r) in enumerate(zip(prompts(rows, system), rows)):
        answers = [answer_line(r, i) for i in range(n_opt)] + ([targets[k]] if targets is not None else [])
        flat_prompts += [p] * per_row
        flat_answers += answers
    sums, counts, right = shared_prefix_logprobs(model, tok, flat_prompts, flat_answers, batch_size)
    out = []
    for k, r in enumerate(rows):
        at = per_row * k
        total = sums[at: at + n_opt]
        opt = [t / max(c, 1) for t, c in zip(total, counts[at: at + n_opt])] if per_token else total
        pred = max(range(n_opt), key=opt.__getitem__)
        out.append({"pred": pred, "correct": pred == r["cop"], "scores": opt, "sum_scores": total})
        if targets is not None:
            out[-1].update(target_logp=sums[at + n_opt], target_tokens=counts[at + n_opt], target_right=right[at + n_opt])
    return out


def target_figures(scored: list[dict[str, Any]]) -> dict[str, float]:
    """Loss, perplexity and token accuracy on the targets that :func:`loglik_choices` scored."""
    return answer_figures([r["target_logp"] for r in scored], [r["target_tokens"] for r in scored],
                          [r["target_right"] for r in scored])


_STRICT = re.compile(r"^\s*(?:\**answer\**\s*[:\-]\s*\**\s*([A-D])\b|([A-D])\s*[.)](?:\s|$))", re.I)


def extract_letter(text: str) -> str | None:
    """The answer letter if the reply opens with ``Answer: X`` or ``X.``/``X)``; else None.

    Strict on purpose: a letter buried in prose ("it could be B or C") is not an answer."""
    m = _STRICT.match(text or "")
    if not m:
        return None
    return (m.group(1) or m.group(2)).upper()


def generate_answers(model, tok, rows: list[dict[str, Any]], system: str = MCQ_SYSTEM,
                     max_new_tokens: int = 48, batch_size: int = 16, **generate_kwargs: Any) -> list[dict[str, Any]]:
    """Greedy (or beam, through ``generate_kwargs``) replies with the extracted letter and
    whether it is right."""
    gens = generate(model, tok, prompts(rows, system), max_new_tokens=max_new_tokens,
                    batch_size=batch_size, **generate_kwargs)
    for g, r in zip(gens, rows):
        g["letter"] = extract_letter(g["text"])
        g["correct"] = g["letter"] == LETTERS[r["cop"]]
    return gens


def explanation_of(text: str) -> str:
    """The explanation part of a reply (after ``Explanation:``; else everything after the
    answer line)."""
    m = re.search(r"explanation\s*:\s*(.*)", text or "", re.I | re.S)
    if m:
        return m.group(1).strip()
    lines = (text or "").strip().split("\n", 1)
    return lines[1].strip() if len(lines) > 1 else ""


def accuracy(results: list[dict[str, Any]]) -> float:
    return sum(bool(r["correct"]) for r in results) / len(results) if results else 0.0
