"""DPO with trl's ``DPOTrainer`` on the SFT model, with LoRA: preference data validated with
counted skips, β and the loss type from the profile, and held-out preference accuracy per
rejected kind before and after."""
from __future__ import annotations

from typing import Any

from .common import SYSTEM_PROMPT, messages, precision_flags
from .sft import lora_config


def prompt_messages(prompt: str | list[dict[str, str]], system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """A pair's prompt as chat messages: a question gets the course's system prompt; a prompt that
    is already messages (06's evidence prompt, ``grounded.cited_pairs``) is used as it is."""
    return list(prompt) if isinstance(prompt, list) else messages(prompt, system)


def _prompt_text(prompt: str | list[dict[str, str]]) -> str:
    return "\n".join(m["content"] for m in prompt) if isinstance(prompt, list) else str(prompt or "")


def validate_pairs(rows: list[dict[str, Any]], tok, max_prompt_tokens: int) -> tuple[list[dict], list[dict]]:
    """(kept, skipped): a pair is skipped, with its reason, when chosen equals rejected, a side is
    empty, or the prompt (all its messages, for a messages prompt) is longer than
    ``max_prompt_tokens``."""
    kept, skipped = [], []
    for r in rows:
        prompt = _prompt_text(r.get("prompt")).strip()
        chosen, rejected = (str(r.get(k) or "").strip() for k in ("chosen", "rejected"))
        if not prompt or not chosen or not rejected:
            side = next(k for k, v in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected)) if not v)
            skipped.append({"id": r.get("id"), "reason": f"empty {side}"})
        elif chosen == rejected:
            skipped.append({"id": r.get("id"), "reason": "chosen identical to rejected"})
        elif len(tok(prompt, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            skipped.append({"id": r.get("id"), "reason": f"prompt over {max_prompt_tokens} tokens"})
        else:
            kept.append(r)
    return kept, skipped


def to_dataset(rows: list[dict[str, Any]], system: str = SYSTEM_PROMPT):
    from datasets import Dataset

    return Dataset.from_list([{"prompt": prompt_messages(r["prompt"], system),
                               "chosen": [{"role": "assistant", "content": r["chosen"]}],
                               "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])


def make_trainer(model, tok, train_rows, eval_rows, cfg: dict[str, Any], out_dir, **extra: Any):
    """A ``DPOTrainer`` with a LoRA adapter on ``model``; the frozen model (adapter disabled)
    is the reference, so no second copy is held in memory. It evaluates ``eval_rows`` every
    ``eval_steps`` (default: half the steps); ``eval_steps: 0`` (or no rows) trains without
    evaluating, for a profile where 03's own report after training scores the same pairs."""
    from trl import DPOConfig, DPOTrainer

    from .common import score_labelled_positions_only

    score_labelled_positions_only()

    steps = cfg["max_steps"]
    evaluate = bool(eval_rows) and cfg.get("eval_steps") != 0
    args = dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
                per_device_eval_batch_size=cfg["batch_size"], gradient_accumulation_steps=cfg.get("grad_accum", 1),
                learning_rate=cfg["lr"], lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                logging_steps=max(1, steps // 30), eval_strategy="steps" if evaluate else "no",
                eval_steps=(cfg.get("eval_steps") or max(10, steps // 2)) if evaluate else None,
                save_strategy="no", beta=cfg["beta"], loss_type=[cfg["loss_type"]], max_length=cfg["seq_len"],
                report_to="none", seed=cfg.get("seed", 0), use_cpu=cfg["device"] == "cpu",
                gradient_checkpointing=cfg.get("gradient_checkpointing", False),
                dataloader_num_workers=0, **precision_flags(cfg["dtype"]))
    args.update(extra)
    return DPOTrainer(model=model, args=DPOConfig(**args), train_dataset=to_dataset(train_rows),
                      eval_dataset=to_dataset(eval_rows) if evaluate else None, processing_class=tok,
                      peft_config=lora_config(cfg["lora"]))


def completion_logps(model, tok, prompts: list, completions: list[str], batch_size: int = 16) -> list[float]:
    """Sum of log-probabilities of each completion given its chat prompt (what DPO compares).
    Pairs that share a prompt share its forward pass (``common.shared_prefix_logprobs``)."""
    from .common import shared_prefix_logprobs

    sums, _, _ = shared_prefix_logprobs(model, tok, [prompt_messages(p) for p in prompts], completions, batch_size)
    return sums


def _pair_logps(model, tok, rows: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(chosen, rejected) log-likelihoods; a pair's two answers share one pass over its prompt."""
    prompts = [r["prompt"] for r in rows]
    both = completion_logps(model, tok, prompts + prompts, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
    return both[: len(rows)], both[len(rows):]


def _summarise(rows: list[dict[str, Any]], margins: list[float]) -> dict[str, Any]:
    """Share of margins > 0, overall and per rejected kind, with the mean margin."""
    by_kind: dict[str, list[bool]] = {}
    for r, m in zip(rows, margins):
        by_kind.setdefault(r["rejected_kind"], []).append(m > 0)
    return {"overall": sum(m > 0 for m in margins) / len(margins) if margins else None,  # None: no pairs
            "by_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())},
            "mean_margin": sum(margins) / max(len(margins), 1), "n": len(rows)}


def _reward_margins(policy: tuple[list[float], list[float]], ref: tuple[list[float], list[float]],
                    beta: float) -> list[float]:
    (pc, pr), (rc, rr) = policy, ref
    return [beta * ((a - b) - (c - d)) for a, b, c, d in zip(pc, rc, pr, rr)]


def preference_accuracy(model, tok, rows: list[dict[str, Any]], ref_model=None, beta: float = 0.1) -> dict[str, Any]:
    """Share of pairs the model prefers the chosen answer, overall and per rejected kind.

    With ``ref_model`` the comparison is DPO's implicit reward margin,
    β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))] > 0; without it, the model's own
    sequence log-likelihood (log π(c) > log π(r))."""
    chosen, rejected = _pair_logps(model, tok, rows)
    if ref_model is not None:
        margins = _reward_margins((chosen, rejected), _pair_logps(ref_model, tok, rows), beta)
    else:
        margins = [a - d for a, d in zip(chosen, rejected)]
    return _summarise(rows, margins)


def implicit_reward_accuracy(peft_model, tok, rows: list[dict[str, Any]], beta: float) -> dict[str, Any]:
    """DPO's own measure on held-out pairs: the share whose implicit reward margin
    β·[(log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r))] is > 0, where π_ref is the same
    model with its LoRA adapter switched off (the SFT model DPO started from)."""
    return preference_report(peft_model, tok, rows, beta)["reward"]


def preference_report(peft_model, tok, rows: list[dict[str, Any]], beta: float,
                      reference: tuple[list[float], list[float]] | None = None) -> dict[str, Any]:
    """``{"likelihood": ..., "reward": ..., "reference": ...}``: ``preference_accuracy`` of the
    model with its adapter and ``implicit_reward_accuracy``. Both share the policy's
    log-likelihoods (one scoring pass with the adapter); the reward also needs the reference's,
    the same model with its adapter switched off. That second pass is skipped when:

    - ``reference`` is given: the (chosen, rejected) log-likelihoods a report on the same rows
      returned earlier as its ``"reference"``. Training moves only the adapter, so 03 scores the
      reference once, before DPO, and reuses it after;
    - the adapter is still zero (LoRA's B matrices start at 0, so before training the policy *is*
      the reference, and every reward margin is 0 by construction)."""
    policy = _pair_logps(peft_model, tok, rows)
    if reference is None:
        if _adapter_is_zero(peft_model):
            reference = policy
        else:
            with peft_model.disable_adapter():
                reference = _pair_logps(peft_model, tok, rows)
    return {"likelihood": _summarise(rows, [a - d for a, d in zip(*policy)]),
            "reward": _summarise(rows, _reward_margins(policy, reference, beta)), "reference": reference}


def _adapter_is_zero(peft_model) -> bool:
    """True when every LoRA B matrix is exactly zero: the adapter adds nothing to any layer."""
    bs = [p for n, p in peft_model.named_parameters() if "lora_B" in n]
    return bool(bs) and all(not p.detach().any() for p in bs)


def balanced(rows: list[dict[str, Any]], per_kind: int) -> list[dict[str, Any]]:
    """Up to ``per_kind`` rows of each rejected kind, in their original order."""
    seen: dict[str, int] = {}
    out = []
    for r in rows:
        if seen.get(r["rejected_kind"], 0) < per_kind:
            seen[r["rejected_kind"]] = seen.get(r["rejected_kind"], 0) + 1
            out.append(r)
    return out


def reward_curves(trainer) -> dict[str, list[tuple[int, float]]]:
    hist = trainer.state.log_history
    keys = {"train margin": "rewards/margins", "train accuracy": "rewards/accuracies",
            "eval margin": "eval_rewards/margins", "eval accuracy": "eval_rewards/accuracies"}
    return {name: [(h["step"], float(h[k])) for h in hist if k in h] for name, k in keys.items()}
