"""Where a notebook's chat model writes its replies: transformers, or llama.cpp on the model's
GGUF export.

06's answerer and 07's agent write with a fine-tuned model, mostly one reply at a time. On a CPU a
reply from transformers is bound by per-token overhead, and llama.cpp writes it from the same
weights more than twice as fast (SmolLM2, one core: 8 agent drafts in 13.5 s against 30.8 s; 09
measures both as servers). The profile picks the runtime
(``rag.generator_runtime``, ``agent.llm_runtime``); the prompt is always the transformers
tokenizer's own chat template, so both runtimes read the same token ids and stop at the same end
token, and each result has the fields of :func:`medkit.train.common.generate`.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import tempfile
import threading
import weakref
from pathlib import Path
from typing import Any

RUNTIMES = ("transformers", "llama.cpp")


class TransformersChat:
    """Greedy replies from a loaded transformers model (batched, as ``common.generate``)."""

    runtime = "transformers"

    def __init__(self, model, tok):
        self.model, self.tok = model, tok

    def generate(self, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
                 batch_size: int = 16) -> list[dict[str, Any]]:
        from ..train.common import generate

        return generate(self.model, self.tok, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)


def weights_digest(model_dir: str | Path) -> str:
    """A short hash of a model folder's weights and config: the GGUF cache key, so that a model
    trained again is exported again."""
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors")) + [model_dir / "config.json"]
    missing = [f.name for f in files if not f.is_file()]
    if missing or len(files) < 2:
        raise FileNotFoundError(f"{model_dir}: not a saved transformers model (missing "
                                f"{', '.join(missing) or '*.safetensors'})")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def cached_gguf(model_dir: str | Path, cache_dir: str | Path, quant: str = "f16") -> Path:
    """The model's GGUF export in ``cache_dir``, written once per weights (``weights_digest``).
    It is written to a ``.part`` file of its own and renamed when complete: an export that fails or
    is stopped leaves no file that a later call would take for a finished one, and two processes
    exporting at once each write their own."""
    from . import gguf_export

    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    out = cache_dir / f"{model_dir.name}-{weights_digest(model_dir)}-{quant}.gguf"
    if out.is_file():
        return out
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=out.name + ".", suffix=".part")
    os.close(fd)
    part = Path(tmp)
    try:
        gguf_export.export(model_dir, part, quant)
        os.replace(part, out)
    finally:
        part.unlink(missing_ok=True)
    return out


def _close_at_exit(ref: "weakref.ref") -> None:
    llm = ref()
    if llm is not None:
        llm.close()


class LlamaCppChat:
    """Greedy replies from llama.cpp on the GGUF export of ``model_dir`` (exported once into
    ``cache_dir``), one prompt at a time. It uses as many threads as torch does at each call, so a
    notebook that the course runner widens (``medkit.run``) widens this too."""

    runtime = "llama.cpp"

    def __init__(self, model_dir: str | Path, cache_dir: str | Path, quant: str = "f16", n_ctx: int | None = None):
        import torch
        from transformers import AutoConfig, AutoTokenizer

        from .gguf_export import llama_class, load_llama

        llama_class()  # before the export: a missing wheel is reported first
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        if not self.tok.chat_template:
            raise ValueError(f"{model_dir}: the tokenizer has no chat template; the llama.cpp runtime renders "
                             "prompts with it")
        self.path = cached_gguf(model_dir, cache_dir, quant)
        limit = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", 4096)
        self.n_ctx = n_ctx or min(int(limit), 4096)
        self.threads = torch.get_num_threads()
        self.llm = load_llama(self.path, n_ctx=self.n_ctx, threads=self.threads)
        # closed before the interpreter tears down what its destructor needs; a weak reference, so
        # that dropping this object (09 drops 07's agent before its servers start) frees the model
        atexit.register(_close_at_exit, weakref.ref(self.llm))
        self.end_ids = {self.tok.eos_token_id}
        self._lock = threading.Lock()  # one llama.cpp context: one generation at a time

    def _follow_torch_threads(self) -> None:
        import torch

        n = torch.get_num_threads()
        if n != self.threads:
            self.llm._ctx.set_n_threads(n, n)
            self.threads = n

    def generate(self, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
                 batch_size: int = 1) -> list[dict[str, Any]]:
        """``batch_size`` is accepted for the same call as transformers and ignored: llama.cpp
        writes one reply at a time, each from an empty cache (a reply does not depend on the
        prompt before it)."""
        from ..train.common import reply_fields

        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        out = []
        with self._lock:
            for p in prompts:
                self._follow_torch_threads()  # per prompt: the runner may widen the notebook mid-call
                text = self.tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True)
                ids = self.tok(text, add_special_tokens=False)["input_ids"]
                if len(ids) + max_new_tokens > self.n_ctx:
                    raise ValueError(f"{self.path.name}: a prompt of {len(ids)} tokens plus {max_new_tokens} new "
                                     f"ones does not fit llama.cpp's context of {self.n_ctx} tokens")
                row: list[int] = []
                self.llm.reset()  # no prefix reuse from the previous prompt
                for t in self.llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
                    row.append(int(t))  # as transformers: at most max_new_tokens, the end token counted
                    if row[-1] in self.end_ids or len(row) >= max_new_tokens:
                        break
                out.append(reply_fields(self.tok, row, self.end_ids))
        return out


def open_chat(model_ref: str, session=None, runtime: str = "transformers", dtype: str = "float32",
              device: str = "cpu", cache_dir: str | Path | None = None, quant: str = "f16"):
    """The chat model ``model_ref`` (``artifact:<name>``, a hub id or a folder) on ``runtime``.
    llama.cpp needs a local folder (an artifact or a path) and exports it into ``cache_dir``
    (default: ``<session dir>/gguf``)."""
    from ..train.common import load_causal_lm, resolve_model_ref

    if runtime not in RUNTIMES:
        raise ValueError(f"unknown chat runtime {runtime!r}; choose one of {RUNTIMES}")
    path = resolve_model_ref(model_ref, session)
    if runtime == "transformers":
        return TransformersChat(*load_causal_lm(path, dtype=dtype, device=device))
    if not Path(path).is_dir():
        raise ValueError(f"{model_ref}: the llama.cpp runtime exports a local model folder to GGUF; {path} is not one")
    if cache_dir is None:
        if session is None:
            raise ValueError("the llama.cpp runtime needs a cache_dir (or a session) for the GGUF export")
        cache_dir = session.dir / "gguf"
    return LlamaCppChat(path, cache_dir, quant)
