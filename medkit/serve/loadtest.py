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
import statistics
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


async def one_request(client, model: str, prompt: str, max_tokens: int, extra: dict[str, Any]) -> dict[str, Any]:
    t0 = time.perf_counter()
    ttft = None
    chunks = 0
    usage_tokens = None
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0.0, stream=True, stream_options={"include_usage": True}, **extra)
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            chunks += 1
            if ttft is None:
                ttft = time.perf_counter() - t0
        if getattr(chunk, "usage", None) is not None:
            usage_tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - t0
    # engines that send no usage stream one token per chunk
    return {"ttft_s": ttft if ttft is not None else latency, "latency_s": latency,
            "tokens": usage_tokens if usage_tokens is not None else chunks}


async def run_level(base_url: str, model: str, concurrency: int, n_requests: int, max_tokens: int = 32,
                    api_key: str = "none", timeout_s: float = 300.0, extra: dict[str, Any] | None = None,
                    prompts: list[str] | None = None) -> dict[str, Any]:
    """``n_requests`` requests, at most ``concurrency`` in flight. Errors are counted, not raised."""
    import openai

    if concurrency < 1 or n_requests < 1:
        raise ValueError(f"concurrency and n_requests must be >= 1, got {concurrency}, {n_requests}")
    prompts = prompts or PROMPTS
    client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=timeout_s)
    sem = asyncio.Semaphore(concurrency)
    results: list[dict[str, Any]] = []
    errors: list[str] = []

    async def worker(i: int) -> None:
        async with sem:
            try:
                results.append(await one_request(client, model, prompts[i % len(prompts)], max_tokens, extra or {}))
            except Exception as e:  # an error is a measurement here
                errors.append(f"{type(e).__name__}: {str(e)[:200]}")

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(n_requests)))
    wall = time.perf_counter() - t0
    await client.close()
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft_s"] * 1000 for r in results]
    lat = [r["latency_s"] * 1000 for r in results]
    return {"concurrency": concurrency, "requests": n_requests, "ok": len(results), "errors": len(errors),
            "error_examples": errors[:3], "tokens": tokens, "wall_s": round(wall, 3),
            "tok_s": round(tokens / wall, 2) if wall > 0 else 0.0,
            "ttft_p50_ms": percentile(ttft, 50), "ttft_p95_ms": percentile(ttft, 95),
            "latency_p50_ms": percentile(lat, 50), "latency_p95_ms": percentile(lat, 95),
            "mean_tokens": statistics.mean(r["tokens"] for r in results) if results else 0}


def requests_for(concurrency: int, minimum: int = 4) -> int:
    """One full wave at each level (at least ``minimum`` requests)."""
    return max(concurrency, minimum)


def sweep(base_url: str, model: str, concurrencies: list[int], max_tokens: int = 32,
          extra: dict[str, Any] | None = None, api_key: str = "none", warmup: int = 2) -> list[dict[str, Any]]:
    """Every concurrency level against one engine, after ``warmup`` unmeasured requests."""
    if warmup:
        asyncio.run(run_level(base_url, model, warmup, warmup, max_tokens=4, extra=extra, api_key=api_key))
    return [asyncio.run(run_level(base_url, model, c, requests_for(c), max_tokens, api_key=api_key, extra=extra))
            for c in concurrencies]


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
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    args = ap.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        ap.error(f"--concurrency: comma-separated integers, got {args.concurrency!r}")
    rows = sweep(args.base_url, args.model, levels, args.max_tokens, api_key=args.api_key)
    for r in rows:
        print(f"c={r['concurrency']:>3}  {r['tok_s']:>8.1f} tok/s  ttft p95 {r['ttft_p95_ms'] or 0:>8.0f} ms  "
              f"latency p95 {r['latency_p95_ms'] or 0:>8.0f} ms  errors {r['errors']}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
