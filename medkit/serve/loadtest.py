"""Load benchmark: many concurrent streaming chat requests through the real ``openai`` client.

Per concurrency level it reports throughput (generated tokens per second of wall time),
time-to-first-token p50/p95, latency p50/p95 and errors. ``benchmark_model`` builds the model
the comparison runs on: a Qwen2-layout decoder of tens of millions of parameters with the
course tokenizer (random weights: throughput depends on shapes, not on what was learned; the
tiny SFT model is too small, every engine is then bound by per-request overhead).

    python -m medkit.serve.loadtest --base-url http://127.0.0.1:8100/v1 --concurrency 1,8,32,64
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

# Questions of the course's own kind; the answers do not matter, only the work per request.
PROMPTS = [
    "What are the warning signs of a stroke?",
    "How is type 2 diabetes usually first treated?",
    "What does a high blood pressure reading mean?",
    "When should a fever in an adult be checked by a doctor?",
    "What are common side effects of ibuprofen?",
    "How can asthma attacks be prevented?",
    "What is the difference between a cold and the flu?",
    "What causes iron deficiency anaemia?",
]


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict[str, Any],
                      rec: dict[str, Any]) -> None:
    """Stream one chat request, filling ``rec`` as chunks arrive (so a request cut off at the
    end of a timed window still counts the tokens it received)."""
    t0 = rec["start"] = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            rec["tokens"] += 1  # one token per chunk while streaming
            if rec["ttft_s"] is None:
                rec["ttft_s"] = time.perf_counter() - t0
        if getattr(chunk, "usage", None) is not None:
            rec["usage_tokens"] = chunk.usage.completion_tokens
    rec["latency_s"] = time.perf_counter() - t0
    rec["done"] = True
    if rec.get("usage_tokens") is not None:  # the engine's own count is exact
        rec["tokens"] = rec["usage_tokens"]


async def run_level(base_url: str, model: str, concurrency: int, n_requests: int | None = None,
                    max_tokens: int = 32, duration_s: float | None = None, api_key: str = "none",
                    timeout_s: float = 300.0, extra: dict[str, Any] | None = None,
                    prompts: list[str] | None = None, max_duration_s: float | None = None) -> dict[str, Any]:
    """One concurrency level. Either ``n_requests`` requests with at most ``concurrency`` in
    flight, or (``duration_s``) ``concurrency`` clients that send requests back to back for that
    long; requests still open at the end are cut off: their tokens so far count, and their wait
    so far enters TTFT/latency as a lower bound (``cut_off`` says how many). Errors are
    counted, not raised.

    A timed window lasts until at least one request has finished (answered or failed), up to
    ``max_duration_s`` (default 5 x ``duration_s``). Without that, an engine that batches 32
    prompts into one prefill can spend the whole window before its first token: on a 2-core
    AVX2-only EPYC vLLM's 32-client level streamed 2 tokens in 6 s, 0.3 tokens/s, where it makes
    over 100 on an AVX-512 one (run smol-r22). ``extended_s`` says how long the window ran past
    ``duration_s``; ``completed`` 0 means even the longer window ended before a first answer."""
    import openai

    if concurrency < 1 or (n_requests is not None and n_requests < 1) or (duration_s is not None and duration_s <= 0):
        raise ValueError(f"concurrency, n_requests and duration_s must be positive, got "
                         f"{concurrency}, {n_requests}, {duration_s}")
    if (n_requests is None) == (duration_s is None):
        raise ValueError("give exactly one of n_requests and duration_s")
    if duration_s is not None:
        max_duration_s = 5 * duration_s if max_duration_s is None else max_duration_s
        if max_duration_s < duration_s:
            raise ValueError(f"max_duration_s ({max_duration_s}) is shorter than duration_s ({duration_s})")
    prompts = prompts or PROMPTS
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    records: list[dict[str, Any]] = []
    errors: list[str] = []
    counter = iter(range(10**9))

    async def send() -> None:
        i = next(counter)
        rec = {"start": time.perf_counter(), "ttft_s": None, "latency_s": None, "tokens": 0, "done": False}
        records.append(rec)
        try:
            await one_request(client, model, prompts[i % len(prompts)], max_tokens, extra or {}, rec)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # an error is a measurement here
            rec["error"] = True
            errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    extended = 0.0
    if duration_s is None:
        sem = asyncio.Semaphore(concurrency)

        async def limited() -> None:
            async with sem:
                await send()

        await asyncio.gather(*(limited() for _ in range(n_requests)))
    else:
        stop = asyncio.Event()

        async def user() -> None:
            while not stop.is_set():
                await send()

        tasks = [asyncio.ensure_future(user()) for _ in range(concurrency)]
        await asyncio.sleep(duration_s)
        # the window ends once one request has finished, not before a whole prefill and decode
        while (not any(r["done"] or r.get("error") for r in records)
               and time.perf_counter() - t0 < max_duration_s):
            await asyncio.sleep(0.02)
        extended = max(0.0, time.perf_counter() - t0 - duration_s)
        stop.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    wall = time.perf_counter() - t0
    end = t0 + wall
    await client.close()
    ok = [r for r in records if not r.get("error")]
    cut = [r for r in ok if not r["done"]]
    empty = [r for r in ok if r["done"] and r["tokens"] == 0]  # "succeeded" with no answer
    tokens = sum(r["tokens"] for r in ok)
    ttft = [(r["ttft_s"] if r["ttft_s"] is not None else end - r["start"]) * 1000 for r in ok]
    lat = [((r["latency_s"] if r["done"] else end - r["start"])) * 1000 for r in ok]
    return {"concurrency": concurrency, "requests": len(records), "completed": len(ok) - len(cut),
            "cut_off": len(cut), "errors": len(errors), "empty": len(empty), "error_examples": errors[:3], "tokens": tokens,
            "wall_s": round(wall, 3), "extended_s": round(extended, 3),
            "tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
            "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95)}


def _run(coro):
    """``asyncio.run`` that also works inside Jupyter (whose kernel already runs a loop): there
    the coroutine runs on its own loop in a worker thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def sweep(base_url: str, model: str, concurrencies: list[int], max_tokens: int = 32,
          duration_s: float | None = 6.0, extra: dict[str, Any] | None = None, api_key: str = "none",
          warmup: int = 3) -> list[dict[str, Any]]:
    """Every concurrency level against one engine, after ``warmup`` unmeasured full requests
    (one at a time, then ``warmup`` at once: engines prepare kernels for new shapes on first use;
    llama.cpp's first prompt evaluations took seconds here). ``duration_s`` None: one full wave
    of ``concurrency`` requests per level instead."""
    if warmup:
        _run(run_level(base_url, model, 1, warmup, max_tokens=max_tokens, extra=extra, api_key=api_key))
        _run(run_level(base_url, model, warmup, warmup, max_tokens=max_tokens, extra=extra, api_key=api_key))
    return [_run(run_level(base_url, model, c, None if duration_s else max(c, 4), max_tokens,
                                  duration_s=duration_s, api_key=api_key, extra=extra))
            for c in concurrencies]


