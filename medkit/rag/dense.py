"""Dense retrieval: sentence-transformers embeddings stored in ChromaDB, embedded
(``PersistentClient``) by default or a chroma server (``HttpClient``) for users who outgrow one
process. Chroma is given our own embeddings, so it never downloads its default model."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..metrics import OFFLINE_MINILM, minilm_path


def load_encoder(name: str = OFFLINE_MINILM, device: str = "cpu"):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(minilm_path() if name == OFFLINE_MINILM else name, device=device)


def chroma_client(path: str | Path | None = None, host: str | None = None, port: int = 8000):
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host:
        return chromadb.HttpClient(host=host, port=port, settings=settings)
    if path is None:
        return chromadb.EphemeralClient(settings=settings)
    return chromadb.PersistentClient(path=str(path), settings=settings)


class DenseIndex:
    """``DenseIndex(chunks, encoder, client)`` embeds and stores the chunks; ``search`` returns
    (evidence id, cosine similarity) pairs."""

    def __init__(self, chunks: list[dict[str, Any]], encoder, client, collection: str = "medkit_passages",
                 batch_size: int = 256):
        self.encoder = encoder
        try:
            client.delete_collection(collection)
        except Exception:  # noqa: BLE001 - absent collection: nothing to delete
            pass
        self.col = client.create_collection(collection, embedding_function=None, metadata={"hnsw:space": "cosine"})
        for i in range(0, len(chunks), batch_size):
            part = chunks[i: i + batch_size]
            emb = encoder.encode([c["text"] for c in part], batch_size=64, normalize_embeddings=True,
                                 show_progress_bar=False)
            self.col.add(ids=[c["id"] for c in part], embeddings=emb.tolist(), documents=[c["text"] for c in part],
                         metadatas=[{"source_id": c.get("source_id", c["id"])} for c in part])

    def search(self, query: str, k: int = 10) -> list[tuple[str, float]]:
        emb = self.encoder.encode([query], normalize_embeddings=True, show_progress_bar=False)
        res = self.col.query(query_embeddings=emb.tolist(), n_results=min(k, self.col.count()))
        return [(i, 1.0 - float(d)) for i, d in zip(res["ids"][0], res["distances"][0])]
