"""Start, wait for and stop an inference engine that speaks the OpenAI API.

Every back end of the course (vLLM, llama.cpp's server, the HF reference servers) runs as a
child process in its own process group, so ``stop()`` ends the engine and every worker it
spawned. ``start()`` waits for ``GET /v1/models`` with a timeout and, when the engine dies or
never answers, raises :class:`EngineError` with the tail of its log.

    with EngineServer(vllm_command(model_dir, port=8100), port=8100, name="vllm") as eng:
        eng.url  # http://127.0.0.1:8100/v1
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .. import paths


class EngineError(RuntimeError):
    """An engine failed to start or answer; the message ends with its log's tail."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:])


def vllm_python() -> str:
    """The interpreter that has vLLM: ``$MEDKIT_VLLM_PYTHON``, else the serving environment
    ``.venv-serve`` that ``make setup`` builds, else this interpreter (a GPU machine or Colab
    where ``pip install vllm`` went into the course environment)."""
    env = os.environ.get("MEDKIT_VLLM_PYTHON")
    if env:
        return env
    local = paths.repo_root() / ".venv-serve" / "bin" / "python"
    return str(local) if local.exists() else sys.executable


def vllm_command(model: str | Path, port: int, served_model_name: str = "medkit",
                 max_model_len: int = 256, dtype: str = "auto", tensor_parallel_size: int = 1,
                 pipeline_parallel_size: int = 1, max_num_seqs: int = 64, host: str = "127.0.0.1",
                 python: str | None = None, extra: list[str] | None = None,
                 enforce_eager: bool = False) -> list[str]:
    """The command line of vLLM's OpenAI-compatible server. ``dtype``: ``bfloat16`` where the
    GPU has it, ``float16`` on a T4, ``float32``/``bfloat16`` on the CPU (see
    :func:`medkit.config.pick_dtype`). Tensor/pipeline parallel sizes > 1 need that many GPUs
    (or nodes, with a Ray cluster; see README "Serving beyond one machine").

    ``enforce_eager``: no ``torch.compile`` of the model at start-up (and no CUDA graphs on a
    GPU). On the 2-core CPU the compile took 54 of SmolLM2's 77 s start-up and bought 11% more
    throughput at 32 clients (149 against 133 tokens/s; scratch probe, 2026-12-07)."""
    for name, value in (("max_model_len", max_model_len), ("tensor_parallel_size", tensor_parallel_size),
                        ("pipeline_parallel_size", pipeline_parallel_size), ("max_num_seqs", max_num_seqs)):
        if int(value) < 1:
            raise ValueError(f"vllm_command: {name} must be >= 1, got {value}")
    return [python or vllm_python(), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model), "--served-model-name", served_model_name,
            "--host", host, "--port", str(port), "--max-model-len", str(max_model_len),
            "--dtype", dtype, "--tensor-parallel-size", str(tensor_parallel_size),
            "--pipeline-parallel-size", str(pipeline_parallel_size),
            "--max-num-seqs", str(max_num_seqs), "--disable-log-stats"] + (
        ["--enforce-eager"] if enforce_eager else []) + list(extra or [])


def vllm_env(kv_cache_gib: int = 1, threads: int | None = None) -> dict[str, str]:
    """Environment for vLLM on the CPU: a small KV cache (GiB) and the OpenMP threads."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib), "VLLM_TARGET_DEVICE": "cpu"}
    if threads:
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{threads - 1}"
    return env


def llamacpp_command(gguf_path: str | Path, port: int, served_model_name: str = "medkit",
                     n_ctx: int = 512, threads: int | None = None, host: str = "127.0.0.1") -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on a GGUF file (chat template from the file).
    Its default lets a new request interrupt the one streaming; here requests queue instead."""
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--model_alias",
           served_model_name, "--host", host, "--port", str(port), "--n_ctx", str(n_ctx),
           "--interrupt_requests", "False"]
    if threads:
        cmd += ["--n_threads", str(threads)]
    return cmd


def hf_command(model: str | Path, port: int, mode: str = "naive", served_model_name: str = "medkit",
               max_batch: int = 32, threads: int | None = None, host: str = "127.0.0.1",
               device: str = "cpu", dtype: str | None = None) -> list[str]:
    """The course's HF reference server (:mod:`medkit.serve.hf_server`) on ``device`` (the GPU
    on GPU profiles, where vLLM runs too) in ``dtype`` (None: the device's)."""
    cmd = [sys.executable, "-m", "medkit.serve.hf_server", "--model", str(model), "--mode", mode,
           "--served-model-name", served_model_name, "--host", host, "--port", str(port),
           "--max-batch", str(max_batch), "--device", device]
    if dtype:
        cmd += ["--dtype", dtype]
    if threads:
        cmd += ["--threads", str(threads)]
    return cmd


class EngineServer:
    """A child-process engine: ``start()`` → waits for health; ``stop()`` → SIGTERM to the
    process group, SIGKILL after ``stop_timeout`` s. Use it as a context manager."""

    def __init__(self, command: list[str], port: int, name: str = "engine", log_path: str | Path | None = None,
                 env: dict[str, str] | None = None, host: str = "127.0.0.1", start_timeout: float = 300.0,
                 stop_timeout: float = 20.0, health_path: str = "/v1/models"):
        self.command, self.port, self.name, self.host = list(command), int(port), name, host
        self.log_path = Path(log_path) if log_path else paths.cache_dir() / "serve-logs" / f"{name}-{port}.log"
        self.env = dict(env or {})
        self.start_timeout, self.stop_timeout = start_timeout, stop_timeout
        self.health_path = health_path
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL (``…/v1``)."""
        return self.base_url + "/v1"

    def _healthy(self) -> bool:
        import httpx

        try:
            return httpx.get(self.base_url + self.health_path, timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def start(self) -> "EngineServer":
        if self.proc is not None and self.proc.poll() is None:
            return self
        with socket.socket() as s:
            if s.connect_ex((self.host, self.port)) == 0:
                raise EngineError(f"{self.name}: port {self.port} is already in use; pick another (free_port()).")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "wb")
        t0 = time.perf_counter()
        try:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **self.env},
                                         start_new_session=True)
        except OSError as e:
            log.close()
            raise EngineError(f"{self.name}: could not run {self.command[0]}: {e}") from e
        log.close()
        deadline = t0 + self.start_timeout
        while time.perf_counter() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.proc = None
                raise EngineError(f"{self.name} exited with code {code} before it was healthy. "
                                  f"Log tail ({self.log_path}):\n{log_tail(self.log_path)}")
            if self._healthy():
                self.startup_s = time.perf_counter() - t0
                return self
            time.sleep(0.5)
        self.stop()
        raise EngineError(f"{self.name} was not healthy after {self.start_timeout:.0f} s. "
                          f"Log tail ({self.log_path}):\n{log_tail(self.log_path)}")

    def stop(self) -> int | None:
        """End the engine and its process group; returns the exit code (None if not running)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=self.stop_timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        # workers that outlived their parent in the same group
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return proc.returncode

    def __enter__(self) -> "EngineServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
