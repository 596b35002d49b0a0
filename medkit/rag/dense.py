"""Dense retrieval: sentence-transformers embeddings stored in ChromaDB, embedded
(``PersistentClient``) by default or a chroma server (``HttpClient``) for users who outgrow one
process. Chroma is given our own embeddings, so it never downloads its default model."""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Any

from ..metrics import OFFLINE_MINILM, minilm_path


INT8 = ":int8"


def load_encoder(name: str = OFFLINE_MINILM, device: str = "cpu"):
    """A sentence-transformers encoder. ``offline-minilm`` is the all-MiniLM-L6-v2 copy shipped
    in a PyPI package (no download). A ``:int8`` suffix (``offline-minilm:int8``, the tiny
    profile's embedder) quantises every ``Linear`` layer to int8 with PyTorch's dynamic
    quantisation, CPU only: in 06_rag it embedded ~3x faster than fp32 with the same MedQuAD
    recall@5 (0.877 vs 0.876). The suffix is part of the embedder name, so the stored index's
    content hash tells int8 vectors from fp32 ones."""
    import warnings

    from sentence_transformers import SentenceTransformer

    base, int8 = (name[: -len(INT8)], True) if name.endswith(INT8) else (name, False)
    if int8 and device != "cpu":
        raise ValueError(f"embedder {name!r}: int8 dynamic quantisation runs on the CPU only (device {device!r})")
    model = SentenceTransformer(minilm_path() if base == OFFLINE_MINILM else base, device=device)
    if not int8:
        return model
    import torch

    with warnings.catch_warnings():  # torch 2.13 points eager-mode quantisation users to torchao
        warnings.simplefilter("ignore")
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    # the int8 kernels set themselves up per input length, on first use: do it here, one short
    # sequence per 4 lengths (~0.7 s), so that the first index build is not charged for it (06_rag
    # measured 298 docs/s for a first build without this and 344 with it)
    model.encode([" ".join(["word"] * n) for n in range(1, model.max_seq_length - 1, 4)], batch_size=1,
                 show_progress_bar=False)
    return model


def chroma_client(path: str | Path | None = None, host: str | None = None, port: int = 8000):
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host:
        return chromadb.HttpClient(host=host, port=port, settings=settings)
    if path is None:
        return chromadb.EphemeralClient(settings=settings)
    return chromadb.PersistentClient(path=str(path), settings=settings)


def content_hash(chunks: list[dict[str, Any]], embedder: str) -> str:
    """What the stored vectors depend on: the embedder's name and every chunk's id and text."""
    h = hashlib.sha256(embedder.encode())
    for c in chunks:
        h.update(b"\0" + str(c["id"]).encode() + b"\0" + str(c["text"]).encode())
    return h.hexdigest()[:16]


class DenseIndex:
    """``DenseIndex(chunks, encoder, client)`` embeds and stores the chunks; ``search`` returns
    (evidence id, cosine similarity) pairs.

    ``store_text=True`` also stores each chunk's text in chroma (for people who browse the
    collection directly); by default only ids, vectors and the source id are stored.

    With ``embedder`` given, the collection records the content hash of (embedder, ids, texts);
    ``reuse=True`` then keeps an existing collection whose hash and size match instead of
    embedding again. ``self.status`` says which happened: ``built``, ``reloaded`` or ``rebuilt``
    (with the reason in ``self.reason``)."""

    def __init__(self, chunks: list[dict[str, Any]], encoder, client, collection: str = "medkit_passages",
                 batch_size: int = 1024, embedder: str = "", reuse: bool = False, encode_batch: int = 16,
                 store_text: bool = False):
        self.encoder = encoder
        self.store_text = store_text
        self._qcache: dict[str, list[float]] = {}
        self.texts = {c["id"]: c["text"] for c in chunks}
        self.hash = content_hash(chunks, embedder or "unnamed")
        self.status, self.reason = "built", ""
        if reuse:
            existing = None
            try:
                existing = client.get_collection(collection)
            except Exception:  # noqa: BLE001 - no such collection yet
                self.reason = "no stored index"
            if existing is not None:
                stored = (existing.metadata or {}).get("content_hash")
                if stored == self.hash and existing.count() == len(chunks):
                    self.col, self.status = existing, "reloaded"
                    return
                self.status = "rebuilt"
                self.reason = ("content changed" if stored != self.hash
                               else f"stored index has {existing.count()} of {len(chunks)} vectors")
        try:
            client.delete_collection(collection)
        except Exception:  # noqa: BLE001 - absent collection: nothing to delete
            pass
        self.col = client.create_collection(collection, embedding_function=None,
                                            metadata={"hnsw:space": "cosine", "content_hash": self.hash})
        if not chunks:
            return
        # one encode call sorts every chunk by length, and small batches pad less
        emb = encoder.encode([c["text"] for c in chunks], batch_size=encode_batch, normalize_embeddings=True,
                             show_progress_bar=False)
        for i in range(0, len(chunks), batch_size):
            self.add(chunks[i: i + batch_size], emb[i: i + batch_size])

    def add(self, chunks: list[dict[str, Any]], embeddings) -> None:
        """Store chunks with embeddings computed elsewhere (the cost-growth benchmark reuses them)."""
        import numpy as np

        # chroma full-text-indexes stored documents; the retriever keeps the texts itself and never
        # queries that index, and leaving it out made the 1,876-chunk build ~10% faster
        extra = {"documents": [c["text"] for c in chunks]} if self.store_text else {}
        self.col.add(ids=[c["id"] for c in chunks], embeddings=np.asarray(embeddings, dtype=np.float32),
                     metadatas=[{"source_id": c.get("source_id", c["id"])} for c in chunks], **extra)
        self.texts.update({c["id"]: c["text"] for c in chunks})

    cache_queries = False  # evaluation turns it on: it asks each query in several modes

    def embed_query(self, query: str) -> list[float]:
        """The query's embedding (kept while ``cache_queries`` is on; latency is timed with it off)."""
        cache = self._qcache
        if not self.cache_queries:
            cache.clear()
            return self.encoder.encode([query], normalize_embeddings=True, show_progress_bar=False)[0].tolist()
        if query not in cache:
            if len(cache) > 512:
                cache.clear()
            cache[query] = self.encoder.encode([query], normalize_embeddings=True, show_progress_bar=False)[0].tolist()
        return cache[query]

    def vectors(self, ids: list[str]) -> dict:
        """The stored (normalised) vectors of ``ids`` as numpy arrays; unknown ids are left out."""
        import numpy as np

        got = self.col.get(ids=list(ids), include=["embeddings"])
        return {i: np.asarray(e, dtype=np.float32) for i, e in zip(got["ids"], got["embeddings"])}

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        n = self.col.count()
        return self.search_vector(self.embed_query(query), k, n) if n else []

    def search_vector(self, vector: list[float], k: int = 10, n: int | None = None) -> list[tuple[str, float]]:
        """``search`` for a query embedding made already (the evaluation embeds each question once);
        ``n``: the collection's size when the caller has just counted it."""
        n = self.col.count() if n is None else n
        if not n:
            return []
        res = self.col.query(query_embeddings=[vector], n_results=min(k, n))
        return [(i, 1.0 - float(d)) for i, d in zip(res["ids"][0], res["distances"][0])]


