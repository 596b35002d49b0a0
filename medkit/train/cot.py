"""R1-style reasoning SFT, as FEMOZ does it: Question → ``<think>`` Complex_CoT ``</think>`` →
Response with **Diagnosis** and **Treatment Plan**; LoRA r=16, α=16 on all seven projections,
linear warm-up, gradient accumulation 4.

Two paths share one prompt builder (``build_prompt``), one training target (``training_target``)
and one parser (``parse_reasoning``):

- ``unsloth``: ``FastLanguageModel`` with the 4-bit R1-distill model and ``adamw_8bit``
  (GPU profiles). Unsloth is imported only there: ``import unsloth`` fails without an NVIDIA GPU.
- ``transformers``: the same recipe through transformers + peft + trl on the tiny Llama with
  the R1 chat template (CPU), with ``adamw_torch`` (bitsandbytes' 8-bit AdamW is a GPU optimizer).
"""
from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

from .common import fp32_adapters_for_fp16, messages, precision_flags

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
COT_SYSTEM = ("You are a careful medical reasoning assistant. Think through the case step by step "
              "inside <think> </think>, then give **Diagnosis:** and **Treatment Plan:**.")


def build_prompt(question: str, system: str = COT_SYSTEM) -> list[dict[str, str]]:
    """The chat messages for one case (both paths, training and inference)."""
    return messages(question.strip(), system)


def training_target(row: dict[str, Any]) -> str:
    """The assistant turn: the reasoning inside ``<think>`` (kept in the target, as FEMOZ
    trains it), then the structured response. It opens with ``<think>\\n`` because R1's
    generation prompt ends with that, so prompt + target renders exactly as at inference."""
    return f"{THINK_OPEN}\n{row['Complex_CoT'].strip()}\n{THINK_CLOSE}\n\n{row['Response'].strip()}"


def validate(rows: list[dict[str, Any]], source: str = "cot") -> list[dict[str, Any]]:
    """Rows in medical-o1's schema, or ``ValueError`` naming the row and the empty field."""
    problems = [f"{source} row {i} (id {r.get('id', '?')}): field {f!r} is empty"
                for i, r in enumerate(rows) for f in ("Question", "Complex_CoT", "Response")
                if not str(r.get(f) or "").strip()]
    if problems:
        raise ValueError(f"{len(problems)} problem(s) in {source}:\n" + "\n".join(problems[:20]))
    return rows


_SECTION = re.compile(r"\*\*\s*(diagnosis|treatment plan)\s*:?\s*\*\*\s*:?", re.I)


def parse_sections(answer: str) -> dict[str, str]:
    """``diagnosis`` and ``treatment_plan`` from the bold-headed sections ('' when absent)."""
    out = {"diagnosis": "", "treatment_plan": ""}
    marks = list(_SECTION.finditer(answer or ""))
    for k, m in enumerate(marks):
        end = marks[k + 1].start() if k + 1 < len(marks) else len(answer)
        key = "diagnosis" if m.group(1).lower() == "diagnosis" else "treatment_plan"
        if not out[key]:
            out[key] = answer[m.end(): end].strip()
    return out


def parse_reasoning(text: str, prompt_opened: bool = True) -> dict[str, Any]:
    """Split a reply into reasoning and final answer, and parse the answer's sections.

    ``prompt_opened``: the generation prompt already ended with ``<think>`` (R1's template does),
    so the reply starts inside the block and shows only ``</think>``. Handles a missing block,
    an unclosed one (all reasoning, no answer), and repeated tags (the reasoning runs to the
    last ``</think>``; stray inner tags are dropped). Returns ``reasoning``, ``answer``,
    ``diagnosis``, ``treatment_plan``, ``well_formed`` (exactly one complete block with
    reasoning in it) and ``issues`` (what was wrong)."""
    text = (text or "").strip()
    issues: list[str] = []
    opens, closes = text.count(THINK_OPEN), text.count(THINK_CLOSE)
    body = text
    if body.startswith(THINK_OPEN):
        body = body[len(THINK_OPEN):]
        opens -= 1
    elif not prompt_opened:
        if THINK_CLOSE in body or opens:
            issues.append("reply does not open with <think>")
        else:
            issues.append("no <think> block")
    if opens > 0:
        issues.append("repeated <think>")
    if closes == 0:
        if prompt_opened or text.startswith(THINK_OPEN):
            issues.append("unclosed <think>")
            reasoning, answer = body.replace(THINK_OPEN, ""), ""
        else:
            reasoning, answer = "", body
    else:
        if closes > 1:
            issues.append("repeated </think>")
        cut = body.rfind(THINK_CLOSE)
        reasoning = body[:cut].replace(THINK_OPEN, "").replace(THINK_CLOSE, "")
        answer = body[cut + len(THINK_CLOSE):]
    reasoning, answer = reasoning.strip(), answer.strip()
    if closes and not reasoning:
        issues.append("empty reasoning")
    sections = parse_sections(answer)
    return {"reasoning": reasoning, "answer": answer, **sections, "issues": issues,
            "well_formed": not issues}


