"""Benchmarks and model scorers for 08_benchmarking and ``python -m medkit.evaluate``.

- **Benchmarks** are read from a local file (anywhere) or a Hugging Face id (GPU profiles):
  PubMedQA PQA-L (yes/no/maybe, with or without its own abstract as retrieved context), MMLU's
  medical subjects and MedMCQA (in MedMCQA's schema, scored by ``medkit.evaluate.mcq``), and
  K-QA-style long answers scored against their must-have statements. A file with a wrong schema
  raises ``BenchmarkError`` naming the row and the missing field; a file that is not there
  raises ``BenchmarkMissing`` so callers can skip it cleanly.
- **Scorers** wrap any model folder: a chat decoder (Qwen/Phi/R1 templates) or an
  encoder-decoder (T5, no chat template: it reads the bare question). Each exposes the same
  three operations, option log-likelihood, greedy generation and timed single requests, so
  every model is scored on exactly the same items.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..metrics import rouge_l
from . import mcq

PUBMEDQA_LABELS = ("yes", "no", "maybe")
PUBMEDQA_SYSTEM = "You are a careful biomedical research assistant. Answer the research question with yes, no or maybe."
MMLU_MEDICAL = ("anatomy", "clinical_knowledge", "college_biology", "college_medicine", "medical_genetics",
                "professional_medicine")


class BenchmarkError(ValueError):
    """A benchmark file that does not have the schema it should."""


class BenchmarkMissing(FileNotFoundError):
    """The benchmark is not available here (no file, and no hub on this profile)."""


# ---------------------------------------------------------------- loading benchmarks
def resolve_source(ref: str | None, shared_data: str | Path | None = None) -> str | None:
    """``shared:<file>`` → that file in ``shared_data`` (default ``../shared/data``), or None when
    the folder is absent; anything else (a path or a hub id) is returned as it is."""
    if not ref or not str(ref).startswith("shared:"):
        return ref
    from ..paths import shared_data_dir

    folder = Path(shared_data) if shared_data else shared_data_dir()
    return str(Path(folder) / str(ref).split(":", 1)[1]) if folder else None


def _records(source: str | Path, bench: str, allow_hub: bool, hub_config: str | None = None,
             hub_split: str = "test") -> list[dict[str, Any]]:
    from ..data.loaders import DataError, read_records

    if source is None or str(source) == "":
        raise BenchmarkMissing(f"{bench}: no file or id given")
    path = Path(source)
    if path.exists():
        try:
            records, bad = read_records(path)
        except DataError as exc:
            raise BenchmarkError(f"{bench}: {exc}") from None
        return records
    looks_like_path = path.suffix in (".jsonl", ".json", ".csv", ".tsv", ".parquet") or str(source).startswith((".", "/"))
    if looks_like_path or not allow_hub:
        raise BenchmarkMissing(f"{bench}: no file at {source!r}" + ("" if looks_like_path else
                               " (hub ids are read only on GPU profiles: pass allow_hub=True)"))
    from datasets import load_dataset  # GPU profiles: read by Hugging Face id

    return [dict(r) for r in load_dataset(str(source), hub_config, split=hub_split)]


def _need(rec: dict[str, Any], fld: str, bench: str, i: int) -> Any:
    value = rec.get(fld)
    if value in (None, "", []):
        raise BenchmarkError(f"{bench} row {i} (id {rec.get('id', '?')}): missing field '{fld}'")
    return value


def load_pubmedqa(source, split: str | None = "test", limit: int | None = None,
                  allow_hub: bool = False) -> list[dict[str, Any]]:
    """PubMedQA PQA-L rows (``id``, ``question``, ``contexts``, ``final_decision``); ``split``
    keeps the rows whose ``split`` field matches (the 500 official test PMIDs are ``test``).
    The Hugging Face ``pqa_labeled`` layout (``pubid``, ``context.contexts``) is accepted."""
    rows = []
    for i, rec in enumerate(_records(source, "pubmedqa", allow_hub, "pqa_labeled", "train")):
        if isinstance(rec.get("context"), dict) and "contexts" not in rec:
            rec = dict(rec, contexts=rec["context"].get("contexts"))
        rid = str(rec.get("id") or rec.get("pubid") or "")
        if not rid:
            raise BenchmarkError(f"pubmedqa row {i}: missing field 'id'")
        row = {"id": rid, "question": str(_need(rec, "question", "pubmedqa", i)),
               "contexts": list(_need(rec, "contexts", "pubmedqa", i)),
               "final_decision": str(_need(rec, "final_decision", "pubmedqa", i)).lower(),
               "split": rec.get("split")}
        if row["final_decision"] not in PUBMEDQA_LABELS:
            raise BenchmarkError(f"pubmedqa row {i} (id {rid}): field 'final_decision' is "
                                 f"{row['final_decision']!r}, not yes/no/maybe")
        rows.append(row)
    if split and any(r["split"] for r in rows):
        rows = [r for r in rows if r["split"] == split]
    return rows[:limit] if limit else rows


def load_mmlu_medical(source, split: str | None = "val", limit: int | None = None,
                      allow_hub: bool = False) -> list[dict[str, Any]]:
    """MMLU medical-subject MCQs in MedMCQA's schema. A file with ``question``, ``choices`` (4)
    and ``answer`` (a letter or 0-3); a hub id (``cais/mmlu``) loads the six medical subjects."""
    if allow_hub and not Path(str(source)).exists() and "/" in str(source) and not str(source).endswith(".jsonl"):
        records = []
        for subject in MMLU_MEDICAL:
            records += [dict(r, subject=subject) for r in _records(source, "mmlu", True, subject, "validation")]
        split = None
    else:
        records = _records(source, "mmlu", allow_hub)
    rows = []
    for i, rec in enumerate(records):
        for fld in ("question", "choices", "answer"):
            if rec.get(fld) in (None, "", []):
                raise BenchmarkError(f"mmlu row {i} (id {rec.get('id', '?')}): missing field '{fld}'")
        if isinstance(rec["answer"], int):
            rec = dict(rec, answer=mcq.LETTERS[rec["answer"]])
        rec.setdefault("id", f"mmlu-{i}")
        try:
            rows.append(dict(mcq.from_mmlu(rec), split=rec.get("split")))
        except ValueError as exc:
            raise BenchmarkError(f"mmlu row {i}: {exc}") from None
    if split and any(r["split"] for r in rows):
        rows = [r for r in rows if r["split"] == split]
    return rows[:limit] if limit else rows


def load_medmcqa(source, limit: int | None = None, allow_hub: bool = False) -> list[dict[str, Any]]:
    """MedMCQA dev (``question``, ``opa``..``opd``, ``cop`` 0-3); single-answer rows only."""
    rows = []
    for i, rec in enumerate(_records(source, "medmcqa", allow_hub, None, "validation")):
        row = {"id": str(rec.get("id") or f"medmcqa-{i}"), "question": str(_need(rec, "question", "medmcqa", i))}
        for f in mcq.OPTION_FIELDS:
            row[f] = str(_need(rec, f, "medmcqa", i))
        if rec.get("cop") in (None, ""):
            raise BenchmarkError(f"medmcqa row {i} (id {row['id']}): missing field 'cop'")
        row.update(cop=int(rec["cop"]), exp=rec.get("exp") or "")
        if rec.get("choice_type", "single") == "single":
            rows.append(row)
    mcq.validate(rows, "medmcqa")
    return rows[:limit] if limit else rows


def load_kqa(source, limit: int | None = None, allow_hub: bool = False) -> list[dict[str, Any]]:
    """K-QA-style rows: ``Question`` and ``Must_have`` (a list of statements a good answer
    contains); ``Free_form_answer`` is kept as the reference when present."""
    rows = []
    for i, rec in enumerate(_records(source, "kqa", allow_hub)):
        q = rec.get("Question") or rec.get("question")
        if not q:
            raise BenchmarkError(f"kqa row {i}: missing field 'Question'")
        must = rec.get("Must_have") or rec.get("must_have")
        if not isinstance(must, list) or not must:
            raise BenchmarkError(f"kqa row {i}: missing field 'Must_have' (a non-empty list of statements)")
        rows.append({"id": str(rec.get("id") or f"kqa-{i}"), "question": str(q), "must_have": [str(m) for m in must],
                     "reference": str(rec.get("Free_form_answer") or rec.get("answer") or "")})
    return rows[:limit] if limit else rows


# ---------------------------------------------------------------- scoring any model folder
@dataclass
class Scorer:
    """One model folder, scored the same way whatever its architecture."""

    name: str
    path: str
    model: Any
    tok: Any
    kind: str  # causal | seq2seq
    reasoning: bool = False  # R1 template: the generation prompt opens <think>
    notes: list[str] = field(default_factory=list)
    # (system, user, completion) -> (sum, count, right): a text this model already scored is not
    # run again. 08 scores PubMedQA with each item's own abstract and with the retrieved ones;
    # where the own abstract came first and fills the context's words, the two prompts are the
    # same text. The model must not change while its Scorer lives.
    scored: dict = field(default_factory=dict, repr=False)
    reused: int = 0  # completions answered from ``scored``

    def _prompt(self, user: str, system: str):
        from ..train.common import messages

        return messages(user, system) if self.kind == "causal" else user

    def loglik(self, users: list[str], completions: list[str], system: str, batch_size: int = 32):
        """Sum of log-probabilities and token count of each completion after its prompt."""
        sums, counts, _ = self.loglik_detail(users, completions, system, batch_size)
        return sums, counts

    def loglik_detail(self, users: list[str], completions: list[str], system: str, batch_size: int = 32):
        """``(sums, counts, right)`` per completion: summed log-probability, scored tokens, and
        tokens where the model's top guess was the reference (for token accuracy). Each distinct
        (prompt, completion) is run once per Scorer (``scored``)."""
        keys = [(system, u, c) for u, c in zip(users, completions)]
        todo = list(dict.fromkeys(k for k in keys if k not in self.scored))
        self.reused += len(keys) - len(todo)
        if todo:
            new = zip(*self._run_loglik([u for _, u, _ in todo], [c for _, _, c in todo], system, batch_size))
            self.scored.update(zip(todo, new))
        rows = [self.scored[k] for k in keys]
        return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]

    def _run_loglik(self, users, completions, system, batch_size):
        if self.kind == "causal":
            return self._causal_loglik(users, completions, system, batch_size)
        import torch

        sums, counts, right = [], [], []
        self.model.eval()
        for s in range(0, len(users), batch_size):
            enc = self.tok(users[s: s + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=512).to(self.model.device)
            lab = self.tok(text_target=completions[s: s + batch_size], return_tensors="pt", padding=True)["input_ids"]
            lab[lab == self.tok.pad_token_id] = -100
            lab = lab.to(self.model.device)
            with torch.no_grad():
                logits = self.model(**enc, labels=lab).logits.float()
            mask = lab != -100
            logp = torch.log_softmax(logits, -1).gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            sums += logp.sum(-1).tolist()
            counts += mask.sum(-1).tolist()
            right += ((logits.argmax(-1) == lab) & mask).sum(-1).tolist()
        return sums, counts, right

    def _causal_loglik(self, users, completions, system, batch_size):
        """Summed log-probability, count and top-1 hits of each completion's tokens after its
        chat-templated prompt; each distinct prompt runs once and its cache serves every option
        (``train.common.shared_prefix_logprobs``)."""
        from ..train.common import messages, shared_prefix_logprobs

        return shared_prefix_logprobs(self.model, self.tok, [messages(u, system) for u in users], completions,
                                      batch_size)

    def generate(self, users: list[str], system: str, max_new_tokens: int = 64, batch_size: int = 16):
        """Greedy replies: ``text`` (for an R1 model, the answer after ``</think>``, or the whole
        reply when it never closed the block), ``stopped``, ``new_tokens``."""
        if self.kind == "causal":
            from ..train.common import generate

            out = generate(self.model, self.tok, [self._prompt(u, system) for u in users],
                           max_new_tokens=max_new_tokens, batch_size=batch_size)
            for g in out:
                g["new_tokens"] = len(self.tok(g["raw"], add_special_tokens=False)["input_ids"])
                if self.reasoning:
                    from ..train.cot import parse_reasoning

                    parsed = parse_reasoning(g["text"], prompt_opened=True)
                    g["reasoning_closed"] = "unclosed <think>" not in parsed["issues"]
                    g["text"] = parsed["answer"] or parsed["reasoning"]
            return out
        import torch

        self.model.eval()
        out = []
        for s in range(0, len(users), batch_size):
            enc = self.tok(users[s: s + batch_size], return_tensors="pt", padding=True, truncation=True,
                           max_length=512).to(self.model.device)
            with torch.no_grad():
                gen = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
            for row in gen.tolist():
                body = [t for t in row[1:] if t != self.tok.pad_token_id]  # drop the decoder start token
                stopped = self.tok.eos_token_id in body
                if stopped:
                    body = body[: body.index(self.tok.eos_token_id)]
                out.append({"text": self.tok.decode(body, skip_special_tokens=True).strip(), "stopped": stopped,
                            "raw": self.tok.decode(body), "new_tokens": len(body) + int(stopped)})
        return out

    def latency(self, users: list[str], system: str, n: int = 20, max_new_tokens: int = 32) -> dict[str, Any]:
        """``n`` single requests (batch 1, greedy) after one warm-up: every time in ms, P50/P95,
        and generated tokens per second."""
        import numpy as np

        self.generate(users[:1], system, max_new_tokens, batch_size=1)
        times, tokens = [], 0
        for i in range(n):
            t0 = time.perf_counter()
            g = self.generate([users[i % len(users)]], system, max_new_tokens, batch_size=1)[0]
            times.append((time.perf_counter() - t0) * 1000)
            tokens += g["new_tokens"]
        arr = np.array(times)
        return {"n": n, "times_ms": times, "p50_ms": float(np.percentile(arr, 50)),
                "p95_ms": float(np.percentile(arr, 95)), "tokens_per_s": tokens / (arr.sum() / 1000)}


def load_scorer(path: str | Path, name: str | None = None, dtype: str = "float32", device: str = "cpu",
                load_in_4bit: bool = False) -> Scorer:
    """A Scorer for any model folder (or hub id on GPU profiles). Raises ``ValueError`` with a
    clear message when the folder is missing, has no tokenizer, or (for a decoder) no chat
    template. ``load_in_4bit``: NF4 weights for a decoder (the profile's ``eval.load_in_4bit``
    names them: every model of the leaderboard is resident at once, see ``medkit.memplan``)."""
    from transformers import AutoConfig, AutoTokenizer

    p = Path(str(path))
    name = name or p.name
    if p.exists():
        if not (p / "config.json").exists():
            raise ValueError(f"{p}: not a model folder (no config.json)")
        if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")):
            raise ValueError(f"{p}: the model folder has no tokenizer (tokenizer.json / tokenizer_config.json); "
                             f"save it with tokenizer.save_pretrained(folder)")
    elif str(path).startswith((".", "/")) or p.suffix:
        raise ValueError(f"{path}: no such model folder")
    cfg = AutoConfig.from_pretrained(str(path))
    if getattr(cfg, "is_encoder_decoder", False):
        from transformers import AutoModelForSeq2SeqLM

        from ..train.common import torch_dtype

        tok = AutoTokenizer.from_pretrained(str(path))
        model = AutoModelForSeq2SeqLM.from_pretrained(str(path), dtype=torch_dtype(dtype)).to(device)
        return Scorer(name, str(path), model, tok, "seq2seq",
                      notes=["encoder-decoder without a chat template: reads the bare question"])
    from ..train.common import load_causal_lm

    model, tok = load_causal_lm(str(path), dtype, device, load_in_4bit=load_in_4bit)
    reasoning = "<think>" in (tok.chat_template or "")
    return Scorer(name, str(path), model, tok, "causal", reasoning)


# ---------------------------------------------------------------- benchmark scoring
def _choose(sums: list[float], counts: list[int], k: int, per_token: bool) -> list[int]:
    scores = [s / max(c, 1) if per_token else s for s, c in zip(sums, counts)]
    return [max(range(k), key=lambda j: scores[i * k + j]) for i in range(len(scores) // k)]


def pubmedqa_prompt(row: dict[str, Any], with_context: bool, context_words: int = 150) -> str:
    if not with_context:
        return f"Question: {row['question']}"
    words = " ".join(row["contexts"]).split()
    return f"Context: {' '.join(words[:context_words])}\n\nQuestion: {row['question']}"


_YNM = re.compile(r"^\W*(?:answer\s*[:\-]\s*)?(yes|no|maybe)\b", re.I)


def extract_decision(text: str) -> str | None:
    """Strict: the reply must open with yes/no/maybe (optionally after ``Answer:``)."""
    m = _YNM.match(text or "")
    return m.group(1).lower() if m else None


def score_pubmedqa(scorer: Scorer, rows: list[dict[str, Any]], with_context: bool, context_words: int = 150,
                   n_generate: int = 0) -> dict[str, Any]:
    """Accuracy by option log-likelihood (per token and raw sum) over yes/no/maybe, and, on the
    first ``n_generate`` rows, by generation with strict extraction. Per-item flags are kept
    for confidence intervals."""
    users = [pubmedqa_prompt(r, with_context, context_words) for r in rows]
    flat_u = [u for u in users for _ in PUBMEDQA_LABELS]
    flat_c = [f"Answer: {lab}" for _ in users for lab in PUBMEDQA_LABELS]
    sums, counts = scorer.loglik(flat_u, flat_c, PUBMEDQA_SYSTEM, batch_size=12)
    gold = [PUBMEDQA_LABELS.index(r["final_decision"]) for r in rows]
    out = {"n": len(rows)}
    for tag, per_token in (("norm", True), ("raw", False)):
        picks = _choose(sums, counts, 3, per_token)
        out[f"correct_{tag}"] = [p == g for p, g in zip(picks, gold)]
        out[f"acc_{tag}"] = sum(out[f"correct_{tag}"]) / max(len(rows), 1)
    out["pred_dist"] = {lab: _choose(sums, counts, 3, True).count(i) / max(len(rows), 1)
                        for i, lab in enumerate(PUBMEDQA_LABELS)}
    if n_generate:
        out.update(pubmedqa_generation(scorer, rows, with_context, context_words, n_generate))
    return out


def pubmedqa_generation(scorer: Scorer, rows: list[dict[str, Any]], with_context: bool, context_words: int,
                        n_generate: int) -> dict[str, Any]:
    """The generation half of :func:`score_pubmedqa` on its own: greedy replies to the first
    ``n_generate`` rows, read by strict extraction (``correct_gen``, ``acc_gen``, ``format_rate_gen``,
    ``n_gen``). For a row whose log-likelihoods another call already holds (08's SFT + RAG row: the
    SFT model on the retrieved abstracts is also the SFT row of ``pubmedqa_retrieved``)."""
    users = [pubmedqa_prompt(r, with_context, context_words) for r in rows[:n_generate]]
    gens = scorer.generate(users, PUBMEDQA_SYSTEM, max_new_tokens=8)
    decisions = [extract_decision(g["text"]) for g in gens]
    correct = [d == r["final_decision"] for d, r in zip(decisions, rows)]
    return {"correct_gen": correct, "acc_gen": sum(correct) / len(gens),
            "format_rate_gen": sum(d is not None for d in decisions) / len(gens), "n_gen": len(gens)}


def score_mcq(scorer: Scorer, rows: list[dict[str, Any]], n_generate: int = 0,
              evidence: list[str] | None = None) -> dict[str, Any]:
    """MedMCQA-schema MCQs: option log-likelihood (length-normalised and raw) on every row;
    strict-letter generation on the first ``n_generate``. ``evidence`` (one text per row, e.g.
    retrieved passages) goes before each question for the with-retrieval rows."""
    users = [mcq.question_text(r) for r in rows]
    if evidence is not None:
        users = [f"Evidence: {e}\n\n{u}" for e, u in zip(evidence, users)]
    flat_u = [u for u in users for _ in mcq.OPTION_FIELDS]
    flat_c = [mcq.answer_line(r, i) for r in rows for i in range(len(mcq.OPTION_FIELDS))]
    sums, counts = scorer.loglik(flat_u, flat_c, mcq.MCQ_SYSTEM)
    out: dict[str, Any] = {"n": len(rows)}
    for tag, per_token in (("norm", True), ("raw", False)):
        picks = _choose(sums, counts, 4, per_token)
        out[f"correct_{tag}"] = [p == r["cop"] for p, r in zip(picks, rows)]
        out[f"acc_{tag}"] = sum(out[f"correct_{tag}"]) / max(len(rows), 1)
    if n_generate:
        gens = scorer.generate(users[:n_generate], mcq.MCQ_SYSTEM, max_new_tokens=32)
        for g, r in zip(gens, rows):
            g["letter"] = mcq.extract_letter(g["text"])
            g["correct"] = g["letter"] == mcq.LETTERS[r["cop"]]
        out["correct_gen"] = [g["correct"] for g in gens]
        out["acc_gen"] = mcq.accuracy(gens)
        out["format_rate_gen"] = sum(g["letter"] is not None for g in gens) / len(gens)
        out["n_gen"] = len(gens)
        out["replies"] = gens
    return out


def must_have_coverage(answer: str, statements: list[str], threshold: float = 0.5) -> float:
    """Share of must-have statements an answer covers, by ROUGE-L recall of each statement
    against the answer (>= ``threshold``). A lexical stand-in for K-QA's NLI judge: it under-counts
    paraphrases, and says so in the table."""
    from rouge_score import rouge_scorer

    sc = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    hits = [sc.score(s, answer)["rougeL"].recall >= threshold for s in statements]
    return sum(hits) / len(hits) if hits else 0.0


def score_kqa(scorer: Scorer, rows: list[dict[str, Any]], max_new_tokens: int = 96) -> dict[str, Any]:
    from ..train.common import SYSTEM_PROMPT

    gens = scorer.generate([r["question"] for r in rows], SYSTEM_PROMPT, max_new_tokens=max_new_tokens)
    cov = [must_have_coverage(g["text"], r["must_have"]) for g, r in zip(gens, rows)]
    refs = [r["reference"] for r in rows]
    out = {"n": len(rows), "must_have_coverage": sum(cov) / max(len(cov), 1),
           "complete": [c == 1.0 for c in cov]}
    if all(refs):
        out["rougeL"] = rouge_l([g["text"] for g in gens], refs)
    return out


BENCHMARKS = {"pubmedqa": load_pubmedqa, "mmlu": load_mmlu_medical, "medmcqa": load_medmcqa, "kqa": load_kqa}


def run_benchmark(scorer: Scorer, bench: str, data, limit: int | None = None, n_generate: int = 0,
                  with_context: bool = False, context_words: int = 150, allow_hub: bool = False) -> dict[str, Any]:
    """Load ``bench`` from ``data`` and score ``scorer`` on it; a JSON-ready summary (per-item
    flags dropped, 95% bootstrap intervals added)."""
    from .leaderboard import bootstrap_ci

    if bench not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {bench!r}; choose one of {sorted(BENCHMARKS)}")
    rows = BENCHMARKS[bench](data, limit=limit, allow_hub=allow_hub)
    if not rows:
        raise BenchmarkError(f"{bench}: no rows in {data} (check the split)")
    if bench == "pubmedqa":
        res = score_pubmedqa(scorer, rows, with_context, context_words, n_generate)
    elif bench == "kqa":
        res = score_kqa(scorer, rows)
    else:
        res = score_mcq(scorer, rows, n_generate)
    summary = {"model": scorer.path, "kind": scorer.kind, "benchmark": bench, "data": str(data),
               "with_context": with_context if bench == "pubmedqa" else None}
    summary.update({k: v for k, v in res.items() if not k.startswith("correct_") and k not in ("complete", "replies")})
    for key, value in res.items():  # the intervals after the figures they qualify
        if key.startswith("correct_") or key == "complete":
            summary["ci95_" + (key.split("_", 1)[1] if key != "complete" else "complete")] = list(bootstrap_ci(value))
    return summary


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=float)
