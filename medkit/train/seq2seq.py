"""The encoder-decoder side of the comparison: a full fine-tune of T5 (the tiny T5 on CPU,
flan-t5-small on GPU) with ``Seq2SeqTrainer`` and predict-with-generate."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..metrics import perplexity
from .common import precision_flags


def tokenize(rows: list[dict[str, Any]], tok, max_len: int):
    from datasets import Dataset

    def enc(r):
        x = tok(r["question"], truncation=True, max_length=max_len)
        x["labels"] = tok(text_target=r["answer"], truncation=True, max_length=max_len)["input_ids"]
        return x

    return Dataset.from_list([{"question": r["question"], "answer": r["answer"]} for r in rows]).map(
        enc, remove_columns=["question", "answer"])


def make_trainer(model, tok, train_rows, eval_rows, cfg: dict[str, Any], out_dir: str | Path):
    from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments

    steps = cfg["max_steps"]
    args = Seq2SeqTrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=cfg["batch_size"],
        per_device_eval_batch_size=cfg["batch_size"], learning_rate=cfg["lr"], lr_scheduler_type="cosine",
        warmup_steps=max(1, steps // 20), logging_steps=max(1, steps // 30), eval_strategy="steps",
        eval_steps=max(10, steps // 6), save_strategy="no", predict_with_generate=True,
        generation_max_length=64, report_to="none", seed=cfg.get("seed", 0), use_cpu=cfg["device"] == "cpu",
        dataloader_num_workers=0, train_sampling_strategy="group_by_length", **precision_flags(cfg["dtype"]))
    return Seq2SeqTrainer(model=model, args=args, train_dataset=tokenize(train_rows, tok, cfg["seq_len"]),
                          eval_dataset=tokenize(eval_rows, tok, cfg["seq_len"]), processing_class=tok,
                          data_collator=DataCollatorForSeq2Seq(tok, model=model))


def scores(model, tok, rows: list[dict[str, Any]], batch_size: int = 32, max_len: int = 256) -> dict[str, float]:
    """Teacher-forced loss, perplexity and token accuracy on the answers."""
    import torch

    model.eval()
    total, n_tok, correct = 0.0, 0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i: i + batch_size]
        enc = tok([r["question"] for r in chunk], return_tensors="pt", padding=True, truncation=True, max_length=max_len)
        lab = tok(text_target=[r["answer"] for r in chunk], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_len)["input_ids"]
        lab[lab == tok.pad_token_id] = -100
        with torch.no_grad():
            out = model(**enc.to(model.device), labels=lab.to(model.device))
        mask = lab != -100
        k = int(mask.sum())
        total += float(out.loss) * k
        n_tok += k
        correct += int(((out.logits.argmax(-1).cpu() == lab) & mask).sum())
    loss = total / max(n_tok, 1)
    return {"loss": loss, "perplexity": perplexity(loss), "token_accuracy": correct / max(n_tok, 1)}


def generate(model, tok, questions: list[str], max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    import torch

    model.eval()
    out = []
    for i in range(0, len(questions), batch_size):
        enc = tok(questions[i: i + batch_size], return_tensors="pt", padding=True, truncation=True).to(model.device)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False)
        out += [t.strip() for t in tok.batch_decode(gen, skip_special_tokens=True)]
    return out
