"""The course's API backend: an async FastAPI gateway in front of OpenAI-compatible engines.

    GET  /health     the gateway is up, which engines answer and which model they serve
    POST /generate   the Phi-2 system's schema: question, temperature, max_length, use_safety
                     → response, safety_report, inference_time_ms (``stream: true`` → SSE)
    POST /chat       the agent (RAG, citations, triage, session id), when one is given

Requests spread over N engine replicas (the least busy first; a replica that refuses a
connection is skipped). An API key is required whenever the gateway binds to anything but
loopback. Bodies, prompts, ``max_length`` and time per request are capped; slow clients that
trickle a body get 408. Every answer carries the "not medical advice" notice.

    python -m medkit.serve.api --engine-url http://127.0.0.1:8100/v1 --port 8000
"""

import argparse
import asyncio
import ipaddress
import json
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import NOT_MEDICAL_ADVICE
from .pool import EnginePool, EngineUnavailable

NOTICE = NOT_MEDICAL_ADVICE


@dataclass
class Limits:
    max_body_bytes: int = 16_384
    max_question_chars: int = 2_000
    max_tokens_cap: int = 256
    request_timeout_s: float = 60.0
    body_timeout_s: float = 10.0  # a client must finish sending its body within this


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _BodyGuard:
    """ASGI middleware: 413 for bodies over the limit, 408 for bodies that arrive too slowly."""

    def __init__(self, app, limits: Limits):
        self.app, self.limits = app, limits

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            return await _plain(send, 413, f"request body over {self.limits.max_body_bytes} bytes")
        seen = 0
        body_done = False
        started = time.monotonic()

        async def guarded_receive():
            nonlocal seen, body_done
            if body_done:  # later receives wait for a disconnect while a response streams: no limit
                return await receive()
            left = self.limits.body_timeout_s - (time.monotonic() - started)
            try:
                message = await asyncio.wait_for(receive(), timeout=max(left, 0.001))
            except asyncio.TimeoutError:
                raise _Abort(408, f"request body not received within {self.limits.body_timeout_s:.0f} s")
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limits.max_body_bytes:
                    raise _Abort(413, f"request body over {self.limits.max_body_bytes} bytes")
                body_done = not message.get("more_body", False)
            return message

        try:
            await self.app(scope, guarded_receive, send)
        except _Abort as e:
            await _plain(send, e.status, e.message)


try:
    from fastapi import HTTPException as _HTTPException
except ImportError:  # the module stays importable (for its docs) without the serving extras
    _HTTPException = Exception


class _Abort(_HTTPException):
    """Raised from ``receive``: FastAPI passes HTTPExceptions through body parsing unchanged."""

    def __init__(self, status: int, message: str):
        super().__init__(status, message)
        self.status, self.message = status, message


