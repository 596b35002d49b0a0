"""The leaderboard of 08_benchmarking: held-out QA scores per model, bootstrap intervals, failure
patterns across models (citations included), the claims table, hardware and plots."""
from __future__ import annotations

import platform
import re
from collections import Counter
from typing import Any

from .. import metrics
from ..rag.text import tokenize
from . import errors

QA_SUGGESTIONS = {
    "verbose": errors.SUGGESTIONS["verbose"],
    "generic_non_answer": "a 'see your doctor' reply with no content: DPO against generic answers (03), or retrieval",
    "truncated": errors.SUGGESTIONS["truncated"],
    "repetition": errors.SUGGESTIONS["repetition"],
    "empty": "said nothing: check the chat template and the end token the model was trained to emit",
    "format_failure": errors.SUGGESTIONS["format_failure"],
    "wrong_option": errors.SUGGESTIONS["wrong_letter"],
    "uncited_claim": "a factual sentence with no [E#]: train on cited answers or use the extractive answerer",
    "unsupported_citation": "the cited passage does not contain the claim: cite only sentences taken from it, "
                            "or re-check each citation against its passage before showing it",
}


def bootstrap_ci(flags: list[bool] | list[float], n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``flags`` (0/1 per item)."""
    import numpy as np

    x = np.asarray(flags, dtype=float)
    if x.size == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(1)
    lo, hi = np.percentile(means, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return (float(lo), float(hi))


def hardware() -> str:
    """The machine the timings come from, in words."""
    import os

    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    cpu = platform.processor() or platform.machine()
    return f"CPU only: {os.cpu_count()} cores ({cpu}), torch threads {torch.get_num_threads()}"


def rag_user(question: str, passages: list[str], context_words: int = 120) -> str:
    """The user turn of the SFT+RAG row: the question and the retrieved passages as numbered
    evidence, cut to ``context_words`` words in all so a small context window holds it."""
    budget, blocks = context_words, []
    for i, text in enumerate(passages, 1):
        words = text.split()[: max(budget, 0)]
        if not words:
            break
        blocks.append(f"[E{i}] {' '.join(words)}")
        budget -= len(words)
    return f"{question}\n\nEvidence:\n" + "\n".join(blocks)


def score_qa(scorer, questions: list[str], answers: list[str], system: str, n_generate: int,
             bert_model: str, max_new_tokens: int = 64) -> dict[str, Any]:
    """Held-out QA: teacher-forced answer loss, perplexity and token accuracy on every item;
    generation on the first ``n_generate``: ROUGE-L, BLEU (sacrebleu), BERTScore F1, length and
    verbosity, generic-answer rate, end-of-turn rate. ``replies`` keeps the generations and
    ``items`` the per-item answer log-probability, token count and correct tokens (so a subset,
    e.g. the items unseen in pre-training, can be scored without running the model again)."""
    import torch

    sums, counts, right = scorer.loglik_detail(questions, answers, system, batch_size=16)
    loss = -sum(sums) / max(sum(counts), 1)
    out: dict[str, Any] = {"n": len(questions), "loss": loss, "perplexity": metrics.perplexity(loss),
                           "token_accuracy": sum(right) / max(sum(counts), 1),
                           "items": {"logp": list(sums), "tokens": list(counts), "right": list(right)}}
    gens = scorer.generate(questions[:n_generate], system, max_new_tokens=max_new_tokens)
    texts, refs = [g["text"] for g in gens], answers[:n_generate]
    words = [len(t.split()) for t in texts]
    out.update(n_gen=len(gens), rougeL=metrics.rouge_l(texts, refs), bleu=metrics.bleu(texts, refs),
               bertscore_f1=metrics.bertscore_f1(texts, refs, bert_model),
               mean_words=metrics.mean(words), p90_words=float(torch.tensor(words, dtype=torch.float).quantile(0.9)) if words else 0.0,
               length_ratio=metrics.mean(w / max(len(r.split()), 1) for w, r in zip(words, refs)),
               verbose_share=metrics.mean(is_verbose(t, r) for t, r in zip(texts, refs)),
               generic_rate=metrics.mean(metrics.is_generic_non_answer(t) for t in texts),
               stop_rate=metrics.mean(bool(g["stopped"]) for g in gens), replies=gens)
    return out


def is_verbose(text: str, reference: str, factor: float = 2.0) -> bool:
    """Longer than ``factor`` × the reference answer (in words)."""
    return len(text.split()) > factor * max(len(reference.split()), 5)


_CITE_SENT = re.compile(r"\[(E\d+)\]")


def citation_support(answer_text: str, evidence: dict[str, str], min_overlap: float = 0.5) -> dict[str, int]:
    """For each sentence that cites ``[E#]``: supported when at least ``min_overlap`` of its content
    words appear in one of the passages it cites. Counts ``cited``, ``unsupported`` and ``unknown``
    (an id that was not retrieved)."""
    from ..rag.answer import sentences

    out = {"cited": 0, "unsupported": 0, "unknown": 0}
    for sent in sentences(answer_text):
        ids = _CITE_SENT.findall(sent)
        if not ids:
            continue
        out["cited"] += 1
        words = set(tokenize(_CITE_SENT.sub("", sent)))
        known = [evidence[i] for i in ids if i in evidence]
        if len(known) < len(ids):
            out["unknown"] += 1
        best = max((len(words & set(tokenize(t))) / max(len(words), 1) for t in known), default=0.0)
        if best < min_overlap:
            out["unsupported"] += 1
    return out


def qa_patterns(reply: dict[str, Any], reference: str) -> list[str]:
    text = reply["text"]
    labels = []
    if not text.strip():
        labels.append("empty")
    if is_verbose(text, reference):
        labels.append("verbose")
    if metrics.is_generic_non_answer(text):
        labels.append("generic_non_answer")
    if not reply.get("stopped", True):
        labels.append("truncated")
    if errors._repeats(text):
        labels.append("repetition")
    return labels


def failure_table(model_replies: dict[str, dict[str, Any]]):
    """One row per (model, pattern): count, share of that model's replies, an example and the
    suggested fix. ``model_replies[name]`` may hold ``qa`` (replies, references), ``mcq`` (replies,
    rows) and ``citations`` (a list of citation_support/check dicts, one per answer)."""
    import pandas as pd

    rows = []
    for name, parts in model_replies.items():
        counts, examples, n = Counter(), {}, 0
        if "qa" in parts:
            replies, refs = parts["qa"]
            n += len(replies)
            for g, ref in zip(replies, refs):
                for lab in qa_patterns(g, ref):
                    counts[lab] += 1
                    examples.setdefault(lab, g["text"][:100])
        if "mcq" in parts:
            replies, mrows = parts["mcq"]
            n += len(replies)
            for g, r in zip(replies, mrows):
                from .mcq import LETTERS

                if g["letter"] is None:
                    counts["format_failure"] += 1
                    examples.setdefault("format_failure", g["text"][:100])
                elif g["letter"] != LETTERS[r["cop"]]:
                    counts["wrong_option"] += 1
                    examples.setdefault("wrong_option", g["text"][:100])
        for text, check in parts.get("citations", []):
            n += 0  # citations are counted per answer already included above
            if check.get("uncited_sentences"):
                counts["uncited_claim"] += 1
                examples.setdefault("uncited_claim", text[:100])
            if check.get("unsupported") or check.get("unknown"):
                counts["unsupported_citation"] += 1
                examples.setdefault("unsupported_citation", text[:100])
        total = n or len(parts.get("citations", [])) or 1
        for lab, c in counts.most_common():
            rows.append({"model": name, "pattern": lab, "count": c, "share": c / total, "replies": total,
                         "example": examples[lab], "suggested_fix": QA_SUGGESTIONS[lab]})
    return pd.DataFrame(rows, columns=["model", "pattern", "count", "share", "replies", "example", "suggested_fix"])


def fmt_ci(acc: float | None, ci: tuple[float, float] | None, n: int | None) -> str:
    if acc is None:
        return "n/a"
    return f"{acc:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] n={n}" if ci else f"{acc:.3f} n={n}"


def plot_metrics(board, metrics_to_plot: list[str], title: str = "", n: dict[str, int] | None = None,
                 ci: dict[str, dict[str, tuple[float, float]]] | None = None):
    """One bar chart per metric (models on the x axis); missing values are left blank. ``n``
    puts each metric's sample count in its title; ``ci`` draws 95% intervals as error bars."""
    import matplotlib.pyplot as plt

    cols = [m for m in metrics_to_plot if m in board.columns]
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.4), squeeze=False)
    for ax, m in zip(axes[0], cols):
        vals = board[m].astype(float)
        bars = (ci or {}).get(m, {})
        err = [[max(v - bars[k][0], 0) if k in bars else 0 for k, v in vals.items()],
               [max(bars[k][1] - v, 0) if k in bars else 0 for k, v in vals.items()]]
        ax.bar(range(len(vals)), vals.fillna(0).values, yerr=err if bars else None, capsize=2, color="#3b7dd8")
        ax.set_xticks(range(len(vals)))
        ax.set_xticklabels(board.index, rotation=60, ha="right", fontsize=7)
        ax.set_title(m + (f" (n={n[m]})" if n and m in n else ""), fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_latency(latencies: dict[str, dict[str, Any]], hw: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, lat in latencies.items():
        ax.hist(lat["times_ms"], bins=15, alpha=0.5, label=f"{name} (P95 {lat['p95_ms']:.0f} ms)")
    ax.set_xlabel("latency per request, ms (batch 1)")
    ax.set_ylabel("requests")
    ax.set_title(f"Latency, {hw}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def as_summary(ledger: dict[str, Any], name: str = "08_benchmarking") -> dict[str, Any]:
    """A leaderboard ledger in the shape of ``summary.json``, so ``medkit.run.compare`` (and
    ``python -m medkit.run --compare``) can flag what moved between two ledgers."""
    flat = {f"{model}.{k}": v for model, row in ledger["models"].items() for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"notebooks": [{"name": name, "status": "ok", "metrics": flat}]}
