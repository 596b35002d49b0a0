"""Hugging Face reference servers with the OpenAI chat API, the baselines of the load benchmark.

* ``naive``: one request at a time, as a plain ``model.generate`` behind a web handler does.
* ``batch``: static batching. Requests that arrive while the model is busy wait; the next
  batch takes up to ``max_batch`` of them, pads them left and decodes them together until the
  longest is done. A request that arrives mid-batch waits for the whole batch (what
  continuous batching in vLLM removes).

Both decode greedily (or sample with ``temperature``) with a KV cache, one token per step, and
stream each token as it is made, so time-to-first-token is measured the same way as for vLLM.

    python -m medkit.serve.hf_server --model DIR --mode batch --port 8101
"""
from __future__ import annotations

import argparse
import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

MODES = ("naive", "batch")


@dataclass
class _Job:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    logit_bias: dict[int, float]
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False  # the client went away: stop spending steps on it


class BatchDecoder:
    """Runs the model in one worker thread; ``submit`` returns an asyncio queue that receives
    token ids, then ``None`` at the end (or an Exception)."""

    def __init__(self, model, tok, mode: str = "naive", max_batch: int = 32, window_s: float = 0.01):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.model, self.tok, self.mode = model, tok, mode
        self.max_batch = 1 if mode == "naive" else max(1, int(max_batch))
        self.window_s = window_s
        self.end_ids = {tok.eos_token_id}
        self.pending: queue.Queue[_Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._worker, daemon=True)
        self.thread.start()

    def submit(self, job: _Job) -> None:
        self.pending.put(job)

    def close(self) -> None:
        self.pending.put(None)

    def _worker(self) -> None:
        while True:
            first = self.pending.get()
            if first is None:
                return
            jobs = [first]
            deadline = time.perf_counter() + self.window_s
            while len(jobs) < self.max_batch:
                try:
                    nxt = self.pending.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if nxt is None:
                    self.pending.put(None)
                    break
                jobs.append(nxt)
            for job in [j for j in jobs if j.cancelled]:  # hung up while queued: no work at all
                job.loop.call_soon_threadsafe(job.out.put_nowait, None)
            jobs = [j for j in jobs if not j.cancelled]
            if not jobs:
                continue
            try:
                self._decode(jobs)
            except Exception as e:  # report to every waiting request, keep serving
                for job in jobs:
                    job.loop.call_soon_threadsafe(job.out.put_nowait, e)

    def _decode(self, jobs: list[_Job]) -> None:
        import torch

        n = len(jobs)
        width = max(len(j.prompt_ids) for j in jobs)
        pad = self.tok.pad_token_id
        dev = self.model.device  # the GPU on GPU profiles: inputs go where the weights are
        ids = torch.full((n, width), pad, dtype=torch.long, device=dev)
        mask = torch.zeros((n, width), dtype=torch.long, device=dev)
        for i, j in enumerate(jobs):  # left padding: every row's next token sits at the end
            ids[i, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids, device=dev)
            mask[i, width - len(j.prompt_ids):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        done = [False] * n
        past = None
        steps = max(j.max_tokens for j in jobs)
        with torch.no_grad():
            for _ in range(steps):
                out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 past_key_values=past, use_cache=True)
                past = out.past_key_values
                logits = out.logits[:, -1, :].float()
                next_ids = []
                for i, j in enumerate(jobs):
                    if j.cancelled and not done[i]:
                        done[i] = True
                    row = logits[i]
                    for tid, bias in j.logit_bias.items():
                        row[tid] += bias
                    if j.temperature > 0:
                        probs = torch.softmax(row / j.temperature, -1)
                        t = int(torch.multinomial(probs, 1))
                    else:
                        t = int(row.argmax())
                    next_ids.append(t)
                    if done[i]:
                        continue
                    if t in self.end_ids:
                        done[i] = True
                        j.loop.call_soon_threadsafe(j.out.put_nowait, None)
                        continue
                    j.tokens.append(t)
                    j.loop.call_soon_threadsafe(j.out.put_nowait, t)
                    if len(j.tokens) >= j.max_tokens:
                        done[i] = True
                        j.loop.call_soon_threadsafe(j.out.put_nowait, None)
                if all(done):
                    break
                ids = torch.tensor(next_ids, dtype=torch.long, device=dev).unsqueeze(1)
                mask = torch.cat([mask, torch.ones((n, 1), dtype=torch.long, device=dev)], dim=1)
                positions = positions[:, -1:] + 1
        for i, j in enumerate(jobs):
            if not done[i]:
                j.loop.call_soon_threadsafe(j.out.put_nowait, None)