def remove_index(path: str | Path) -> None:
    """Delete a stored index (and forget chroma's cached client for it), so that the next
    ``open_index`` is a real build: 06_rag does this before it times one."""
    from chromadb.api.client import SharedSystemClient

    SharedSystemClient.clear_system_cache()
    shutil.rmtree(path, ignore_errors=True)


def open_index(chunks: list[dict[str, Any]], encoder, path: str | Path, embedder: str,
               collection: str = "medkit_passages", log=print) -> DenseIndex:
    """The persistent dense index under ``path``: reloaded without re-embedding when its content
    hash matches, otherwise (re)built. A store chroma cannot open (corrupt, or written by another
    version) is moved aside to ``<path>.corrupt`` and rebuilt; every case is reported via ``log``."""
    path = Path(path)
    try:
        client = chroma_client(path)
        index = DenseIndex(chunks, encoder, client, collection, embedder=embedder, reuse=True)
    except Exception as exc:  # noqa: BLE001 - any failure to open the store means: rebuild it
        aside = path.with_name(path.name + ".corrupt")
        shutil.rmtree(aside, ignore_errors=True)
        if path.exists():
            path.rename(aside)
        from chromadb.api.client import SharedSystemClient

        SharedSystemClient.clear_system_cache()  # chroma keeps one client per path per process
        log(f"dense index at {path} could not be opened ({type(exc).__name__}: {exc}); "
            f"moved it to {aside.name} and rebuilding")
        index = DenseIndex(chunks, encoder, chroma_client(path), collection, embedder=embedder)
        index.status, index.reason = "rebuilt", f"unreadable store: {type(exc).__name__}"
        return index
    if index.status == "reloaded":
        log(f"dense index at {path}: reloaded {len(chunks)} vectors (content hash {index.hash} unchanged)")
    else:
        log(f"dense index at {path}: {index.status} {len(chunks)} vectors"
            + (f" ({index.reason})" if index.reason else ""))
    return index


class ChromaServer:
    """A local chroma server (``chroma run``) for users who outgrow one process::

        with ChromaServer(path) as server:
            client = chroma_client(host=server.host, port=server.port)

    Waits for the heartbeat (raising with the log's tail on failure or timeout) and stops the
    server on exit."""

    def __init__(self, path: str | Path, host: str = "127.0.0.1", port: int | None = None, timeout: float = 60):
        self.path, self.host, self.timeout = Path(path), host, timeout
        self.port = port or _free_port()
        self.proc = None
        self.log_file = self.path.with_name(self.path.name + ".server.log")

    def __enter__(self) -> "ChromaServer":
        import subprocess
        import sys
        import time
        import urllib.request

        exe = Path(sys.executable).with_name("chroma")
        cmd = [str(exe) if exe.exists() else "chroma", "run", "--path", str(self.path), "--host", self.host,
               "--port", str(self.port)]
        self.path.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_file, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + self.timeout
        url = f"http://{self.host}:{self.port}/api/v2/heartbeat"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.__exit__()
                raise RuntimeError(f"chroma server exited with {self.proc.returncode}:\n{self._tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    return self
            except OSError:
                time.sleep(0.3)
        self.__exit__()
        raise TimeoutError(f"chroma server not healthy after {self.timeout:.0f} s:\n{self._tail()}")

    def _tail(self, n: int = 2000) -> str:
        return self.log_file.read_text(errors="replace")[-n:] if self.log_file.exists() else ""

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except Exception:  # noqa: BLE001 - did not stop in time
                self.proc.kill()
                self.proc.wait(5)
        if getattr(self, "_log", None):
            self._log.close()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
