"""Tiny models that learn: a byte-level BPE tokenizer trained on the course's own text, and
small models of each architecture the course uses, pre-trained briefly here on that text.

    tok = train_tokenizer(texts)                      # one BPE vocabulary for every family
    base = build_base("qwen2", texts, cfg["tiny"])    # cached under outputs/cache/tiny/
    base.path, base.metrics["ppl_before"], base.metrics["ppl_after"]

Families and what they stand in for on the GPU profiles:
``qwen2`` (Qwen2.5-0.5B-Instruct: SFT, DPO), ``phi`` (microsoft/phi-2: QLoRA), ``llama``
(DeepSeek-R1-Distill-Llama-8B: chain-of-thought), ``t5`` (flan-t5-small: encoder-decoder).
Each carries its real family's chat template. The numbers a tiny model reaches show the
mechanics only; they are not clinical quality.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from . import paths

FAMILIES = ("qwen2", "phi", "llama", "t5")
BUILD_VERSION = "2"  # bump when the builder changes in a way that should invalidate caches

# Special tokens of every family, in one shared vocabulary.
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>", "</s>", "<unk>",
                  "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"]
# Added (not special) so they survive decoding: R1's reasoning delimiters.
THINK_TOKENS = ["<think>", "</think>"]

# ChatML, as Qwen2.5 uses it. {% generation %} marks what trl's assistant_only_loss trains on.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- message['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Phi-2's documented QA format: "Instruct: <question>\nOutput: <answer>". The generation prompt
# ends at "Output:" and the answer carries the space: a byte-level BPE merges " " into the next
# word, so a prompt ending in a space would not be a token prefix of prompt + answer.
PHI_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' %}{{- 'Instruct: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{- 'Output:' }}"
    "{% generation %}{{- ' ' + message['content'] + eos_token }}{% endgeneration %}{{- '\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- 'Output:' }}{%- endif %}"
)
# DeepSeek-R1-Distill's layout: BOS, system text, <｜User｜>…<｜Assistant｜>…<｜end▁of▁sentence｜>;
# the generation prompt opens the reasoning block with "<think>\n", as the R1 release does.
R1_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{{- message['content'] }}"
    "{%- elif message['role'] == 'user' %}{{- '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}{{- '<｜Assistant｜>' }}"
    "{% generation %}{{- message['content'] + '<｜end▁of▁sentence｜>' }}{% endgeneration %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<｜Assistant｜><think>\\n' }}{%- endif %}"
)

# The token that separates documents in pre-training. Qwen ends documents with <|endoftext|> and
# reserves <|im_end|> for chat turns, so a base model has never produced <|im_end|> until SFT
# teaches it the template (which is what the template-compliance metric measures).
DOC_SEPARATOR = {"qwen2": "<|endoftext|>", "phi": "<|endoftext|>", "llama": "<｜end▁of▁sentence｜>", "t5": "</s>"}

_FAMILY_TOKENS = {
    # family: (bos, eos, pad, unk, chat template)
    "qwen2": (None, "<|im_end|>", "<|endoftext|>", None, CHATML_TEMPLATE),
    "phi": (None, "<|endoftext|>", "<pad>", None, PHI_TEMPLATE),
    "llama": ("<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<pad>", None, R1_TEMPLATE),
    "t5": (None, "</s>", "<pad>", "<unk>", None),
}


def _hash(*parts: Any) -> str:
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, (list, tuple)):
            for item in part:
                h.update(str(item).encode())
                h.update(b"\x00")
        else:
            h.update(json.dumps(part, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """Train a byte-level BPE on ``texts``; returns a ``tokenizers.Tokenizer`` holding every
    family's special tokens (deterministic for the same texts)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tok.train_from_iterator(list(texts), trainer=trainer)
    tok.add_tokens(THINK_TOKENS)
    return tok


def family_tokenizer(raw_tokenizer, family: str):
    """Wrap the shared BPE as a transformers tokenizer with ``family``'s special tokens and
    chat template."""
    from transformers import PreTrainedTokenizerFast

    bos, eos, pad, unk, template = _FAMILY_TOKENS[family]
    tok = PreTrainedTokenizerFast(tokenizer_object=raw_tokenizer, bos_token=bos, eos_token=eos,
                                  pad_token=pad, unk_token=unk, model_max_length=2048)
    if template:
        tok.chat_template = template
    tok.padding_side = "right"
    return tok


