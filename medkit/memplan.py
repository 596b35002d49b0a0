"""GPU memory plan: what each stage of a GPU profile holds on the GPU at its peak, from the real
models' published configurations, checked against the profile's budget. Runs on a CPU with no
download: the architectures below are written from each model's ``config.json`` on the Hugging
Face hub, and the models are built on PyTorch's ``meta`` device (shapes, no storage) to count
their parameters by kind.

Per step of a notebook the plan adds up, in GiB:

- **weights**: parameters × bytes (16-bit: 2; fp32: 4; NF4 4-bit with double quantisation:
  0.5 + 1/64 + 4/16384 bytes, the block constants included). bitsandbytes quantises the linear
  layers of the decoder only: embeddings and the output head keep the load dtype;
- **LoRA and optimizer**: adapter parameters (fp32) + their gradients (fp32) + AdamW's two
  moments (fp32, or one byte each for 8-bit AdamW);
- **activations** for the profile's batch × sequence length (the worst case: a batch padded to
  ``seq_len``): per layer and token, the tensors autograd keeps (norm inputs and outputs, q/k/v,
  attention output, the MLP's up/gate/activation products: ``6h + 2·kv + 4·i`` elements); eager
  attention adds its ``heads × seq²`` score and probability maps. With gradient checkpointing only
  each layer's input is kept, plus one layer's activations while it is recomputed;
- **logits** of the loss: the output head's ``batch × seq × vocab`` in the compute dtype, the fp32
  copy transformers makes for the cross-entropy, and its fp32 gradient;
- **KV cache** for generation: ``2 × layers × kv_heads × head_dim`` per token, 16-bit;
- one CUDA context per process (``CUDA_CONTEXT_GIB``).

These are estimates of the largest terms, not measurements; ``python -m medkit.rehearse`` measures
the real peak on a GPU. A step that does not fit fails ``tests/test_memplan.py`` with its numbers.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

GIB = 2 ** 30
CUDA_CONTEXT_GIB = 0.5  # the CUDA context, cuBLAS workspace and allocator slack of one process
NF4_BYTES = 0.5 + 1 / 64 + 4 / 16384  # 4-bit codes + 8-bit block absmax (blocks of 64) + fp32 per 256 blocks
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Published configurations (config.json of each hub repository), and the parameter count stated
# on the model card, which the meta-device build is checked against (tests/test_memplan.py).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "Qwen/Qwen2.5-0.5B-Instruct": {
        "kind": "causal", "model_type": "qwen2", "card_params": 494_032_768,  # "0.49B"
        "config": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6)},
    "microsoft/phi-2": {
        "kind": "causal", "model_type": "phi", "card_params": 2_779_683_840,  # "2.7B"
        "config": dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=51200, tie_word_embeddings=False,
                       partial_rotary_factor=0.4, max_position_embeddings=2048, layer_norm_eps=1e-5)},
    "deepseek-ai/DeepSeek-R1-Distill-Llama-8B": {
        "kind": "causal", "model_type": "llama", "card_params": 8_030_261_248,  # "8.03B" (Llama-3.1-8B)
        "config": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
                       max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)},
    "google/flan-t5-small": {
        # the card's 77.0M has an untied output head (T5 v1.1); transformers 5 builds T5 with the
        # head tied, so its 16.4M parameters are added back (``untied_head``)
        "kind": "seq2seq", "model_type": "t5", "card_params": 76_961_152, "untied_head": True,
        "config": dict(d_model=512, d_ff=1024, d_kv=64, num_heads=6, num_layers=8, num_decoder_layers=8,
                       vocab_size=32128, feed_forward_proj="gated-gelu")},
    "BAAI/bge-small-en-v1.5": {
        "kind": "encoder", "model_type": "bert", "card_params": 33_360_000,  # "33.4M"
        "config": dict(hidden_size=384, num_hidden_layers=12, num_attention_heads=12, intermediate_size=1536,
                       vocab_size=30522, max_position_embeddings=512, type_vocab_size=2)},
    "BAAI/bge-reranker-base": {
        "kind": "cross-encoder", "model_type": "xlm-roberta", "card_params": 278_043_649,  # "278M"
        "config": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                       vocab_size=250002, max_position_embeddings=514, type_vocab_size=1, num_labels=1)},
    "BAAI/bge-m3": {
        "kind": "encoder", "model_type": "xlm-roberta", "card_params": 567_754_752,  # "568M"
        "config": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=250002, max_position_embeddings=8194, type_vocab_size=1)},
    "BAAI/bge-reranker-v2-m3": {
        "kind": "cross-encoder", "model_type": "xlm-roberta", "card_params": 567_755_777,  # "568M"
        "config": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=250002, max_position_embeddings=8194, type_vocab_size=1, num_labels=1)},
    "microsoft/deberta-xlarge-mnli": {
        "kind": "encoder", "model_type": "deberta", "card_params": 750_000_000,  # "750M"
        "config": dict(hidden_size=1024, num_hidden_layers=48, num_attention_heads=16, intermediate_size=4096,
                       vocab_size=50265, max_position_embeddings=512, relative_attention=True,
                       pos_att_type=["c2p", "p2c"], max_relative_positions=-1, position_biased_input=False,
                       type_vocab_size=0)},
}
# the same architecture under another repository name (pre-quantised uploads)
ALIASES = {"unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B",
           "unsloth/DeepSeek-R1-Distill-Llama-8B": "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"}


def canonical(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in ARCHITECTURES:
        raise KeyError(f"{name}: no published configuration in medkit.memplan.ARCHITECTURES")
    return name


def hf_config(name: str):
    """A transformers config of the real architecture (nothing downloaded)."""
    from transformers import AutoConfig

    arch = ARCHITECTURES[canonical(name)]
    return AutoConfig.for_model(arch["model_type"], **arch["config"])


def build(name: str, device: str = "meta", dtype=None):
    """The model of the real architecture, built on ``device`` with random (``meta``: no)
    weights, in ``dtype`` (a torch dtype; None: fp32). ``meta`` costs no memory; the rehearsal
    builds on ``cuda``."""
    import torch
    from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                              AutoModelForSequenceClassification)

    arch = ARCHITECTURES[canonical(name)]
    cls = {"causal": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM, "encoder": AutoModel,
           "cross-encoder": AutoModelForSequenceClassification}[arch["kind"]]
    with torch.device(device):
        return cls.from_config(hf_config(name), **({"dtype": dtype} if dtype is not None else {}))


@dataclass(frozen=True)
class Shapes:
    """What the plan needs from one architecture, counted on the meta-device model."""

    name: str
    params: int  # every parameter
    embed: int  # input embeddings (and position/type embeddings)
    head: int  # the output head when it is not tied to the embeddings
    linear: int  # linear layers inside the blocks: what bitsandbytes quantises
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_dim: int  # kv_heads × head_dim
    vocab: int
    linear_shapes: tuple[tuple[str, int, int], ...] = field(repr=False, default=())  # (name, in, out)

    def lora_params(self, target_modules: list[str], r: int) -> int:
        """Parameters of a LoRA adapter of rank ``r`` on the linear layers whose last name is in
        ``target_modules`` (A: in × r, B: r × out)."""
        return sum(r * (i + o) for n, i, o in self.linear_shapes
                   if any(n.rsplit(".", 1)[-1] == t or fnmatch.fnmatch(n, t) for t in target_modules))


@lru_cache(maxsize=None)
def shapes(name: str) -> Shapes:
    import torch

    name = canonical(name)
    arch = ARCHITECTURES[name]
    model = build(name)
    cfg = model.config
    seen, embed, head, linear, lin_shapes = set(), 0, 0, 0, []
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for mod_name, mod in model.named_modules():
        for p in mod.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if isinstance(mod, torch.nn.Embedding):
                embed += p.numel()
            elif out_emb is not None and mod is out_emb:
                head += p.numel()
            elif isinstance(mod, torch.nn.Linear) and p is mod.weight:
                linear += p.numel()
        if isinstance(mod, torch.nn.Linear) and mod is not out_emb:
            lin_shapes.append((mod_name, mod.in_features, mod.out_features))
    params = sum(p.numel() for p in model.parameters())
    if arch.get("untied_head"):
        head = cfg.vocab_size * cfg.d_model
        params += head
    hidden = getattr(cfg, "hidden_size", None) or cfg.d_model
    heads = getattr(cfg, "num_attention_heads", None) or cfg.num_heads
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "d_kv", None) or hidden // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    layers = getattr(cfg, "num_hidden_layers", None) or (cfg.num_layers + cfg.num_decoder_layers)
    inter = getattr(cfg, "intermediate_size", None) or cfg.d_ff
    return Shapes(name, params, embed, head, linear, layers, hidden, inter, heads, kv_heads * head_dim,
                  cfg.vocab_size, tuple(lin_shapes))


# ---------------------------------------------------------------- the terms

def weights_bytes(s: Shapes, dtype: str, quant4: bool = False, rest_dtype: str | None = None) -> float:
    """The weights: 16/32-bit, or NF4 for the blocks' linear layers with the rest (embeddings,
    head, norms, biases) in ``rest_dtype`` (the load dtype)."""
    if not quant4:
        return s.params * DTYPE_BYTES[dtype]
    return s.linear * NF4_BYTES + (s.params - s.linear) * DTYPE_BYTES[rest_dtype or dtype]


def lora_bytes(n: int, optim: str = "adamw_torch") -> float:
    """fp32 adapter weights and gradients + AdamW's two moments (fp32, or 1 byte each in 8-bit)."""
    return n * (4 + 4 + (2 if optim == "adamw_8bit" else 8))


