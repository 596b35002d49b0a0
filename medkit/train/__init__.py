"""Training stages, thin over transformers / trl / peft: ``sft`` (LoRA SFT, completion-only
loss), ``seq2seq`` (the T5 encoder-decoder comparison) and ``dpo``."""
