"""The course's API backend: an async FastAPI gateway in front of OpenAI-compatible engines.

    GET  /health     the gateway is up, which engines answer and which model they serve
    POST /generate   the Phi-2 system's schema: question, temperature, max_length, use_safety
                     (+ patient_id) → response, safety_report, inference_time_ms (``stream: true``
                     → SSE); with ``use_safety`` the response is the validated text (emergency
                     instruction first, warnings added) and ``raw_response`` the model's own
    POST /chat       the agent (RAG, citations, triage, session id), when one is given

``/generate`` and the agent behind ``/chat`` share one safety path, ``medkit.agent.safety.check``:
the answer is validated in the context of the question and of the patient's memory.

Requests spread over N engine replicas (the least busy first; a replica that refuses a
connection is skipped). An API key is required whenever the gateway binds to anything but
loopback. Bodies, prompts, ``max_length`` and time per request are capped; slow clients that
trickle a body get 408. A question must fit the engine's context (a configured token budget, or
what the engine reports) or it answers 422. Chat-template control tokens in user text are
removed before the model sees them, and the answer says so. Every answer, errors included,
carries the "not medical advice" notice.

    python -m medkit.serve.api --engine-url http://127.0.0.1:8100/v1 --port 8000
"""

import argparse
import asyncio
import ipaddress
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

from .. import NOT_MEDICAL_ADVICE
from .pool import EnginePool, EngineUnavailable

NOTICE = NOT_MEDICAL_ADVICE

# Special tokens of the chat templates in use (ChatML/Qwen, Llama 3, Phi-3, Gemma, Mistral, GPT-2
# family): any ``<|name|>`` form plus the bracket/angle forms. Reasoning markers such as <think>
# are plain text to these tokenizers and are left alone.
_CONTROL = re.compile(r"<\|[^<>|\s]{1,48}\|>|<(?:start|end)_of_turn>|\[/?INST\]|\[/?SYS\]|</?s>|<<SYS>>|<</SYS>>"
                      r"|<(?:bos|eos|pad|unk)>", re.I)


def neutralise(text: str, extra_tokens: tuple[str, ...] = ()) -> tuple[str, list[str]]:
    """``text`` without chat-template control tokens (each replaced by a space, repeated until
    none is left, so pieces cannot join into a new one) and the tokens removed. ``extra_tokens``:
    more special tokens (e.g. the served tokenizer's ``all_special_tokens``)."""
    removed: list[str] = []
    while True:
        found = [m.group(0) for m in _CONTROL.finditer(text)] + [t for t in extra_tokens if t and t in text]
        if not found:
            return text, removed
        removed += found
        text = _CONTROL.sub(" ", text)
        for t in extra_tokens:
            if t:
                text = text.replace(t, " ")