def full_finetune_bytes(n: int) -> float:
    """Full fine-tuning under mixed precision: fp32 weights, fp32 gradients, AdamW's two moments."""
    return n * 16


def activation_bytes(s: Shapes, batch: int, seq: int, act: int, checkpointing: bool,
                     eager_attention: bool = False, attention_maps: int = 1) -> float:
    """Autograd's saved tensors for one training step (see the module docstring)."""
    tokens = batch * seq
    per_layer = tokens * (6 * s.hidden + 2 * s.kv_dim + 4 * s.intermediate) * act
    if eager_attention:  # scores and probabilities (fp32 softmax input) per head
        per_layer += batch * s.heads * seq * seq * (act + 4) * attention_maps
    if checkpointing:
        return s.layers * tokens * s.hidden * act + per_layer
    return s.layers * per_layer


def logits_bytes(s: Shapes, batch: int, seq: int, act: int) -> float:
    """The head's logits in the compute dtype, their fp32 copy for the loss, its fp32 gradient."""
    return batch * seq * s.vocab * (act + 4 + 4)


def kv_cache_bytes(s: Shapes, sequences: int, tokens: int, act: int = 2) -> float:
    return 2 * s.layers * s.kv_dim * sequences * tokens * act


def encoder_forward_bytes(s: Shapes, batch: int, seq: int, act: int = 2) -> float:
    """Inference activations of an encoder (no autograd): the largest layer's tensors plus the
    attention maps of one layer."""
    return batch * seq * (2 * s.hidden + s.intermediate) * act + batch * s.heads * seq * seq * act


