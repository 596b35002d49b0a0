"""python -m medkit.rag evaluate --data <MedQuAD-schema jsonl> [--limit N]: retrieval metrics as JSON."""
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
    ev.add_argument("--embedder", default="offline-minilm")
    args = ap.parse_args(argv)

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


if __name__ == "__main__":
    sys.exit(main())