def format_ok(parsed: dict[str, Any]) -> bool:
    """A well-formed think block and both sections present."""
    return parsed["well_formed"] and bool(parsed["diagnosis"]) and bool(parsed["treatment_plan"])


def condition_names(condition: dict[str, Any]) -> list[str]:
    """The names that count as naming a condition: its name, synonyms and lay terms."""
    names = [condition["name"], *condition.get("synonyms", []), *condition.get("lay_terms", [])]
    return [n for n in dict.fromkeys(n.strip() for n in names) if len(n) > 2]


def diagnosis_correct(diagnosis: str, condition: dict[str, Any]) -> bool:
    """True if the diagnosis names the condition or a synonym (whole words, any case)."""
    text = (diagnosis or "").lower()
    return any(re.search(rf"\b{re.escape(n.lower())}\b", text) for n in condition_names(condition))


_ICD10 = re.compile(r"ICD-?10\W{0,3}([A-Z]\d{2}(?:\.\d{1,2})?)\b", re.I)  # "(ICD-10 I71.4)", as the targets write it


def icd10_correct(diagnosis: str, condition: dict[str, Any]) -> bool:
    """The Diagnosis section gives the condition's ICD-10 code (the knowledge base's), and no other."""
    codes = {c.upper() for c in _ICD10.findall(diagnosis or "")}
    return bool(codes) and codes == {condition["icd10"]}


def evaluate(model, tok, rows: list[dict[str, Any]], kb, max_new_tokens: int = 256,
             batch_size: int = 32) -> dict[str, Any]:
    """Generate a reply to each held-out case and score it: think-block rate, format compliance,
    diagnosis accuracy (against the case's ``condition_id`` in the knowledge base) and ICD-10
    accuracy (the code given is that condition's: a model can name the right condition and make
    up its code)."""
    return evaluate_sets(model, tok, [rows], kb, max_new_tokens, batch_size)[0]


def evaluate_sets(model, tok, sets: list[list[dict[str, Any]]], kb, max_new_tokens: int = 256,
                  batch_size: int = 32) -> list[dict[str, Any]]:
    """:func:`evaluate` on several sets of cases (05: the held-out cases and the new ones) with
    one generation pass: the replies of every set are written in the same batches of
    ``batch_size``, then each set is scored on its own. A batch runs until its longest reply
    ends, so 32 held-out cases and 12 new ones in one batch of 44 cost less than a batch of 32
    and another of 12 (96 tokens on one core: 26 s for 32 replies, 34 s for 44, 14 s for 12)."""
    from .common import generate

    every = [r for rows in sets for r in rows]
    gens = generate(model, tok, [build_prompt(r["Question"]) for r in every], max_new_tokens=max_new_tokens,
                    batch_size=batch_size)
    opened = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False,
                                     add_generation_prompt=True).rstrip().endswith(THINK_OPEN)
    out, at = [], 0
    for rows in sets:
        out.append(_score_replies(rows, gens[at: at + len(rows)], kb, opened))
        at += len(rows)
    return out


def _score_replies(rows: list[dict[str, Any]], gens: list[dict[str, Any]], kb, opened: bool) -> dict[str, Any]:
    per = []
    for r, g in zip(rows, gens):
        p = parse_reasoning(g["text"], prompt_opened=opened)
        cond = kb.conditions.get(r.get("condition_id", ""))
        per.append({"id": r.get("id"), "reply": g["text"], "think_closed": THINK_CLOSE in g["text"],
                    "format_ok": format_ok(p), "diagnosis": p["diagnosis"],
                    "dx_correct": bool(cond) and diagnosis_correct(p["diagnosis"], cond),
                    "icd10_correct": bool(cond) and bool(cond.get("icd10")) and icd10_correct(p["diagnosis"], cond),
                    "issues": "; ".join(p["issues"])})
    n = max(len(per), 1)
    return {"think_rate": sum(x["think_closed"] for x in per) / n,
            "format_ok": sum(x["format_ok"] for x in per) / n,
            "dx_acc": sum(x["dx_correct"] for x in per) / n, "icd10_acc": sum(x["icd10_correct"] for x in per) / n,
            "n": len(per), "rows": per}


