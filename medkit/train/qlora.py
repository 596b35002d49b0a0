"""QLoRA as the Phi-2 system does it: the base loaded in 4-bit NF4 with double quantisation,
``prepare_model_for_kbit_training``, then LoRA (r=32, α=64, dropout 0.1) on Phi's q/k/v and
``dense`` projections, trained with trl's ``SFTTrainer`` on MCQs (completion-only loss).

Also here: the weights' footprint and the training peak, measured (not estimated) for 4-bit
QLoRA and full-precision LoRA on the same model; a small grid search over r and the learning
rate; a merged, dequantised model for the later notebooks; generation latency percentiles.

bitsandbytes 0.50 runs 4-bit on the CPU, so the tiny profile does real QLoRA; on a GPU the
same functions load ``microsoft/phi-2``.
"""
from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

from .common import fp32_adapters_for_fp16, free_memory, torch_dtype


def compute_dtype(cfg: dict[str, Any], model_type: str = "") -> str:
    """The dtype 4-bit matmuls compute in: fp32 on the CPU, bf16 where the GPU has it, else
    fp16, except Phi: its attention overflows in fp16 (inf/NaN losses on a T4), so Phi on an
    fp16-only GPU computes in fp32."""
    if cfg["device"] == "cpu":
        return "float32"
    if cfg["dtype"] == "float16" and model_type == "phi":
        return "float32"
    return cfg["dtype"]


def bnb_config(dtype: str):
    """NF4 4-bit weights with double quantisation (the quantisation constants are quantised too)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(dtype))


def _tokenizer(path: str):
    from transformers import AutoConfig, AutoTokenizer

    from ..tiny import PHI_TEMPLATE

    tok = AutoTokenizer.from_pretrained(path)
    model_type = AutoConfig.from_pretrained(path).model_type
    if model_type == "phi":
        # phi-2 ships no chat template: the course's one Phi template (its model card's
        # "Instruct:/Output:" format), also over an older copy saved with a cached tiny Phi
        tok.chat_template = PHI_TEMPLATE
    elif not tok.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; set tokenizer.chat_template")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, model_type


def load_base(path: str, cfg: dict[str, Any], quantized: bool = True):
    """(model, tokenizer, model_type): the base in 4-bit NF4 (``quantized``) or in the profile's
    full dtype (fp32 on the CPU, 16-bit on a GPU)."""
    from transformers import AutoModelForCausalLM

    from . import attention

    tok, model_type = _tokenizer(path)
    dtype = compute_dtype(cfg, model_type)
    kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype if quantized else cfg["dtype"])}
    if model_type == "phi" and cfg["device"] != "cpu":
        kwargs["attn_implementation"] = "eager"  # the fp32-upcast attention path, see compute_dtype
    if quantized:
        kwargs["quantization_config"] = bnb_config(dtype)
        kwargs["device_map"] = {"": 0} if cfg["device"] == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if not quantized:
        model.to(cfg["device"])
    else:
        _detach_from_checkpoint(model)
    return attention.use_on_cpu(model), tok, model_type


def _detach_from_checkpoint(model) -> None:
    """On the CPU the weights that stay unquantised (embedding, norms) are views into the
    memory-mapped checkpoint, which keeps the whole mapping alive, and with it the full-precision
    pages of every layer that was read to be quantised (405 MB for SmolLM2-135M, counted in RSS
    though no tensor uses them). Copying those few weights out lets the mapping go."""
    import bitsandbytes as bnb

    for p in model.parameters():
        if p.device.type == "cpu" and not isinstance(p, bnb.nn.Params4bit):
            p.data = p.data.clone()


def training_layout(model) -> int:
    """Undo bitsandbytes' CPU inference repacking before training; returns layers restored.

    bitsandbytes 0.50 repacks a 4-bit weight into a faster CPU layout the first time the layer
    runs in eval mode (e.g. the before-training evaluation), and its training path then fails
    on that layout ("a view of a leaf Variable ... in-place"). Call this before ``train()``."""
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    n = 0
    for m in model.modules():
        qs = getattr(getattr(m, "weight", None), "quant_state", None)
        if qs is not None and getattr(qs, "packing_format_for_cpu", False):
            m.weight.data, m.weight.quant_state = _convert_weight_packed_for_cpu_inverse(m.weight.data, qs)
            n += 1
    return n


def add_lora(model, lora: dict[str, Any], quantized: bool, gradient_checkpointing: bool = False):
    """``prepare_model_for_kbit_training`` (4-bit only: norms in fp32, input grads on) then a
    LoRA adapter; returns the PEFT model."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    from .sft import lora_config

    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    elif gradient_checkpointing:  # the full-precision comparison runs with the same setting
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return get_peft_model(model, lora_config(lora))