def key_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of API keys as UTF-8 bytes: any text (non-ASCII, control
    characters) is just a wrong key, never an error."""
    if not given:
        return False
    try:
        return secrets.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))
    except (TypeError, UnicodeError):
        return False


@dataclass
class Limits:
    max_body_bytes: int = 16_384
    max_question_chars: int = 2_000
    max_tokens_cap: int = 256
    context_tokens: int | None = None  # the engine's context; None: ask the engine (vLLM says it)
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
               host: str = "127.0.0.1", limits: Limits | None = None, system_prompt: str | None = None,
               patient_memory=None, control_tokens: tuple[str, ...] | list[str] = (), transport=None):
    """The gateway app. ``engine_url``: one OpenAI base URL (``…/v1``) or a list of replicas.
    ``agent``: an object with ``async achat(message, patient_id=, session_id=)`` (``medkit.agent.
    MedicalAgent``) for ``/chat``; without one ``/chat`` answers 503. ``api_key`` is required
    when ``host`` is not loopback (ValueError otherwise). ``patient_memory``: ``patient_id →
    memory dict`` for ``/generate``'s safety check (default: the agent's ``memory``).
    ``control_tokens``: special tokens of the served tokenizer to remove from user text, on top
    of the usual chat-template ones. ``transport``: an httpx transport to the engines (tests)."""
    from contextlib import AsyncExitStack, asynccontextmanager

    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.security import APIKeyHeader
    from pydantic import BaseModel, Field
    from starlette.background import BackgroundTask
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from ..train.common import SYSTEM_PROMPT

    limits = limits or Limits()
    if not is_loopback(host) and not api_key:
        raise ValueError(f"the gateway binds to {host!r}, not loopback: give it an api_key "
                         f"(or set MEDKIT_API_KEY); only loopback may run without one")
    urls = [engine_url] if isinstance(engine_url, str) else list(engine_url)
    system_prompt = system_prompt or SYSTEM_PROMPT
    extra_tokens = tuple(t for t in control_tokens if t)
    if patient_memory is None and agent is not None and hasattr(agent, "memory"):
        patient_memory = agent.memory

    class GenerateRequest(BaseModel):
        question: str = Field(..., min_length=1, max_length=limits.max_question_chars,
                              description="The user's medical question.")
        temperature: float = Field(0.0, ge=0.0, le=2.0)
        max_length: int = Field(128, ge=1, le=limits.max_tokens_cap, description="Most new tokens to generate.")
        use_safety: bool = Field(False, description="Validate the answer (emergencies, interactions, allergies, "
                                                    "doses) in the context of the question; the response is then "
                                                    "the validated text.")
        patient_id: str | None = Field(None, min_length=1, max_length=128,
                                       description="With use_safety: also check against this patient's memory.")
        stream: bool = Field(False, description="Answer as server-sent events.")

    class GenerateResponse(BaseModel):
        response: str = Field(..., description="The answer; with use_safety, the validated text.")
        raw_response: str | None = Field(None, description="With use_safety: the model's own text.")
        safety_report: dict[str, Any] | None
        inference_time_ms: float
        model: str
        engine: str
        usage: dict[str, Any] | None = None
        input_warnings: list[str] = Field(default_factory=list,
                                          description="What was changed in the question before the model saw it.")
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
        app.state.pool = EnginePool(urls, model, timeout_s=limits.request_timeout_s, transport=transport)
        yield
        await app.state.pool.aclose()  # graceful shutdown: uvicorn has let in-flight requests finish

    app = FastAPI(title="medkit API", version="0.1.0", lifespan=lifespan,
                  description="Gateway to the course's medical assistant. " + NOTICE)
    key_header = APIKeyHeader(name="X-API-Key", auto_error=False)

    async def require_key(key: str | None = Depends(key_header)) -> None:
        if api_key and not key_matches(key, api_key):
            raise HTTPException(401, "missing or wrong API key (header X-API-Key)")

    @app.exception_handler(StarletteHTTPException)  # FastAPI's HTTPException, 404 and 405 alike
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail), "notice": NOTICE}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

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

    @app.exception_handler(Exception)
    async def crashed(request: Request, exc: Exception):
        return JSONResponse({"error": f"internal error ({type(exc).__name__})", "notice": NOTICE}, status_code=500)

    errors = {401: {"model": Error}, 404: {"model": Error}, 408: {"model": Error}, 413: {"model": Error},
              422: {"model": Error}, 503: {"model": Error}, 504: {"model": Error}}

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

    # ------------------------------------------------------------ the one safety path
    def _safety_module():
        try:
            from ..agent import safety
        except ImportError as e:
            raise HTTPException(501, "use_safety needs the agent's safety validator (medkit.agent, notebook 07)") from e
        return safety

    async def _memory(patient_id: str | None) -> dict[str, Any] | None:
        if patient_id is None:
            return None
        if patient_memory is None:
            raise HTTPException(503, "patient_id needs patient memory: start the gateway with an agent "
                                     "(medkit.agent.MedicalAgent) or a patient_memory lookup")
        return await asyncio.to_thread(patient_memory, patient_id)

    def _validated(answer: str, question: str, mem: dict[str, Any] | None) -> tuple[str, dict[str, Any]]:
        """``medkit.agent.safety.check``: the path the agent behind /chat takes too."""
        text, report = _safety_module().check(answer, question, mem)
        return text, report

    # ------------------------------------------------------------ input checks
    def _clean(text: str, field_name: str) -> tuple[str, list[str]]:
        cleaned, removed = neutralise(text, extra_tokens)
        if not removed:
            return text, []
        cleaned = " ".join(cleaned.split())
        if not cleaned:
            raise HTTPException(422, f"{field_name}: nothing left once chat-template control tokens were removed")
        shown = ", ".join(dict.fromkeys(removed))
        return cleaned, [f"removed {len(removed)} chat-template control token(s) from the {field_name}: {shown}"]

    def _messages(question: str) -> list[dict[str, str]]:
        return [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}]

    async def _check_context(pool: EnginePool, name: str, question: str, max_length: int) -> None:
        """422 when the prompt plus ``max_length`` cannot fit the engine's context. The prompt
        is counted by the engine when it can (vLLM's /tokenize), else estimated at one token per
        3 UTF-8 bytes plus 16 for the template: about right for large-vocabulary tokenizers on
        English, short for small vocabularies (the engine's own refusal then still answers 400)."""
        counted = await pool.count_prompt(name, _messages(question))
        context = limits.context_tokens or await pool.context_length()
        if not context:
            return
        if counted is not None:
            prompt, how = counted, "counted by the engine"
        else:
            prompt = -(-len(system_prompt.encode()) // 3) - (-len(question.encode()) // 3) + 16
            how = "estimated at one token per 3 bytes"
        if prompt + max_length > context:
            base = (await pool.count_prompt(name, _messages("")) if counted is not None else None)
            base = base if base is not None else -(-len(system_prompt.encode()) // 3) + 16
            room = max(context - max_length - base, 0)
            raise HTTPException(422, f"question: too long for the engine's context of {context} tokens: the prompt "
                                     f"is {prompt} tokens ({how}) and max_length asks for {max_length} more; at "
                                     f"most {room} tokens of question fit (shorten it or lower max_length)")

    def _payload(question: str, req: GenerateRequest, name: str, stream: bool) -> dict[str, Any]:
        body = {"model": name, "messages": _messages(question),
                "max_tokens": req.max_length, "temperature": req.temperature, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _engine_refused(status_code: int, text: str) -> HTTPException:
        # the engine refused the request (e.g. prompt longer than its context): say why
        return HTTPException(400 if status_code < 500 else 502, f"engine answered {status_code}: {text[:300]}")

    @app.post("/generate", response_model=GenerateResponse, dependencies=[Depends(require_key)],
              responses={**errors, 200: {"content": {"text/event-stream": {}}}})
    async def generate(req: GenerateRequest):
        pool: EnginePool = app.state.pool
        question, notes = _clean(req.question, "question")
        mem = await _memory(req.patient_id) if req.use_safety else None
        if req.use_safety:
            _safety_module()  # 501 now, not after the engine has worked
        name = await pool.resolve_model()
        await _check_context(pool, name, question, req.max_length)
        t0 = time.perf_counter()
        if req.stream:
            stack = AsyncExitStack()
            try:
                url, resp = await asyncio.wait_for(
                    stack.enter_async_context(pool.stream("/chat/completions", _payload(question, req, name, True))),
                    timeout=limits.request_timeout_s)
            except asyncio.TimeoutError:
                await stack.aclose()
                raise HTTPException(504, f"the engine took longer than {limits.request_timeout_s:.0f} s")
            except BaseException:
                await stack.aclose()
                raise  # EngineUnavailable → 503 before any byte of the stream
            if resp.status_code >= 400:
                body = (await resp.aread()).decode(errors="replace")
                await stack.aclose()
                raise _engine_refused(resp.status_code, body)
            return StreamingResponse(_sse(stack, url, resp, req, question, mem, notes, name, t0),
                                     media_type="text/event-stream", background=BackgroundTask(stack.aclose))
        try:
            url, r = await asyncio.wait_for(pool.post("/chat/completions", _payload(question, req, name, False)),
                                            timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the engine took longer than {limits.request_timeout_s:.0f} s")
        if r.status_code >= 400:
            raise _engine_refused(r.status_code, r.text)
        data = r.json()
        answer = data["choices"][0]["message"]["content"] or ""
        ms = (time.perf_counter() - t0) * 1000
        out = {"response": answer, "raw_response": None, "safety_report": None, "inference_time_ms": round(ms, 1),
               "model": name, "engine": url, "usage": data.get("usage"), "input_warnings": notes, "notice": NOTICE}
        if req.use_safety:
            out["response"], out["safety_report"] = _validated(answer, question, mem)
            out["raw_response"] = answer
        return out

    async def _sse(stack, url: str, resp, req: GenerateRequest, question: str, mem: dict[str, Any] | None,
                   notes: list[str], name: str, t0: float):
        def event(obj: dict[str, Any]) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        text = ""
        try:
            if notes:
                yield event({"input_warnings": notes})
            if req.use_safety:  # the question alone decides an emergency: say so before any model text
                _, pre = _validated("", question, mem)
                if pre["emergency"]:
                    yield event({"emergency": True, "instruction": pre["emergency_instruction"]})
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
        finally:
            await stack.aclose()
        final = {"done": True, "response": text, "inference_time_ms": round((time.perf_counter() - t0) * 1000, 1),
                 "model": name, "engine": url, "input_warnings": notes, "notice": NOTICE}
        if req.use_safety:
            final["response"], final["safety_report"] = _validated(text, question, mem)
            final["raw_response"] = text
        yield event(final)

    @app.post("/chat", dependencies=[Depends(require_key)], responses=errors)
    async def chat(req: ChatRequest):
        if agent is None:
            raise HTTPException(503, "no agent configured: start the gateway with an agent "
                                     "(medkit.agent.MedicalAgent, notebook 07)")
        message, notes = _clean(req.message, "message")
        try:  # the agent validates its answer with medkit.agent.safety.check, /generate's path
            reply = await asyncio.wait_for(agent.achat(message, patient_id=req.patient_id,
                                                       session_id=req.session_id),
                                           timeout=limits.request_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(504, f"the agent took longer than {limits.request_timeout_s:.0f} s")
        out = reply.to_dict() if hasattr(reply, "to_dict") else dict(reply)
        out["input_warnings"] = notes
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
    ap.add_argument("--context-tokens", type=int, default=None,
                    help="the engine's context in tokens (default: ask the engine; vLLM reports it)")
    args = ap.parse_args(argv)
    if args.context_tokens is not None and args.context_tokens < 2:
        raise SystemExit(f"medkit.serve.api: --context-tokens must be at least 2, got {args.context_tokens}")
    limits = Limits(max_tokens_cap=args.max_tokens_cap, request_timeout_s=args.request_timeout,
                    body_timeout_s=args.body_timeout, context_tokens=args.context_tokens)
    try:
        app = create_app(args.engine_url, args.model, api_key=os.environ.get("MEDKIT_API_KEY"),
                         host=args.host, limits=limits)
    except ValueError as e:
        raise SystemExit(f"medkit.serve.api: {e}")
    serve(app, args.host, args.port)


if __name__ == "__main__":
    main()