# ---------------------------------------------------------------- new cases

CASE_PROMPT = ("Write a short, realistic patient vignette (age, sex, symptoms with duration, one "
               "relevant history item) for a patient with {name}. Do not name the diagnosis.")


def generate_cases(kb, n: int, seed: int = 0, model=None, tok=None, exclude: set[str] | None = None):
    """``n`` new patient vignettes as rows in medical-o1's schema (``Question`` plus the
    ``condition_id`` for scoring). With a ``model`` (GPU profiles) the model writes each
    vignette, as FEMOZ does; without one (tiny profile) they are drawn from the knowledge base
    with ``medkit.data.generate.vignette``. ``exclude``: vignette texts not to repeat."""
    from ..data.generate import vignette

    rng = random.Random(seed)
    conds = sorted(kb.conditions.values(), key=lambda c: c["id"])
    picks = [rng.choice(conds) for _ in range(n)]
    if model is not None:
        from .common import generate

        gens = generate(model, tok, [messages(CASE_PROMPT.format(name=c["name"].lower()))
                                     for c in picks], max_new_tokens=160)
        texts = [parse_reasoning(g["text"], prompt_opened=False)["answer"] or g["text"] for g in gens]
    else:
        texts = [vignette(c, random.Random(f"{seed}-case-{k}"))[0] for k, c in enumerate(picks)]
    rows = []
    for k, (c, text) in enumerate(zip(picks, texts)):
        if exclude and text in exclude:
            continue
        rows.append({"id": f"case.{seed}.{k}", "Question": text + " What is the most likely diagnosis and how "
                     "should it be managed?", "condition_id": c["id"], "source": "model" if model else "kb"})
    return rows


# ---------------------------------------------------------------- training, two paths

def unsloth_available(cfg: dict[str, Any]) -> bool:
    """True only when the profile asks for Unsloth, a CUDA GPU exists and the import works."""
    if not cfg.get("use_unsloth") or cfg["device"] != "cuda":
        return False
    try:
        import unsloth  # noqa: F401  (raises without an NVIDIA GPU)
    except Exception:  # noqa: BLE001 - any import failure means: use the transformers path
        return False
    return True


def load_for_training(base_path: str, cfg: dict[str, Any]):
    """(model, tokenizer, path): a LoRA-wrapped model ready for SFT, by Unsloth on a GPU
    profile that asks for it, else by transformers + peft with the same LoRA settings."""
    lora = cfg["lora"]
    if unsloth_available(cfg):
        from unsloth import FastLanguageModel

        model, tok = FastLanguageModel.from_pretrained(model_name=base_path, max_seq_length=cfg["seq_len"],
                                                       dtype=None, load_in_4bit=True)
        model = FastLanguageModel.get_peft_model(
            model, r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=list(lora["target_modules"]), bias="none",
            use_gradient_checkpointing="unsloth", random_state=cfg.get("seed", 0))
        return model, tok, "unsloth"
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .common import load_causal_lm
    from .sft import lora_config

    quantized = bool(cfg.get("load_in_4bit")) and cfg["device"] == "cuda"
    # 4-bit without Unsloth too: the 8B in 16-bit (15 GiB) does not fit a T4 (medkit.memplan)
    model, tok = load_causal_lm(base_path, cfg["dtype"], cfg["device"], load_in_4bit=quantized)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    extra = {}
    if cfg.get("train_tokens"):
        # a base that never saw these tokens has random embedding rows for them; train just
        # those rows (R1's own release has them trained, so the GPU profiles leave this out)
        ids = tok.convert_tokens_to_ids(list(cfg["train_tokens"]))
        if tok.unk_token_id is not None and tok.unk_token_id in ids:
            raise ValueError(f"{base_path}: tokenizer lacks one of {cfg['train_tokens']}")
        extra["trainable_token_indices"] = ids
    return get_peft_model(model, lora_config(lora, **extra)), tok, "transformers"


def to_dataset(rows: list[dict[str, Any]], tok):
    """Tokenized training examples (``input_ids``, ``completion_mask``): the prompt as at
    inference, then the whole target, reasoning included. Rendered by
    ``common.render_completion``, because R1-Distill's own template drops everything up to
    ``</think>`` from an assistant turn: a conversational dataset would train on the answer
    without its reasoning."""
    from datasets import Dataset

    from .common import tokenize_completion

    out = []
    for r in rows:
        ids, n_prompt = tokenize_completion(tok, build_prompt(r["Question"]), training_target(r))
        out.append({"input_ids": ids, "completion_mask": [0] * n_prompt + [1] * (len(ids) - n_prompt)})
    return Dataset.from_list(out)