def trainable_share(peft_model) -> dict[str, float]:
    """Trainable and total parameters (peft counts a packed 4-bit weight as its real size)."""
    trainable, total = peft_model.get_nb_trainable_parameters()
    return {"trainable": int(trainable), "total": int(total), "pct": 100.0 * trainable / total}


def _linear4bit():
    try:
        import bitsandbytes as bnb
    except ImportError:  # pragma: no cover - a dependency of the package
        return ()
    return (bnb.nn.Linear4bit,)


def weight_footprint(model) -> dict[str, float]:
    """Bytes the weights occupy, read from the tensors themselves: the whole model, and the
    linear layers that 4-bit quantisation replaces (packed 4-bit weights plus their
    quantisation constants, or the plain weights of the same layers)."""
    import torch

    def tensor_bytes(t):
        return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0

    def quant_state_bytes(qs):
        if qs is None:
            return 0
        n = tensor_bytes(qs.absmax) + tensor_bytes(getattr(qs, "code", None))
        if getattr(qs, "state2", None) is not None:  # double quantisation
            n += tensor_bytes(qs.state2.absmax) + tensor_bytes(qs.state2.code) + tensor_bytes(qs.offset)
        return n

    total = sum(tensor_bytes(p) for p in model.parameters()) + sum(tensor_bytes(b) for b in model.buffers())
    linear = 0
    for name, m in model.named_modules():
        if "lora_" in name or "lm_head" in name:
            continue
        if isinstance(m, _linear4bit()):
            qs = getattr(m.weight, "quant_state", None)
            linear += tensor_bytes(m.weight) + quant_state_bytes(qs)
            total += quant_state_bytes(qs)
        elif isinstance(m, torch.nn.Linear):
            linear += tensor_bytes(m.weight)
    return {"model_mb": total / 2**20, "linear_mb": linear / 2**20}


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _glibc():
    """glibc through ctypes, or None where the C library is another (macOS, musl)."""
    import ctypes

    try:
        lib = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return lib if hasattr(lib, "malloc_trim") and hasattr(lib, "mallopt") else None


def _release_freed_memory() -> None:
    """Hand memory that Python and torch have freed back to the operating system (glibc keeps
    freed blocks in the process otherwise, and RSS would still count them)."""
    import gc

    gc.collect()
    libc = _glibc()
    if libc is not None:  # not glibc (macOS, musl): RSS may then keep the load's peak
        libc.malloc_trim(0)


# glibc serves a large allocation with its own mmap and unmaps it when freed, but after the first such
# free it raises that threshold (up to 32 MB), so a training step's activation-sized blocks then come
# from the heap and stay in the process after they are freed: RSS grows by the allocator's cache, not
# by what training holds. A fixed threshold (mallopt) keeps large blocks returning to the system.
MMAP_THRESHOLD = 1 << 20