async def _plain(send, status: int, message: str) -> None:
    body = json.dumps({"error": message, "notice": NOTICE}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def create_app(engine_url: str | list[str], model: str | None = None, agent=None, api_key: str | None = None,
               host: str = "127.0.0.1", limits: Limits | None = None, system_prompt: str | None = None):
    """The gateway app. ``engine_url``: one OpenAI base URL (``…/v1``) or a list of replicas.
    ``agent``: an object with ``async achat(message, patient_id=, session_id=)`` (``medkit.agent.
    MedicalAgent``) for ``/chat``; without one ``/chat`` answers 503. ``api_key`` is required
    when ``host`` is not loopback (ValueError otherwise)."""
    from contextlib import asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.security import APIKeyHeader
    from pydantic import BaseModel, Field

    from ..train.common import SYSTEM_PROMPT

    limits = limits or Limits()
    if not is_loopback(host) and not api_key:
        raise ValueError(f"the gateway binds to {host!r}, not loopback: give it an api_key "
                         f"(or set MEDKIT_API_KEY); only loopback may run without one")
    urls = [engine_url] if isinstance(engine_url, str) else list(engine_url)
    system_prompt = system_prompt or SYSTEM_PROMPT

    class GenerateRequest(BaseModel):
        question: str = Field(..., min_length=1, max_length=limits.max_question_chars,
                              description="The user's medical question.")
        temperature: float = Field(0.0, ge=0.0, le=2.0)
        max_length: int = Field(128, ge=1, le=limits.max_tokens_cap, description="Most new tokens to generate.")
        use_safety: bool = Field(False, description="Run the agent's safety validator on the answer.")
        stream: bool = Field(False, description="Answer as server-sent events.")

    class GenerateResponse(BaseModel):
        response: str
        safety_report: dict[str, Any] | None
        inference_time_ms: float
        model: str
        engine: str
        usage: dict[str, Any] | None = None
        notice: str

    class ChatRequest(BaseModel):
        message: str = Field(..., min_length=1, max_length=limits.max_question_chars)
        patient_id: str = Field(..., min_length=1, max_length=128)
        session_id: str | None = Field(None, max_length=128)

    class HealthResponse(BaseModel):
        status: str
        model: str | None
        engines: list[dict[str, Any]]
        agent: bool
        notice: str

    class Error(BaseModel):
        error: str
        notice: str

    @asynccontextmanager
    async def lifespan(app):
        app.state.pool = EnginePool(urls, model, timeout_s=limits.request_timeout_s)
        yield
        await app.state.pool.aclose()  # graceful shutdown: uvicorn has let in-flight requests finish

    app = FastAPI(title="medkit API", version="0.1.0", lifespan=lifespan,
                  description="Gateway to the course's medical assistant. " + NOTICE)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    async def require_key(key: str | None = Depends(key_header)) -> None:
        if api_key and not (key and secrets.compare_digest(key, api_key)):
            raise HTTPException(401, "missing or wrong API key (header X-API-Key)")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return JSONResponse({"error": str(exc.detail), "notice": NOTICE}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return JSONResponse({"error": "malformed JSON body", "notice": NOTICE}, status_code=400)
        parts = [f"{'.'.join(str(p) for p in e.get('loc', [])[1:]) or 'body'}: {e.get('msg')}" for e in errs]
        return JSONResponse({"error": "; ".join(parts), "notice": NOTICE}, status_code=422)

    @app.exception_handler(EngineUnavailable)
    async def unavailable(request: Request, exc: EngineUnavailable):
        return JSONResponse({"error": f"engine unavailable: {exc}", "notice": NOTICE}, status_code=503)

    errors = {401: {"model": Error}, 408: {"model": Error}, 413: {"model": Error}, 422: {"model": Error},
              503: {"model": Error}, 504: {"model": Error}}

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health():
        pool: EnginePool = app.state.pool
        checks = await asyncio.gather(*(pool.models(u) for u in pool.urls))
        engines = [{"url": u, "reachable": names is not None, "models": names or [], "served": pool.served[u]}
                   for u, names in zip(pool.urls, checks)]
        up = [e for e in engines if e["reachable"]]
        model_name = pool.model or (up[0]["models"][0] if up and up[0]["models"] else None)
        body = {"status": "ok" if up and model_name else "unavailable", "model": model_name,
                "engines": engines, "agent": agent is not None, "notice": NOTICE}
        return JSONResponse(body, status_code=200 if body["status"] == "ok" else 503)

    def _safety(answer: str) -> dict[str, Any]:
        try:
            from ..agent import safety
        except ImportError as e:
            raise HTTPException(501, "use_safety needs the agent's safety validator (medkit.agent, notebook 07)") from e
        return safety.validate(answer, {})[1]

    def _payload(req: GenerateRequest, name: str, stream: bool) -> dict[str, Any]:
        body = {"model": name, "messages": [{"role": "system", "content": system_prompt},
                                             {"role": "user", "content": req.question}],
                "max_tokens": req.max_length, "temperature": req.temperature, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    @app.post("/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)],
              responses={**errors, 200: {"content": {"text/event-stream": {}}}})
    async def generate(req: GenerateRequest):
        pool: EnginePool = app.state.pool
        name = await pool.resolve_model()
        t0 = time.perf_counter()
        if req.stream:
            return StreamingResponse(_sse(pool, req, name, t0), media_type="text/event-stream")
        try:
            url, r = await asyncio.wait_for(pool.post("/chat/completions", _payload(req, name, False)),
                                            timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the engine took longer than {limits.request_timeout_s:.0f} s")
        if r.status_code >= 400:
            # the engine refused the request (e.g. prompt longer than its context): say why
            status = 400 if r.status_code < 500 else 502
            raise HTTPException(status, f"engine answered {r.status_code}: {r.text[:300]}")
        data = r.json()
        answer = data["choices"][0]["message"]["content"] or ""
        ms = (time.perf_counter() - t0) * 1000
        return {"response": answer, "safety_report": _safety(answer) if req.use_safety else None,
                "inference_time_ms": round(ms, 1), "model": name, "engine": url,
                "usage": data.get("usage"), "notice": NOTICE}

    async def _sse(pool: EnginePool, req: GenerateRequest, name: str, t0: float):
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        text = ""
        try:
            async with pool.stream("/chat/completions", _payload(req, name, True)) as (url, resp):
                if resp.status_code >= 400:
                    body = (await resp.aread()).decode(errors="replace")
                    yield event({"error": f"engine answered {resp.status_code}: {body[:300]}", "notice": NOTICE})
                    return
                deadline = t0 + limits.request_timeout_s
                async for line in resp.aiter_lines():
                    if time.perf_counter() > deadline:
                        yield event({"error": "time limit reached", "notice": NOTICE})
                        return
                    if not line.startswith("data: ") or line.strip() == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices") or []:
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            text += delta
                            yield event({"delta": delta})
        except EngineUnavailable as e:
            yield event({"error": f"engine unavailable: {e}", "notice": NOTICE})
            return
        final = {"done": True, "response": text, "inference_time_ms": round((time.perf_counter() - t0) * 1000, 1),
                 "model": name, "engine": url, "notice": NOTICE}
        if req.use_safety:
            try:
                final["safety_report"] = _safety(text)
            except HTTPException as e:
                final["safety_report"] = {"error": e.detail}
        yield event(final)

    @app.post("/chat", dependencies=[Depends(require_key)], responses=errors)
    async def chat(req: ChatRequest):
        if agent is None:
            raise HTTPException(503, "no agent configured: start the gateway with an agent "
                                     "(medkit.agent.MedicalAgent, notebook 07)")
        try:
            reply = await asyncio.wait_for(agent.achat(req.message, patient_id=req.patient_id,
                                                       session_id=req.session_id),
                                           timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the agent took longer than {limits.request_timeout_s:.0f} s")
        out = reply.to_dict() if hasattr(reply, "to_dict") else dict(reply)
        out.setdefault("notice", NOTICE)
        return out

    app.add_middleware(_BodyGuard, limits=limits)
    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run with uvicorn; SIGTERM/SIGINT stop accepting, let in-flight requests finish (up to
    10 s), then close the engine pool."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=10,
                limit_concurrency=512, timeout_keep_alive=5)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="The medkit API gateway.")
    ap.add_argument("--engine-url", action="append", required=True,
                    help="OpenAI base URL of an engine (repeat for replicas)")
    ap.add_argument("--model", default=None)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-tokens-cap", type=int, default=Limits.max_tokens_cap)
    ap.add_argument("--request-timeout", type=float, default=Limits.request_timeout_s)
    ap.add_argument("--body-timeout", type=float, default=Limits.body_timeout_s)
    args = ap.parse_args(argv)
    limits = Limits(max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.request_timeout,
                    body_timeout_s=args.body_timeout)
    try:
        app = create_app(args.engine_url, args.model, api_key=os.environ.get("MEDKIT_API_KEY"),
                         host=args.host, limits=limits)
    except ValueError as e:
        raise SystemExit(f"medkit.serve.api: {e}")
    serve(app, args.host, args.port)


if __name__ == "__main__":
    main()