# ---------------------------------------------------------------- the plan

@dataclass
class Step:
    """One moment of one notebook on a GPU: what is resident then, and the total."""

    profile: str
    notebook: str
    step: str
    items: dict[str, float]  # name -> bytes
    budget_gib: float
    dtype: str = ""
    note: str = ""

    @property
    def total_gib(self) -> float:
        return sum(self.items.values()) / GIB

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.budget_gib

    def explain(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in self.items.items())
        verdict = "fits" if self.fits else "DOES NOT FIT"
        return (f"{self.profile} {self.notebook} {self.step}: {self.total_gib:.2f} GiB of {self.budget_gib:g} GiB "
                f"({verdict}): {parts}")


def gpu_budget_gib(profile: str) -> float:
    from . import config

    budget = config.PROFILES[profile].get("gpu_budget_gib")
    if budget is None:
        raise ValueError(f"profile {profile!r} has no GPU budget (gpu_budget_gib): it runs on the CPU")
    return float(budget)


def profile_dtype(profile: str) -> str:
    """The dtype the profile's GPU runs: fp16 on a T4 (no native bf16), bf16 on a 24 GB card."""
    from . import config

    return config.PROFILES[profile]["gpu_dtype"]


def _resolve_model(ref: str, profile: str) -> str:
    """``artifact:<name>`` → the hub model that artifact was trained from."""
    from . import config

    st = config.PROFILES[profile]["stages"]
    producers = {"sft_model": st["sft"]["base_model"], "dpo_model": st["sft"]["base_model"],
                 "qlora_model": st["qlora"]["base_model"], "cot_model": st["cot"]["base_model"],
                 "t5_model": st["t5"]["base_model"]}
    if ref.startswith("artifact:"):
        return producers[ref.split(":", 1)[1]]
    return ref


