"""Retrieval entry points for maintainers, printing JSON:

    python -m medkit.rag evaluate --data <MedQuAD-schema jsonl> [--rerank] [--limit N]   # each retriever's metrics
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
    ev.add_argument("--limit", type=int, default=None, help="score a seeded random sample of N rows")
    ev.add_argument("--rerank", action="store_true",
                    help="also score hybrid + rerank (lso: MiniLM fine-tuned per fold on the tuning sources only)")
    ev.add_argument("--protocol", choices=("auto", "lso", "split"), default="auto",
                    help="lso: leave one source out (needs a `source` per row; auto picks it when there are "
                         ">= 2 sources); split: one dev/test split grouped by focus")
    ev.add_argument("--tune-limit", type=int, default=1500, help="tuning questions per fold (fusion weight, reranker)")
    ev.add_argument("--rerank-method", choices=("encoder", "query-adapter"), default="encoder",
                    help="lso: MiniLM fine-tuned per fold (default) or the older query adapter")
    ev.add_argument("--rerank-steps", type=int, default=None,
                    help="lso encoder reranker: training steps per fold (its cost budget; "
                         "default: medkit.rag.lso.ENCODER_RERANK)")
    ev.add_argument("--rerank-pool", type=int, default=None, help="lso encoder reranker: hybrid candidates re-scored")
    ev.add_argument("--rerank-blend", type=float, default=None, help="lso encoder reranker: weight of the hybrid score")
    ev.add_argument("--rerank-max-tokens", type=int, default=None,
                    help="lso encoder reranker: tokens of each question and passage it reads (training and scoring)")
    ev.add_argument("--rerank-layers", type=int, default=None,
                    help="lso encoder reranker: top transformer layers fine-tuned (MiniLM has 6)")
    ev.add_argument("--compare-blends", default="", help="lso encoder reranker: other blends scored beside it, e.g. 0,0.2")
    ev.add_argument("--no-titles", action="store_true",
                    help="lso: index each answer alone, without the title (focus) of the page it comes from")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--embedder", default="offline-minilm:int8", help="offline-minilm[:int8] or a hub id")
    sc = sub.add_parser("scale", help="build time and query latency as the corpus grows (course chunks, copied)")
    sc.add_argument("--sizes", default="1000,10000,50000")
    sc.add_argument("--embedder", default="offline-minilm:int8")
    args = ap.parse_args(argv)

    if args.cmd == "scale":
        return _scale(args)

    import random

    from ..data import loaders
    from . import dense, evaluate, lso

    res = loaders.load("medquad", args.data)
    if not res.rows:
        print(json.dumps({"error": f"no usable rows in {args.data}", "dropped": res.drop_counts()}))
        return 2
    rows = res.rows
    if args.limit and args.limit < len(rows):  # a random sample: the file may be sorted by source
        rows = random.Random(args.seed).sample(rows, args.limit)
    sources = {r.get(lso.SOURCE_KEY) for r in rows}
    protocol = args.protocol
    if protocol == "auto":
        protocol = "lso" if len(sources - {None}) >= 2 and None not in sources else "split"
    out = {"data": args.data, "rows": len(rows), "dropped": res.drop_counts(), "protocol": protocol}
    encoder = dense.load_encoder(args.embedder)
    if protocol == "lso":
        try:
            lso.folds(rows)
        except ValueError as exc:
            print(json.dumps({"error": f"{args.data}: {exc}"}))
            return 2
        retriever, _ = lso.index(rows, encoder, dense.chroma_client(), titles=not args.no_titles)
        out["indexed"] = "answer" if args.no_titles else "page title + answer"
        rr_cfg = {"method": args.rerank_method, **{k: v for k, v in (("steps", args.rerank_steps), ("pool", args.rerank_pool),
                                                                       ("blend", args.rerank_blend),
                                                                       ("max_seq_length", args.rerank_max_tokens),
                                                                       ("train_layers", args.rerank_layers)) if v is not None},
                  "compare_blends": [float(b) for b in args.compare_blends.split(",") if b.strip()]}
        result = lso.run(rows, retriever, use_rerank=args.rerank, tune_limit=args.tune_limit, seed=args.seed,
                         log=lambda m: print(m, file=sys.stderr), reranker=rr_cfg)
        out.update(result, recall5_by_fold=lso.fold_table(result), recall1_by_fold=lso.fold_table(result, "recall@1"))
    else:
        out["results"] = evaluate.medquad_eval(rows, encoder, dense.chroma_client(), rerank_train=args.rerank,
                                               tune_limit=args.tune_limit, seed=args.seed)
    print(json.dumps(out, indent=2))
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