def make_trainer(model, tok, train_rows, eval_rows, cfg: dict[str, Any], out_dir, **extra: Any):
    """trl ``SFTTrainer`` with FEMOZ's schedule: linear decay after warm-up, gradient
    accumulation, ``adamw_8bit`` on a GPU (``adamw_torch`` on the CPU), loss on the assistant
    turn only (the reasoning and the response)."""
    from trl import SFTConfig, SFTTrainer

    from .common import score_labelled_positions_only

    score_labelled_positions_only()
    steps = cfg["max_steps"]
    args = dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
                per_device_eval_batch_size=cfg["batch_size"], gradient_accumulation_steps=cfg.get("grad_accum", 4),
                learning_rate=cfg["lr"], lr_scheduler_type="linear", warmup_steps=cfg.get("warmup_steps", 5),
                optim=cfg.get("optim", "adamw_8bit") if cfg["device"] == "cuda" else "adamw_torch",
                weight_decay=0.01, logging_steps=max(1, steps // 20), eval_strategy="no", save_strategy="no",
                max_length=cfg["seq_len"], completion_only_loss=True, report_to="none",
                # the profile's, as in 02 and 03: trl's SFTConfig would otherwise turn it on
                gradient_checkpointing=cfg.get("gradient_checkpointing", False),
                seed=cfg.get("seed", 0), use_cpu=cfg["device"] == "cpu", dataloader_num_workers=0,
                **precision_flags(cfg["dtype"]))
    args.update(extra)
    trainer_class = _model_loss_trainer_class() if cfg.get("train_tokens") else SFTTrainer
    trainer = trainer_class(model=model, args=SFTConfig(**args), train_dataset=to_dataset(train_rows, tok),
                            eval_dataset=to_dataset(eval_rows, tok) if eval_rows else None, processing_class=tok)
    return fp32_adapters_for_fp16(trainer, cfg["dtype"])


def _model_loss_trainer_class():
    from transformers import Trainer
    from trl import SFTTrainer

    class ModelLossSFTTrainer(SFTTrainer):
        """trl computes the loss through its own fused output head, which bypasses peft's trained
        token rows on a tied head; the model's own loss (same labels, same masking) does not."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)

    return ModelLossSFTTrainer


def prepare_inference(model, path: str):
    """Unsloth's faster generation mode when Unsloth trained the model; otherwise unchanged."""
    if path == "unsloth":
        from unsloth import FastLanguageModel

        FastLanguageModel.for_inference(model)
    return model


def export_merged(model, tok, folder, path: str, cfg: dict[str, Any]) -> Path:
    """A merged 16-bit (fp32 on the CPU) model that ``load_causal_lm`` and the serving
    notebook's GGUF export read. Unsloth merges with its own ``save_pretrained_merged``."""
    import json

    folder = Path(folder)
    if path == "unsloth":
        model.save_pretrained_merged(str(folder), tok, save_method="merged_16bit")
    else:
        merged = model.merge_and_unload()
        merged.save_pretrained(folder)
        tok.save_pretrained(folder)
    (folder / "medkit_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return folder


def reload_choice(cfg: dict[str, Any], resident_bytes: float = 0.0) -> str:
    """How 05 reloads its merged model: ``"full"`` on the CPU (the profile's dtype); on a GPU
    ``"16-bit"`` where the merged model fits the profile's budget beside ``resident_bytes``, else
    ``"4-bit"`` (the merged 8B is 15 GiB in 16-bit: more than a T4 holds)."""
    if cfg["device"] != "cuda":
        return "full"
    from .. import memplan

    return memplan.reload_precision(cfg["profile"], cfg["base_model"], resident_bytes)


def reload_merged(folder, cfg: dict[str, Any]):
    """``(model, tokenizer, precision)``: the exported merged model, loaded back as the later
    notebooks load it, in 4-bit where 16-bit would not fit. Free the training model first
    (``del model, trainer; common.free_memory()``): it is still on the GPU otherwise."""
    from .common import load_causal_lm

    resident = 0
    if cfg["device"] == "cuda":
        import torch

        resident = torch.cuda.memory_allocated()
    how = reload_choice(cfg, resident)
    model, tok = load_causal_lm(str(folder), cfg["dtype"], cfg["device"], load_in_4bit=how == "4-bit")
    return model, tok, how