def _return_large_blocks(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold (``M_MMAP_THRESHOLD``) and trim threshold (``M_TRIM_THRESHOLD``)
    at ``threshold`` bytes for this process. Returns False where the C library is not glibc."""
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def _measure_child(conn, path, cfg, quantized, rows, steps, mmap_threshold):
    """In a child process: RSS before loading; the peak while loading (the 4-bit path reads
    full-precision weights before quantising them); then, once what loading freed is handed back,
    the peak while training (weights, LoRA, optimiser state and activations), both above the
    starting point."""
    import gc

    import bitsandbytes  # noqa: F401 - the libraries are loaded before the baseline is read,
    import peft  # noqa: F401            so the growth measured is the model's and training's
    import torch
    import transformers  # noqa: F401

    from ..evaluate import mcq
    from .common import encode_completions

    allocator = (f"glibc, mmap threshold {mmap_threshold >> 10} KB"
                 if mmap_threshold and _return_large_blocks(mmap_threshold) else "default")
    gc.collect()
    base = _rss()
    peak = {"load": base}
    phase = ["load"]  # the poller writes only the current phase's peak: no reset races with it
    done = threading.Event()

    def poll():
        while not done.is_set():
            key = phase[0]
            peak[key] = max(peak.get(key, base), _rss())
            time.sleep(0.002)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    try:
        from trl.trainer import add_fused_lm_head

        from .common import score_labelled_positions_only

        score_labelled_positions_only()  # as 04's trainer does (qlora.make_trainer)
        model, tok, _ = load_base(path, cfg, quantized)
        weights = weight_footprint(model)
        # the loss as 04's SFTTrainer computes it: per-token log-probabilities from the LM head in
        # tiles, only where there is a label, never the whole (batch, length, vocabulary) logits
        add_fused_lm_head(model)
        model = add_lora(model, cfg["lora"], quantized, cfg.get("gradient_checkpointing", False))
        after_load = _rss()
        _release_freed_memory()
        peak["train"] = _rss()
        phase[0] = "train"  # from here on: the training peak
        x, attn, y = encode_completions(tok, mcq.prompts(rows), [mcq.target_text(r) for r in rows], cfg["device"])
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg["lr"])
        model.train()
        losses = []
        for _ in range(steps):
            loss = model(input_ids=x, attention_mask=attn, labels=y, fused_lm_head=True).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        peak["train"] = max(peak["train"], _rss())
        done.set()
        t.join()
        gpu_peak = torch.cuda.max_memory_allocated() / 2**20 if cfg["device"] == "cuda" else None
        conn.send({"weights_model_mb": weights["model_mb"], "weights_linear_mb": weights["linear_mb"],
                   "load_mb": (after_load - base) / 2**20, "load_peak_mb": (peak["load"] - base) / 2**20,
                   "train_peak_mb": (peak["train"] - base) / 2**20,
                   "gpu_peak_mb": gpu_peak, "losses": losses, "allocator": allocator})
    except Exception as exc:  # noqa: BLE001 - report it to the parent, which raises
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        done.set()
        conn.close()


def measure_training_memory(path: str, cfg: dict[str, Any], rows: list[dict[str, Any]], quantized: bool,
                            steps: int = 3, mmap_threshold: int | None = MMAP_THRESHOLD) -> dict[str, Any]:
    """Load the base (4-bit or full), add LoRA and run ``steps`` training steps on one batch of
    ``rows`` in a separate process, so one measurement cannot leave memory behind for the other.

    The process fixes glibc's mmap threshold at ``mmap_threshold`` bytes (``None``: glibc's
    default, which keeps freed activation-sized blocks), so its RSS follows what training holds.
    Returns the weights' footprint (from the tensors), and the process's resident memory above
    its starting point after loading and at its peak (polled every 2 ms while training); on a
    GPU also ``torch.cuda.max_memory_allocated``; ``allocator`` says which setting applied."""
    import multiprocessing as mp

    # a fresh interpreter: forking a process that already runs threads (a Jupyter kernel) can
    # deadlock, and a fork would share the parent's pages
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_measure_child, args=(child, path, cfg, quantized, rows, steps, mmap_threshold))
    proc.start()
    child.close()
    try:
        result = parent.recv() if parent.poll(600) else {"error": "no result within 600 s"}
    except EOFError:  # the child died before it could report (killed for memory, a crash in C code)
        proc.join(30)
        result = {"error": f"the measuring process exited with code {proc.exitcode} before it reported"}
    proc.join(30)
    if "error" in result:
        raise RuntimeError(f"memory measurement ({'4-bit' if quantized else 'full'}) failed: {result['error']}")
    return result


def make_trainer(peft_model, tok, train_rows, eval_rows, cfg: dict[str, Any], out_dir, **extra: Any):
    """An ``SFTTrainer`` on an already prepared PEFT model (MCQ rows → prompt/completion)."""
    from trl import SFTTrainer

    from ..evaluate import mcq
    from .common import score_labelled_positions_only
    from .sft import sft_config, to_prompt_completion

    extra.setdefault("save_strategy", "no")
    score_labelled_positions_only()
    trainer = SFTTrainer(model=peft_model, args=sft_config(cfg, out_dir, **extra),
                         train_dataset=to_prompt_completion(mcq.to_sft_rows(train_rows), mcq.MCQ_SYSTEM),
                         eval_dataset=to_prompt_completion(mcq.to_sft_rows(eval_rows), mcq.MCQ_SYSTEM),
                         processing_class=tok, callbacks=[_keep_training_layout()])
    return fp32_adapters_for_fp16(trainer, cfg["dtype"])


def _keep_training_layout():
    """A callback that restores the 4-bit training layout at the start and after every
    evaluation (evaluation runs in eval mode, where bitsandbytes repacks for inference)."""
    from transformers import TrainerCallback

    class KeepTrainingLayout(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            training_layout(model)

        def on_evaluate(self, args, state, control, model=None, **kw):
            training_layout(model)

    return KeepTrainingLayout()


def grid_search(path: str, train_rows, eval_rows, cfg: dict[str, Any], out_dir) -> list[dict[str, Any]]:
    """Short QLoRA trials over LoRA rank (α = 2r, as in r=32/α=64) and learning rate (the
    profile's ``hpo`` block), each from a fresh 4-bit base; returns one row per trial with its
    held-out loss, best first."""
    from ..notebook import set_seed

    ranks, lrs, steps = cfg["hpo"]["ranks"], cfg["hpo"]["lrs"], cfg["hpo"]["steps"]
    trials = []
    for r in ranks:
        for lr in lrs:
            set_seed(cfg.get("seed", 0))
            model, tok, _ = load_base(path, cfg, quantized=True)
            lora = dict(cfg["lora"], r=r, alpha=2 * r)
            peft_model = add_lora(model, lora, True, cfg.get("gradient_checkpointing", False))
            trial_cfg = dict(cfg, max_steps=steps, lr=lr)
            trainer = make_trainer(peft_model, tok, train_rows, eval_rows, trial_cfg,
                                   Path(out_dir) / f"r{r}_lr{lr:g}", eval_strategy="no", disable_tqdm=True,
                                   logging_strategy="no")
            t0 = time.perf_counter()
            out = trainer.train()
            ev = trainer.evaluate()
            trials.append({"r": r, "alpha": 2 * r, "lr": lr, "steps": steps, "train_loss": out.training_loss,
                           "eval_loss": ev["eval_loss"], "seconds": time.perf_counter() - t0})
            del model, peft_model, trainer  # one trial's model at a time on the GPU (medkit.memplan)
            free_memory()
    return sorted(trials, key=lambda t: t["eval_loss"])


def save_merged(peft_model, tok, base_path: str, cfg: dict[str, Any], folder) -> dict[str, Path]:
    """Save the adapter, then a merged model loadable without bitsandbytes: the 4-bit base is
    dequantised (the exact NF4 values the adapter was trained on), the adapter is merged into
    it, and the result is saved in the profile's dtype."""
    from peft import PeftModel

    folder = Path(folder)
    adapter, merged = folder / "adapter", folder / "merged"
    peft_model.save_pretrained(adapter)
    tok.save_pretrained(adapter)
    base, _, _ = load_base(base_path, cfg, quantized=True)
    base = base.dequantize()
    model = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    model = model.to(torch_dtype(cfg["dtype"]))
    model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    model.save_pretrained(merged)
    tok.save_pretrained(merged)
    for d in (adapter, merged):
        (d / "medkit_config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
    return {"adapter": adapter, "merged": merged}


def latency(model, tok, prompts: list[list[dict[str, str]]], n: int = 50, max_new_tokens: int = 32) -> dict[str, float]:
    """Wall-clock time of ``n`` single-request greedy generations (one warm-up first):
    P50/P95/mean in milliseconds, and tokens per second."""
    import numpy as np

    from .common import generate

    generate(model, tok, prompts[:1], max_new_tokens=max_new_tokens)
    times, tokens = [], 0
    for i in range(n):
        p = prompts[i % len(prompts)]
        t0 = time.perf_counter()
        out = generate(model, tok, [p], max_new_tokens=max_new_tokens, batch_size=1)
        times.append((time.perf_counter() - t0) * 1000)
        tokens += len(tok(out[0]["raw"], add_special_tokens=False)["input_ids"])
    arr = np.array(times)
    return {"n": n, "p50_ms": float(np.percentile(arr, 50)), "p95_ms": float(np.percentile(arr, 95)),
            "mean_ms": float(arr.mean()), "tokens_per_s": tokens / (arr.sum() / 1000)}


def plot_memory(rows: dict[str, dict[str, float]]):
    """Bars: weights and training peak (MB) per setting."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    names = list(rows)
    for ax, key, title in zip(axes, ("weights_linear_mb", "train_peak_mb"),
                              ("weights of the quantised layers (MB)", "training peak above start (MB)")):
        ax.bar(names, [rows[n][key] for n in names], color=["#888", "#3b7dd8"][: len(names)])
        ax.set_title(title)
    fig.tight_layout()
    return fig


