"""Serving (notebook 09): engines, GGUF, the API gateway and the load benchmark.

* :mod:`.engines`     start/stop vLLM, llama.cpp's server and the HF reference servers as child
                      processes (health wait with a timeout, the log's tail on failure, no orphans)
* :mod:`.hf_server`   HF baselines with the OpenAI chat API: ``naive`` (one at a time) and
                      ``batch`` (static batching)
* :mod:`.gguf_export` merged model → GGUF (f16, q8_0) and a transformers ↔ llama.cpp parity check
* :mod:`.api`         the async FastAPI gateway: ``/health``, ``/generate``, ``/chat``, SSE,
                      API key off loopback, limits, graceful shutdown, N replicas
* :mod:`.pool`        replicas behind one client (least requests in flight first)
* :mod:`.loadtest`    the load benchmark (``python -m medkit.serve.loadtest``) and its model

Only :mod:`.engines` is imported here: the rest load FastAPI, transformers or llama.cpp when used.
"""
from . import engines  # noqa: F401