def no_eos_bias(model_dir: str | Path) -> dict[str, int]:
    """``logit_bias`` that forbids the end-of-turn token, so every engine generates exactly
    ``max_tokens`` and the engines are compared on the same work."""
    from transformers import AutoTokenizer

    return {str(AutoTokenizer.from_pretrained(model_dir).eos_token_id): -100}


def compare(engines: dict[str, Any], concurrencies: list[int], max_tokens: int = 32,
            duration_s: float | None = 6.0, extra: dict[str, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Start each engine (an :class:`~medkit.serve.engines.EngineServer`, not yet started) in
    turn, sweep it, stop it. Only one engine runs at a time, so they do not share the CPU.
    Returns one row per (engine, concurrency) with ``engine`` and ``startup_s``."""
    rows = []
    for name, server in engines.items():
        with server:
            for r in sweep(server.url, "medkit", concurrencies, max_tokens, duration_s,
                           extra=(extra or {}).get(name)):
                rows.append({"engine": name, "startup_s": round(server.startup_s or 0.0, 1), **r})
    return rows


def four_backends(model_dir: str | Path, gguf_path: str | Path, log_dir: str | Path, max_model_len: int = 256,
                  dtype: str = "float32", kv_cache_gib: int = 1, max_batch: int = 64,
                  tensor_parallel_size: int = 1, pipeline_parallel_size: int = 1,
                  device: str = "cpu", enforce_eager: bool = False) -> dict[str, Any]:
    """The benchmark's engines, not started: (a) HF naive, (b) HF static batching, (c) llama.cpp
    on the GGUF, (d) vLLM. Each gets a free loopback port and a log under ``log_dir``. The HF
    servers run on ``device`` in ``dtype``, as vLLM does (the GPU on GPU profiles).

    Threads: vLLM for CPU binds its model to ``cpu_count - 1`` cores and keeps one for its API
    process; the others get the same number of compute threads, so all four do the model's
    arithmetic on the same cores. ``enforce_eager``: vLLM without its start-up compile
    (:func:`~medkit.serve.engines.vllm_command`)."""
    from . import engines as e

    log_dir = Path(log_dir)
    ports = {name: e.free_port() for name in ("hf_naive", "hf_batch", "llamacpp", "vllm")}
    kv_env = e.vllm_env(kv_cache_gib) if kv_cache_gib else {}
    threads = max(1, (os.cpu_count() or 2) - 1)
    return {
        "hf_naive": e.EngineServer(e.hf_command(model_dir, ports["hf_naive"], "naive", threads=threads,
                                                device=device, dtype=dtype),
                                   ports["hf_naive"], "hf_naive", log_dir / "hf_naive.log"),
        "hf_batch": e.EngineServer(e.hf_command(model_dir, ports["hf_batch"], "batch", max_batch=max_batch,
                                                threads=threads, device=device, dtype=dtype),
                                   ports["hf_batch"], "hf_batch", log_dir / "hf_batch.log"),
        "llamacpp": e.EngineServer(e.llamacpp_command(gguf_path, ports["llamacpp"], n_ctx=max_model_len * 2,
                                                     threads=threads),
                                   ports["llamacpp"], "llamacpp", log_dir / "llamacpp.log"),
        "vllm": e.EngineServer(e.vllm_command(model_dir, ports["vllm"], max_model_len=max_model_len, dtype=dtype,
                                              max_num_seqs=max_batch, tensor_parallel_size=tensor_parallel_size,
                                              pipeline_parallel_size=pipeline_parallel_size,
                                              enforce_eager=enforce_eager),
                               ports["vllm"], "vllm", log_dir / "vllm.log", env=kv_env, start_timeout=600),
    }


def plot(rows: list[dict[str, Any]]):
    """Throughput, TTFT p95 and latency p95 against concurrency, one line per engine."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name in dict.fromkeys(r["engine"] for r in rows):
        mine = [r for r in rows if r["engine"] == name]
        xs = [r["concurrency"] for r in mine]
        for ax, key in zip(axes, ("tok_s", "ttft_p95_ms", "latency_p95_ms")):
            ax.plot(xs, [r[key] or 0 for r in mine], marker="o", label=name)
    for ax, title in zip(axes, ("throughput (tokens/s)", "TTFT p95 (ms)", "latency p95 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
    axes[1].set_yscale("log")
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    return fig


def benchmark_model(out_dir: str | Path, tokenizer_dir: str | Path, hidden: int = 512, layers: int = 8,
                    heads: int = 8, intermediate: int = 1408, seed: int = 0) -> dict[str, Any]:
    """Build (once; cached by shape) a Qwen2-layout model with the course tokenizer and a plain
    ChatML template. Returns ``{"path", "params"}``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from .gguf_export import gguf_chat_template

    out_dir = Path(out_dir)
    meta_file = out_dir / "medkit_bench.json"
    shape = {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate, "seed": seed,
             "tokenizer": str(tokenizer_dir)}
    if meta_file.exists():
        meta = json.loads(meta_file.read_text())
        if meta.get("shape") == shape and (out_dir / "model.safetensors").exists():
            return {"path": out_dir, "params": meta["params"]}
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = gguf_chat_template(tok.chat_template)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, intermediate_size=intermediate,
                      max_position_embeddings=1024, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen2ForCausalLM(cfg)
    params = sum(p.numel() for p in model.parameters())
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    meta_file.write_text(json.dumps({"shape": shape, "params": params}, indent=2))
    return {"path": out_dir, "params": params}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Load-test an OpenAI-compatible chat endpoint.")
    ap.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8100/v1")
    ap.add_argument("--model", default="medkit")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--api-key", default="none")
    ap.add_argument("--seconds", type=float, default=6.0, help="time per level (0: one wave of requests)")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    rows = sweep(args.base_url, args.model, levels, args.max_tokens, duration_s=args.seconds or None,
                 api_key=args.api_key)
    for r in rows:
        print(f"c={r['concurrency']:>3}  {r['tok_s']:>8.1f} tok/s  ttft p95 {r['ttft_p95_ms'] or 0:>8.0f} ms  "
              f"latency p95 {r['latency_p95_ms'] or 0:>8.0f} ms  errors {r['errors']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
