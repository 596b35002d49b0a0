"""Failure patterns of generated answers, counted, with the fix each one suggests.

Every reply gets zero or more pattern labels; ``pattern_table`` counts them over all replies
(the Phi-2 system's "verbose in 98.5% of answers" is such a count) and over the wrong ones.
The rules are simple and visible, so a learner can check any label by reading the reply.
"""
from __future__ import annotations

import re
from collections import Counter
from typing import Any

from .mcq import LETTERS, OPTION_FIELDS, extract_letter

_HEDGE = re.compile(r"\b(may|might|possibly|perhaps|could be|not sure|unclear|it depends|cannot be certain"
                    r"|consult|see a doctor|unsure)\b", re.I)

SUGGESTIONS = {
    "format_failure": "no strict answer letter: train on more 'Answer: X' targets, or constrain the first tokens",
    "wrong_letter": "a well-formed but wrong choice: more/better data on the topic, retrieval, or more steps",
    "letter_option_mismatch": "the letter and the option text disagree: put the option text in the target "
                              "right after the letter (as here) and check extraction",
    "verbose": "longer than needed: cap max_new_tokens, add a conciseness instruction, or a length penalty",
    "hedging": "hedges instead of committing: preference-train (DPO) against hedged answers",
    "truncated": "ran out of tokens before ending its turn: raise max_new_tokens or train shorter targets",
    "repetition": "repeats itself: repetition_penalty / no_repeat_ngram_size at decoding, or more training",
}


def _repeats(text: str, n: int = 4) -> bool:
    words = text.lower().split()
    grams = [tuple(words[i: i + n]) for i in range(len(words) - n + 1)]
    return len(grams) - len(set(grams)) >= 2


def classify(row: dict[str, Any], reply: dict[str, Any], verbose_words: int) -> list[str]:
    """The pattern labels of one reply to one MCQ (``reply`` from ``mcq.generate_answers`` or
    ``train.common.generate``)."""
    text = reply["text"]
    labels = []
    letter = extract_letter(text)
    if letter is None:
        labels.append("format_failure")
    elif letter != LETTERS[row["cop"]]:
        labels.append("wrong_letter")
        named = [i for i, f in enumerate(OPTION_FIELDS) if str(row[f]).lower() in text.lower()]
        if named and LETTERS.index(letter) not in named:
            labels.append("letter_option_mismatch")
    if len(text.split()) > verbose_words:
        labels.append("verbose")
    if _HEDGE.search(text):
        labels.append("hedging")
    if not reply.get("stopped", True):
        labels.append("truncated")
    if _repeats(text):
        labels.append("repetition")
    return labels


def verbose_threshold(rows: list[dict[str, Any]], factor: float = 1.5) -> int:
    """Words above which a reply counts as verbose: ``factor`` × the longest reference target
    (answer line + explanation), so a reply as long as a good one never counts."""
    from .mcq import target_text

    return int(factor * max(len(target_text(r).split()) for r in rows))


def pattern_table(rows: list[dict[str, Any]], replies: list[dict[str, Any]], verbose_words: int | None = None):
    """A DataFrame: pattern, replies with it, share of all replies, share of wrong replies,
    suggested fix; sorted by count."""
    import pandas as pd

    verbose_words = verbose_words or verbose_threshold(rows)
    labels = [classify(r, g, verbose_words) for r, g in zip(rows, replies)]
    wrong = [lab for lab, g in zip(labels, replies) if not g.get("correct")]
    all_counts = Counter(x for lab in labels for x in lab)
    wrong_counts = Counter(x for lab in wrong for x in lab)
    table = pd.DataFrame([{"pattern": p, "count": all_counts.get(p, 0),
                           "share_of_replies": all_counts.get(p, 0) / max(len(replies), 1),
                           "share_of_failures": wrong_counts.get(p, 0) / max(len(wrong), 1),
                           "suggested_fix": SUGGESTIONS[p]} for p in SUGGESTIONS])
    return table.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)
