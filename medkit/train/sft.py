"""LoRA SFT with trl's ``SFTTrainer``: chat-formatted prompt/completion data in the model's own
chat template, loss on the assistant completion only, length grouping with the padding waste
measured, checkpoints and resume, and the adapter plus a merged model saved with a model card.

The same functions train the tiny Qwen2 on a CPU and Qwen2.5-0.5B-Instruct on a GPU; only the
profile's settings differ.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from .common import SYSTEM_PROMPT, messages, precision_flags


def to_prompt_completion(rows: list[dict[str, Any]], system: str = SYSTEM_PROMPT):
    """QA rows → a conversational prompt/completion ``datasets.Dataset`` (trl computes the loss
    on the completion only). A row with its own ``prompt`` (chat messages, e.g. the grounded rows
    of ``medkit.train.grounded``) keeps it; the others get the system prompt and their question."""
    from datasets import Dataset

    return Dataset.from_list([{"prompt": r["prompt"] if r.get("prompt") else messages(r["question"], system),
                               "completion": [{"role": "assistant", "content": r["answer"]}]} for r in rows])


def padding_waste(lengths: list[int], batch_size: int, grouped: bool, seed: int = 0,
                  mega_batch_mult: int = 50) -> float:
    """Share of padded positions when ``lengths`` are batched at random (``grouped=False``) or
    grouped by length the way ``group_by_length`` does (shuffle, cut into mega-batches of
    ``mega_batch_mult * batch_size``, sort each by length)."""
    idx = list(range(len(lengths)))
    random.Random(seed).shuffle(idx)
    if grouped:
        size = mega_batch_mult * batch_size
        idx = [i for s in range(0, len(idx), size) for i in sorted(idx[s: s + size], key=lambda j: -lengths[j])]
    real = padded = 0
    for s in range(0, len(idx), batch_size):
        batch = [lengths[i] for i in idx[s: s + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 1 - real / padded if padded else 0.0


def lora_config(lora: dict[str, Any], task_type: str = "CAUSAL_LM", **extra: Any):
    """peft ``LoraConfig`` from a profile's ``lora`` block; ``extra`` goes to ``LoraConfig``
    (05 passes ``trainable_token_indices``). An optional ``layers`` key lists the decoder layers
    that get adapters (peft's ``layers_to_transform``); absent, every layer does."""
    from peft import LoraConfig

    if lora.get("layers") is not None:
        extra = {"layers_to_transform": list(lora["layers"])} | extra
    return LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                      target_modules=list(lora["target_modules"]), task_type=task_type, **extra)


def sft_config(cfg: dict[str, Any], out_dir: str | Path, eval_steps: int | None = None, **extra: Any):
    """trl ``SFTConfig`` from a resolved stage config (dtype and device already chosen)."""
    from trl import SFTConfig

    steps = cfg["max_steps"]
    eval_steps = eval_steps or cfg.get("eval_steps") or max(10, steps // 6)
    args = dict(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
                per_device_eval_batch_size=cfg["batch_size"], gradient_accumulation_steps=cfg.get("grad_accum", 1),
                learning_rate=cfg["lr"], lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                logging_steps=max(1, steps // 30), eval_strategy="steps", eval_steps=eval_steps,
                save_strategy="steps", save_steps=eval_steps, save_total_limit=2, max_length=cfg["seq_len"],
                completion_only_loss=True, train_sampling_strategy="group_by_length", report_to="none", seed=cfg.get("seed", 0),
                gradient_checkpointing=cfg.get("gradient_checkpointing", False),
                use_cpu=cfg["device"] == "cpu", dataloader_num_workers=0, **precision_flags(cfg["dtype"]))
    args.update(extra)
    return SFTConfig(**args)


def make_trainer(model, tok, train_rows, eval_rows, cfg: dict[str, Any], out_dir: str | Path, **extra: Any):
    """An ``SFTTrainer`` with LoRA on ``model`` (a plain transformers model)."""
    from trl import SFTTrainer

    from .common import score_labelled_positions_only

    score_labelled_positions_only()
    return SFTTrainer(model=model, args=sft_config(cfg, out_dir, **extra), train_dataset=to_prompt_completion(train_rows),
                      eval_dataset=to_prompt_completion(eval_rows), processing_class=tok,
                      peft_config=lora_config(cfg["lora"]))


def learning_curves(trainer) -> dict[str, list[tuple[int, float]]]:
    hist = trainer.state.log_history
    return {"train": [(h["step"], h["loss"]) for h in hist if "loss" in h],
            "eval": [(h["step"], h["eval_loss"]) for h in hist if "eval_loss" in h]}


def plot_curves(curves: dict[str, list[tuple[int, float]]], title: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker="o" if name == "eval" else None, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title(title)
    ax.legend()
    return fig


def save_adapter_and_merged(trainer, tok, folder: str | Path, resolved_cfg: dict[str, Any]) -> dict[str, Path]:
    """Save the LoRA adapter (PEFT format) and the merged model, each with ``config.json`` of
    the resolved settings beside it (as ``medkit_config.json``, so it does not clash with the
    model's own config.json)."""
    folder = Path(folder)
    adapter, merged = folder / "adapter", folder / "merged"
    trainer.model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    model = trainer.model.merge_and_unload()
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    for d in (adapter, merged):
        (d / "medkit_config.json").write_text(json.dumps(resolved_cfg, indent=2, default=str) + "\n")
    return {"adapter": adapter, "merged": merged, "model": model}