def model_config(family: str, tok, tiny: dict[str, Any]):
    """A small config of ``family`` sized by the profile's ``tiny`` block."""
    from transformers import LlamaConfig, PhiConfig, Qwen2Config, T5Config

    h, layers, heads = tiny["hidden_size"], tiny["layers"], tiny["heads"]
    common = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                  bos_token_id=tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id)
    if family == "qwen2":
        return Qwen2Config(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=2048, tie_word_embeddings=True, **common)
    if family == "phi":
        return PhiConfig(hidden_size=h, intermediate_size=4 * h, num_hidden_layers=layers,
                         num_attention_heads=heads, partial_rotary_factor=0.5,
                         max_position_embeddings=2048, resid_pdrop=0.0, embd_pdrop=0.0,
                         attention_dropout=0.0, tie_word_embeddings=False, **common)
    if family == "llama":
        return LlamaConfig(hidden_size=h, intermediate_size=3 * h, num_hidden_layers=layers,
                           num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                           max_position_embeddings=2048, tie_word_embeddings=True, **common)
    if family == "t5":
        return T5Config(d_model=h, d_kv=h // heads, d_ff=4 * h, num_layers=layers,
                        num_decoder_layers=layers, num_heads=heads, dropout_rate=0.0,
                        decoder_start_token_id=tok.pad_token_id, feed_forward_proj="relu",
                        tie_word_embeddings=True, **common)
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


