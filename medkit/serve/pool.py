"""Replicas of an OpenAI-compatible engine behind one client: each call goes to the replica with
the fewest requests in flight; one that refuses connections is skipped and tried last."""
import contextlib
from typing import Any


class EngineUnavailable(RuntimeError):
    """No replica could be reached."""


class EnginePool:
    """N OpenAI-compatible engines; each call goes to the replica with the fewest requests in
    flight (ties: round robin). A replica that cannot be reached is tried last next time."""

    def __init__(self, urls: list[str], model: str | None = None, timeout_s: float = 60.0, transport=None):
        """``transport``: an httpx transport for every call (tests put a fake engine here)."""
        import httpx

        if not urls:
            raise ValueError("EnginePool: at least one engine URL is needed")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.in_flight = {u: 0 for u in self.urls}
        self.served = {u: 0 for u in self.urls}
        self.failures = {u: 0 for u in self.urls}
        self._turn = 0
        self.client = httpx.AsyncClient(timeout=timeout_s, limits=httpx.Limits(max_connections=256),
                                        transport=transport)
        self.context: int | None = None  # the engine's context length, once an engine has said it
        self._tokenize_ok = True         # False once an engine has no /tokenize (not vLLM)
        self._context_unknown = False    # True once an engine answered /v1/models without max_model_len

    def order(self) -> list[str]:
        self._turn += 1
        n = len(self.urls)
        rotated = [self.urls[(self._turn + i) % n] for i in range(n)]
        return sorted(rotated, key=lambda u: (self.failures[u] > 0, self.in_flight[u]))

    async def models(self, url: str) -> list[str] | None:
        try:
            r = await self.client.get(url + "/models", timeout=3.0)
            r.raise_for_status()
            return [m["id"] for m in r.json().get("data", [])]
        except Exception:
            return None

    async def context_length(self) -> int | None:
        """The engine's context in tokens (``max_model_len`` of vLLM's /v1/models), or None
        when no engine says it."""
        if self.context is None and not self._context_unknown:
            for url in self.urls:
                try:
                    r = await self.client.get(url + "/models", timeout=3.0)
                    r.raise_for_status()
                    lens = [m.get("max_model_len") for m in r.json().get("data", []) if isinstance(m, dict)]
                except Exception:
                    continue
                lens = [n for n in lens if isinstance(n, int) and n > 0]
                if lens:
                    self.context = min(lens)
                else:
                    self._context_unknown = True  # an engine answered without saying: do not ask again
                break
        return self.context

    async def count_prompt(self, model: str, messages: list[dict[str, str]]) -> int | None:
        """Tokens of the chat prompt as the engine renders it (vLLM's ``POST /tokenize`` with
        the messages and the generation prompt), or None when no engine offers it."""
        if not self._tokenize_ok:
            return None
        for url in self.order():
            root = url[:-3] if url.endswith("/v1") else url
            try:
                r = await self.client.post(root + "/tokenize", json={"model": model, "messages": messages,
                                                                      "add_generation_prompt": True}, timeout=5.0)
            except Exception:
                continue
            if r.status_code in (404, 405):
                self._tokenize_ok = False
                return None
            try:
                body = r.json()
                if isinstance(body.get("max_model_len"), int) and self.context is None:
                    self.context = body["max_model_len"]
                return int(body["count"])
            except Exception:
                return None
        return None

    async def resolve_model(self) -> str:
        if self.model:
            return self.model
        for url in self.urls:
            names = await self.models(url)
            if names:
                self.model = names[0]
                return self.model
        raise EngineUnavailable("no engine answered /v1/models")

    async def _send(self, path: str, payload: dict[str, Any], stream: bool) -> tuple[str, Any]:
        """Send to the first replica that accepts the connection; returns (url, response). The
        replica's in-flight count is raised here and lowered by the caller when it is done."""
        import httpx

        last: Exception | None = None
        for url in self.order():
            self.in_flight[url] += 1
            try:
                req = self.client.build_request("POST", url + path, json=payload)
                resp = await self.client.send(req, stream=stream)
            except (httpx.ConnectError, httpx.RemoteProtocolError) as e:
                self.in_flight[url] -= 1
                self.failures[url] += 1
                last = e
                continue
            except BaseException:
                self.in_flight[url] -= 1
                raise
            self.failures[url] = 0
            self.served[url] += 1
            return url, resp
        raise EngineUnavailable(f"no engine replica reachable ({last})")

    async def post(self, path: str, payload: dict[str, Any]) -> tuple[str, Any]:
        """POST to the first replica that accepts the connection; returns (url, response)."""
        url, resp = await self._send(path, payload, stream=False)
        self.in_flight[url] -= 1
        return url, resp

    @contextlib.asynccontextmanager
    async def stream(self, path: str, payload: dict[str, Any]):
        """``async with pool.stream(path, payload) as (url, response)``: a streamed POST on the
        first reachable replica, counted in flight until the block ends (so least-loaded
        balancing sees streams too); the response is closed on the way out."""
        url, resp = await self._send(path, payload, stream=True)
        try:
            yield url, resp
        finally:
            self.in_flight[url] -= 1
            await resp.aclose()

    async def aclose(self) -> None:
        await self.client.aclose()
