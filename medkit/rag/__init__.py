"""Retrieval for the course: chunks with stable evidence ids, BM25 (bm25s) with a medical-aware
tokenizer, dense retrieval (sentence-transformers) stored in ChromaDB, reciprocal-rank and
weighted score fusion, lay → clinical query rewriting, lexicon NER, and retrieval metrics."""