def reload_precision(profile: str, model: str, resident_bytes: float = 0.0) -> str:
    """``"16-bit"`` when the merged model fits beside ``resident_bytes`` (and a CUDA context),
    else ``"4-bit"`` (NF4). 05 reloads the merged 8B this way: 16 GB in 16-bit does not fit a T4."""
    s = shapes(_resolve_model(model, profile))
    need = weights_bytes(s, profile_dtype(profile)) + resident_bytes + CUDA_CONTEXT_GIB * GIB
    return "16-bit" if need / GIB <= gpu_budget_gib(profile) else "4-bit"


def plan(profile: str) -> list[Step]:
    """Every GPU step of the course on ``profile``, in notebook order."""
    from . import config

    st = config.PROFILES[profile]["stages"]
    budget, dt = gpu_budget_gib(profile), profile_dtype(profile)
    b16 = DTYPE_BYTES[dt]
    ctx = CUDA_CONTEXT_GIB * GIB
    steps: list[Step] = []

    def add(nb, step, items, note="", dtype=dt):
        steps.append(Step(profile, nb, step, {k: v for k, v in items.items() if v}, budget, dtype, note))

    # 02 · LoRA SFT of the Qwen base; then the T5 full fine-tune
    c = st["sft"]
    q = shapes(c["base_model"])
    ckpt = c.get("gradient_checkpointing", False)
    add("02_sft", "sft: LoRA training", {
        "weights 16-bit": weights_bytes(q, dt), "LoRA + AdamW": lora_bytes(q.lora_params(c["lora"]["target_modules"], c["lora"]["r"])),
        "activations": activation_bytes(q, c["batch_size"], c["seq_len"], b16, ckpt),
        "logits": logits_bytes(q, c["batch_size"], c["seq_len"], b16), "CUDA context": ctx},
        f"batch {c['batch_size']} × {c['seq_len']} tokens, checkpointing {'on' if ckpt else 'off'}")
    c = st["t5"]
    t = shapes(c["base_model"])
    add("02_sft", "t5: full fine-tune", {
        "weights + grads + AdamW (fp32)": full_finetune_bytes(t.params),
        # 8 encoder + 8 decoder blocks; the decoder's have self- and cross-attention maps
        "activations": activation_bytes(t, c["batch_size"], c["seq_len"], b16, False, eager_attention=True,
                                         attention_maps=1.5),
        "logits": logits_bytes(t, c["batch_size"], c["seq_len"], b16), "CUDA context": ctx},
        f"batch {c['batch_size']} × {c['seq_len']} tokens (T5 attends eagerly: encoder, decoder, cross)")

    # 03 · DPO on the merged SFT model: chosen and rejected go through together
    c = st["dpo"]
    ckpt = c.get("gradient_checkpointing", False)
    add("03_dpo", "dpo: LoRA training", {
        "weights 16-bit": weights_bytes(q, dt), "LoRA + AdamW": lora_bytes(q.lora_params(c["lora"]["target_modules"], c["lora"]["r"])),
        "activations": activation_bytes(q, 2 * c["batch_size"], c["seq_len"], b16, ckpt),
        "logits": logits_bytes(q, 2 * c["batch_size"], c["seq_len"], b16), "CUDA context": ctx},
        f"2 × batch {c['batch_size']} (chosen + rejected) × {c['seq_len']} tokens, checkpointing {'on' if ckpt else 'off'}")

    # 04 · QLoRA on Phi-2: 4-bit weights, compute dtype fp32 on an fp16 GPU (Phi overflows in fp16)
    c = st["qlora"]
    p = shapes(c["base_model"])
    comp = "float32" if dt == "float16" else dt
    cb = DTYPE_BYTES[comp]
    ckpt = c.get("gradient_checkpointing", False)
    lora_n = p.lora_params(c["lora"]["target_modules"], c["lora"]["r"])
    resident4 = weights_bytes(p, comp, quant4=True) + lora_bytes(lora_n)
    train4 = {"weights NF4 (+ embeddings/head in " + comp + ")": weights_bytes(p, comp, quant4=True),
              "LoRA + AdamW": lora_bytes(lora_n),
              "activations": activation_bytes(p, c["batch_size"], c["seq_len"], cb, ckpt, eager_attention=True),
              "logits": logits_bytes(p, c["batch_size"], c["seq_len"], cb), "CUDA context": ctx}
    add("04_qlora_phi2", "qlora: 4-bit training", train4,
        f"batch {c['batch_size']} × {c['seq_len']} tokens, compute {comp}, eager attention, "
        f"checkpointing {'on' if ckpt else 'off'}", comp)
    add("04_qlora_phi2", "qlora: 16-bit LoRA measured (child process)", {
        "the notebook's 4-bit model": resident4, "child: weights 16-bit": weights_bytes(p, dt),
        "child: LoRA + AdamW": lora_bytes(lora_n),
        "child: activations": activation_bytes(p, c["batch_size"], c["seq_len"], b16, ckpt, eager_attention=True),
        "child: logits": logits_bytes(p, c["batch_size"], c["seq_len"], b16), "CUDA contexts (2)": 2 * ctx},
        "memory section: the comparison run (same checkpointing), beside the loaded 4-bit model", dt)
    add("04_qlora_phi2", "qlora: grid-search trial", {
        "the notebook's 4-bit model": resident4, **{f"trial: {k}": v for k, v in train4.items() if k != "CUDA context"},
        "CUDA context": ctx}, "one trial at a time (each trial's model is freed before the next)", comp)
    add("04_qlora_phi2", "qlora: merge (dequantised base)", {
        "the trained 4-bit model": resident4, "dequantised base in " + comp: weights_bytes(p, comp),
        "CUDA context": ctx}, "save_merged dequantises a fresh 4-bit base in the compute dtype", comp)

    # 05 · R1-style SFT of the 8B distill with Unsloth: 4-bit, 8-bit AdamW, checkpointing
    c = st["cot"]
    r1 = shapes(c["base_model"])
    lora_n = r1.lora_params(c["lora"]["target_modules"], c["lora"]["r"])
    w4 = weights_bytes(r1, dt, quant4=True)
    add("05_r1_cot_unsloth", "cot: 4-bit training", {
        "weights NF4 (+ embeddings/head 16-bit)": w4, "LoRA + " + c.get("optim", "adamw_torch"): lora_bytes(lora_n, c.get("optim", "")),
        "activations": activation_bytes(r1, c["batch_size"], c["seq_len"], b16, True),
        "logits": logits_bytes(r1, c["batch_size"], c["seq_len"], b16), "CUDA context": ctx},
        f"batch {c['batch_size']} × {c['seq_len']} tokens, gradient checkpointing")
    gen_batch, gen_tokens = c.get("eval_batch_size", 32), 512 + 1024  # cot.evaluate_sets' batch; 05's max_new_tokens on a GPU
    add("05_r1_cot_unsloth", "cot: generation", {
        "weights NF4": w4, "LoRA (fp32)": lora_n * 4, "KV cache": kv_cache_bytes(r1, gen_batch, gen_tokens, b16),
        "CUDA context": ctx}, f"{gen_batch} replies × {gen_tokens} tokens (prompt ≤ 512 + reasoning)")
    how = reload_precision(profile, c["base_model"])
    add("05_r1_cot_unsloth", f"cot: reload merged ({how})", {
        f"merged weights {how}": weights_bytes(r1, dt, quant4=how == "4-bit"), "CUDA context": ctx},
        "after the training model is freed; 16-bit only where it fits")

    # 06 · RAG: embedder, cross-encoder reranker, and the generator LLM
    c = st["rag"]
    emb, rr = shapes(c["embedder"]), shapes(c["reranker"])
    items = {"embedder 16-bit": weights_bytes(emb, dt), "embedding batch": encoder_forward_bytes(emb, 64, 512, b16),
             "reranker 16-bit": weights_bytes(rr, dt),
             "reranker batch": encoder_forward_bytes(rr, 32, c.get("reranker_max_length", 512), b16), "CUDA context": ctx}
    if c.get("generator"):
        g = shapes(_resolve_model(c["generator"], profile))
        items["generator 16-bit"] = weights_bytes(g, dt)
        items["generator KV cache"] = kv_cache_bytes(g, 8, 2048, b16)
    add("06_rag", "rag: retrieve, rerank, answer", items, "embedder, reranker and generator resident together")

    # 08 · the leaderboard loads every trained model at once, plus the BERTScore model
    c = st["eval"]
    quant = set(c.get("load_in_4bit", []))
    items = {}
    for name, ref in (("base", st["sft"]["base_model"]), ("sft", "artifact:sft_model"), ("dpo", "artifact:dpo_model"),
                      ("t5", "artifact:t5_model"), ("qlora", "artifact:qlora_model"), ("cot", "artifact:cot_model")):
        s_ = shapes(_resolve_model(ref, profile))
        items[f"{name} {'NF4' if name in quant else '16-bit'}"] = weights_bytes(s_, dt, quant4=name in quant)
    bs = shapes(c["bertscore_model"])
    items["BERTScore model 16-bit"] = weights_bytes(bs, dt)
    items["generation KV (largest model)"] = kv_cache_bytes(r1, 16, 512 + c["max_new_tokens"], b16)
    items["CUDA context"] = ctx
    add("08_benchmarking", "eval: every model loaded", items,
        f"4-bit on load: {sorted(quant) or 'none'}")

    # 09 · vLLM serves the SFT model: weights + the KV cache of the busiest level
    c = st["serve"]
    add("09_vllm_serving", "serve: vLLM", {
        "weights 16-bit": weights_bytes(q, dt),
        "KV cache": kv_cache_bytes(q, max(c["bench_concurrency"]), c["max_model_len"], b16),
        "CUDA graphs + sampler": 1.0 * GIB, "CUDA context": ctx},
        f"{max(c['bench_concurrency'])} sequences × max_model_len {c['max_model_len']}; vLLM then fills "
        f"gpu_memory_utilization of the card with KV blocks")
    return steps


def table(steps: list[Step]) -> str:
    """A markdown table of the plan."""
    lines = ["| profile | notebook | step | dtype | GiB | budget | fits | largest terms |",
             "| --- | --- | --- | --- | ---: | ---: | --- | --- |"]
    for s in steps:
        top = sorted(s.items.items(), key=lambda kv: -kv[1])[:3]
        lines.append(f"| {s.profile} | {s.notebook} | {s.step} | {s.dtype} | {s.total_gib:.2f} | {s.budget_gib:g} | "
                     f"{'yes' if s.fits else '**no**'} | " + ", ".join(f"{k} {v / GIB:.2f}" for k, v in top) + " |")
    return "\n".join(lines)