def create_app(model_dir: str, mode: str = "naive", served_model_name: str = "medkit",
               max_batch: int = 32, max_tokens_cap: int = 512, device: str = "cpu", dtype: str = "float32"):
    """The FastAPI app: ``GET /v1/models``, ``POST /v1/chat/completions`` (``stream`` too). The
    model loads on ``device`` in ``dtype``: the GPU on GPU profiles, so HF and vLLM are compared
    on the same hardware."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import JSONResponse, StreamingResponse

    from ..train.common import load_causal_lm

    model, tok = load_causal_lm(model_dir, dtype, device)
    model.eval()
    decoder = BatchDecoder(model, tok, mode=mode, max_batch=max_batch)
    app = FastAPI(title=f"medkit HF server ({mode})")
    app.state.decoder = decoder

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served_model_name, "object": "model", "owned_by": "medkit"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "mode": mode}

    @app.post("/v1/chat/completions")
    async def chat(body: dict[str, Any]):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPException(400, "messages: a non-empty list of {role, content} is required")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 64)
        if not 1 <= max_tokens <= max_tokens_cap:
            raise HTTPException(400, f"max_tokens must be in 1..{max_tokens_cap}")
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception as e:
            raise HTTPException(400, f"messages could not be formatted with the chat template: {e}")
        prompt_ids = tok(text, add_special_tokens=False)["input_ids"]
        bias = {int(k): float(v) for k, v in (body.get("logit_bias") or {}).items()}
        loop = asyncio.get_running_loop()
        job = _Job(prompt_ids, max_tokens, float(body.get("temperature") or 0.0), bias, loop, asyncio.Queue())
        decoder.submit(job)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time())

        async def tokens():
            while True:
                item = await job.out.get()
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise item
                yield item

        def chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> str:
            body_ = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": served_model_name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
            if usage is not None:
                body_["usage"] = usage
            return f"data: {json.dumps(body_)}\n\n"

        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def events():
                try:
                    yield chunk({"role": "assistant", "content": ""})
                    said, made = "", 0
                    async for _ in tokens():  # one chunk per token, as vLLM and llama.cpp stream
                        made += 1
                        text_now = tok.decode(job.tokens[:made], skip_special_tokens=True)
                        if len(text_now) > len(said):
                            yield chunk({"content": text_now[len(said):]})
                            said = text_now
                    finish = "length" if len(job.tokens) >= max_tokens else "stop"
                    yield chunk({}, finish)
                    if include_usage:
                        yield chunk({}, usage={"prompt_tokens": len(prompt_ids),
                                               "completion_tokens": len(job.tokens),
                                               "total_tokens": len(prompt_ids) + len(job.tokens)})
                    yield "data: [DONE]\n\n"
                finally:  # also when the client disconnects and the stream is cancelled
                    job.cancelled = True

            return StreamingResponse(events(), media_type="text/event-stream")

        async for _ in tokens():
            pass
        answer = tok.decode(job.tokens, skip_special_tokens=True)
        return JSONResponse({
            "id": rid, "object": "chat.completion", "created": created, "model": served_model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                         "finish_reason": "length" if len(job.tokens) >= max_tokens else "stop"}],
            "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": len(job.tokens),
                      "total_tokens": len(prompt_ids) + len(job.tokens)}})

    return app


def resolve_device(profile: str | None, device: str | None, dtype: str | None) -> tuple[str, str]:
    """The server's device and dtype: explicit flags first, then the profile's (its device where
    it exists here, and that device's dtype), else the CPU in fp32."""
    from .. import config

    if device is None:
        device = config.resolve(profile)["device"] if profile else "cpu"
    return device, dtype or config.pick_dtype(device)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--mode", choices=MODES, default="naive")
    ap.add_argument("--served-model-name", default="medkit")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8101)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", default=None, help="take the device and dtype from this profile")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: the profile's, else cpu)")
    ap.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: the device's)")
    args = ap.parse_args(argv)
    device, dtype = resolve_device(args.profile, args.device, args.dtype)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    app = create_app(args.model, args.mode, args.served_model_name, args.max_batch, device=device, dtype=dtype)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=10)


if __name__ == "__main__":
    main()