def new_model(family: str, tok, tiny: dict[str, Any], seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    cfg = model_config(family, tok, tiny)
    auto = AutoModelForSeq2SeqLM if family == "t5" else AutoModelForCausalLM
    return auto.from_config(cfg)


def family_settings(tiny: dict[str, Any], family: str) -> dict[str, Any]:
    """The ``tiny`` block for one family: the shared settings with that family's own changes
    (``tiny["families"][family]``, e.g. a longer pre-training) laid over them."""
    shared = {k: v for k, v in tiny.items() if k != "families"}
    own = (tiny.get("families") or {}).get(family, {})
    unknown = set(own) - set(shared)
    if unknown:
        raise ValueError(f"tiny.families.{family}: unknown setting(s) {sorted(unknown)}; "
                         f"choose from {sorted(shared)}")
    return {**shared, **own}


def split_texts(texts: list[str], eval_share: float = 0.05) -> tuple[list[str], list[str]]:
    """Deterministic split by a hash of each text: the same text always lands on the same side."""
    train, held = [], []
    for t in texts:
        bucket = int(hashlib.md5(t.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
        (held if bucket < eval_share else train).append(t)
    return train, held


def _causal_blocks(tok, texts: list[str], seq_len: int, sep_id: int):
    import torch

    ids: list[int] = []
    for t in texts:
        ids.extend(tok(t, add_special_tokens=False)["input_ids"] + [sep_id])
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"corpus too small: {len(ids)} tokens < one block of {seq_len}")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _seq2seq_pairs(tok, texts: list[str], seq_len: int):
    """Prefix → continuation pairs for the encoder-decoder (a text's first part in, the rest out)."""
    import torch

    inputs, labels = [], []
    half = seq_len // 2
    for t in texts:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        if len(ids) < 8:
            continue
        cut = max(4, min(len(ids) // 2, half))
        src = ids[:cut][:half] + [tok.eos_token_id]
        tgt = ids[cut: cut + half - 1] + [tok.eos_token_id]
        inputs.append(src + [tok.pad_token_id] * (half + 1 - len(src)))
        labels.append(tgt + [-100] * (half - len(tgt)))
    if not inputs:
        raise ValueError("corpus too small for encoder-decoder pairs")
    return torch.tensor(inputs), torch.tensor(labels)


def _batches(family: str, tok, texts: list[str], seq_len: int):
    if family == "t5":
        return _seq2seq_pairs(tok, texts, seq_len)
    blocks = _causal_blocks(tok, texts, seq_len, tok.convert_tokens_to_ids(DOC_SEPARATOR[family]))
    return blocks, blocks


def _loss(model, family: str, tok, x, y):
    if family == "t5":
        return model(input_ids=x, attention_mask=(x != tok.pad_token_id).long(), labels=y).loss
    return model(input_ids=x, labels=y).loss


def perplexity(model, family: str, tok, data, batch_size: int = 32) -> float:
    """exp(mean token loss) over held-out blocks/pairs (``data`` as returned by ``_batches``)."""
    import torch

    x_all, y_all = data
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(x_all), batch_size):
            x, y = x_all[i: i + batch_size], y_all[i: i + batch_size]
            n = int((y[:, 1:] != -100).sum()) if family != "t5" else int((y != -100).sum())
            total += _loss(model, family, tok, x, y).item() * n
            count += n
    return math.exp(total / max(count, 1))


@dataclass
class TinyBase:
    family: str
    path: Path
    metrics: dict[str, Any]

    def load(self):
        """(model, tokenizer) from the cache folder."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        auto = AutoModelForSeq2SeqLM if self.family == "t5" else AutoModelForCausalLM
        return auto.from_pretrained(self.path), AutoTokenizer.from_pretrained(self.path)


def pretrain(model, family: str, tok, train_texts: list[str], eval_texts: list[str],
             tiny: dict[str, Any], seed: int = 0, progress: bool = True) -> dict[str, Any]:
    """Briefly pre-train ``model`` on ``train_texts`` (AdamW, cosine decay) and return the
    held-out perplexity before and after, the loss curve and the time taken."""
    import torch
    from tqdm.auto import tqdm

    seq_len, steps, bs = tiny["pretrain_seq_len"], tiny["pretrain_steps"], tiny["pretrain_batch"]
    x_train, y_train = _batches(family, tok, train_texts, seq_len)
    held = _batches(family, tok, eval_texts, seq_len)
    ppl_before = perplexity(model, family, tok, held)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=tiny["lr"], weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    curve = []
    t0 = time.perf_counter()
    model.train()
    for step in tqdm(range(steps), desc=f"pretrain {family}", disable=not progress, mininterval=2):
        idx = torch.randint(0, len(x_train), (bs,), generator=g)
        loss = _loss(model, family, tok, x_train[idx], y_train[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
    seconds = time.perf_counter() - t0
    ppl_after = perplexity(model, family, tok, held)
    n_tokens = int((y_train != -100).sum()) if family == "t5" else int(x_train.numel())
    return {"ppl_before": round(ppl_before, 3), "ppl_after": round(ppl_after, 3),
            "train_seconds": round(seconds, 2), "steps": steps, "loss_curve": curve,
            "train_tokens_in_corpus": n_tokens, "eval_items": len(held[0]),
            "params": sum(p.numel() for p in model.parameters())}


def build_base(family: str, texts: list[str], tiny: dict[str, Any], seed: int = 0,
               cache: Path | None = None, force: bool = False, progress: bool = True) -> TinyBase:
    """Build (or load from cache) the tiny pre-trained base of ``family`` on ``texts``.

    The cache key is a hash of the texts, the ``tiny`` settings, the seed and the builder
    version, so changing any of them builds anew and nothing stale is reused.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("build_base needs a non-empty corpus of texts")
    tiny = family_settings(tiny, family)
    key = _hash(sorted(texts), tiny, seed, family, BUILD_VERSION)
    root = (cache or paths.cache_dir()) / "tiny"
    folder = root / f"{family}-{key}"
    meta = folder / "build.json"
    if meta.exists() and not force:
        return TinyBase(family, folder, json.loads(meta.read_text()))

    t0 = time.perf_counter()
    raw = train_tokenizer(texts, tiny["vocab_size"])
    tok = family_tokenizer(raw, family)
    train_texts, eval_texts = split_texts(texts)
    if not eval_texts:  # a very small corpus: hold out the last text
        train_texts, eval_texts = texts[:-1], texts[-1:]
    model = new_model(family, tok, tiny, seed)
    metrics = pretrain(model, family, tok, train_texts, eval_texts, tiny, seed, progress)
    metrics.update(family=family, key=key, seed=seed, corpus_texts=len(texts),
                   build_seconds=round(time.perf_counter() - t0, 2), tiny=tiny)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "build.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (tmp / "config_medkit.json").write_text(json.dumps({"family": family, "tiny": tiny, "seed": seed}, indent=2))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)  # appear whole or not at all
    return TinyBase(family, folder, metrics)


def families_in(cfg: dict[str, Any]) -> list[str]:
    """The tiny families a resolved profile's stages name (``tiny:<family>``), in ``FAMILIES``
    order: all four on ``tiny``, only the T5 on ``smol`` (02's encoder-decoder comparison), none
    on the GPU profiles. 01_data pre-trains exactly these."""
    from .config import refs_in

    named = set(refs_in(cfg, "tiny"))
    unknown = named - set(FAMILIES)
    if unknown:
        raise ValueError(f"profile names unknown tiny families {sorted(unknown)}; choose from {list(FAMILIES)}")
    return [f for f in FAMILIES if f in named]


def build_all(texts: list[str], tiny: dict[str, Any], seed: int = 0, families=FAMILIES,
              progress: bool = True, extra_texts: dict[str, list[str]] | None = None) -> dict[str, TinyBase]:
    """Every tiny base the course uses, keyed by family. ``extra_texts[family]`` is added to
    that family's corpus only (01_data gives the Llama the training reasoning cases)."""
    extra_texts = extra_texts or {}
    unknown = set(extra_texts) - set(families)
    if unknown:
        raise ValueError(f"extra_texts for unknown families {sorted(unknown)}; choose from {list(families)}")
    return {f: build_base(f, texts + list(extra_texts.get(f, [])), tiny, seed, progress=progress) for f in families}
