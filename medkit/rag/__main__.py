"""Retrieval entry points for maintainers, printing JSON:

    python -m medkit.rag evaluate --data <MedQuAD-schema jsonl> [--limit N]   # each retriever's metrics
    python -m medkit.rag scale --sizes 1000,10000,50000                       # cost growth with corpus size
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medkit.rag")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ev = sub.add_parser("evaluate", help="each question must retrieve its own answer")
    ev.add_argument("--data", required=True, help="jsonl/csv/parquet with question and answer fields")
    ev.add_argument("--limit", type=int, default=None)
    ev.add_argument("--embedder", default="offline-minilm:int8", help="offline-minilm[:int8] or a hub id")
    sc = sub.add_parser("scale", help="build time and query latency as the corpus grows (course chunks, copied)")
    sc.add_argument("--sizes", default="1000,10000,50000")
    sc.add_argument("--embedder", default="offline-minilm:int8")
    args = ap.parse_args(argv)

    if args.cmd == "scale":
        return _scale(args)

    from ..data import loaders
    from . import dense, evaluate

    res = loaders.load("medquad", args.data)
    if not res.rows:
        print(json.dumps({"error": f"no usable rows in {args.data}", "dropped": res.drop_counts()}))
        return 2
    table = evaluate.medquad_eval(res.rows, dense.load_encoder(args.embedder), dense.chroma_client(), args.limit)
    print(json.dumps({"data": args.data, "rows": len(res.rows[: args.limit] if args.limit else res.rows),
                      "dropped": res.drop_counts(), "results": table}, indent=2))
    return 0


def _scale(args) -> int:
    from .. import kb as knowledge_base
    from ..data import generate
    from . import dense, scale, text

    kb = knowledge_base.load()
    chunks = text.chunk(generate.passages(kb))
    queries = [c["text"].split(".")[0] for c in chunks[::7]]
    rows = scale.measure(chunks, dense.load_encoder(args.embedder), queries,
                         [int(s) for s in args.sizes.split(",")], log=lambda m: print(m, file=sys.stderr))
    print(json.dumps({"sizes": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
