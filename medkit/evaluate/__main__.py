"""Score any model folder on one benchmark and print JSON.

    python -m medkit.evaluate --model outputs/runs/<run>/02_sft/model/merged \\
        --bench pubmedqa --data ../shared/data/pubmedqa_pqal.jsonl --limit 100 [--with-context]
    python -m medkit.evaluate --model <dir> --bench mmlu --data ../shared/data/mmlu_medical_devval.jsonl

Benchmarks: pubmedqa (PQA-L test split, yes/no/maybe), mmlu (medical subjects), medmcqa (dev),
kqa (must-have statements). Exit 2 with a one-line message on bad input (missing file, wrong
schema, a folder that is not a model or has no tokenizer/chat template).
"""
from __future__ import annotations

import argparse
import sys

from .. import NOT_MEDICAL_ADVICE
from . import bench


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medkit.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder (or a hub id with --allow-hub)")
    ap.add_argument("--bench", required=True, choices=sorted(bench.BENCHMARKS))
    ap.add_argument("--data", required=True, help="the benchmark file (or a hub id with --allow-hub)")
    ap.add_argument("--limit", type=int, default=None, help="score the first N items")
    ap.add_argument("--generate", type=int, default=0, help="also answer the first N by generation (strict extraction)")
    ap.add_argument("--with-context", action="store_true", help="pubmedqa: give each question its own abstract")
    ap.add_argument("--context-words", type=int, default=150)
    ap.add_argument("--allow-hub", action="store_true", help="read --model/--data by Hugging Face id")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    from ..config import detect_device, pick_dtype

    device = detect_device(args.device)
    try:
        scorer = bench.load_scorer(args.model, dtype=pick_dtype(device), device=device)
        result = bench.run_benchmark(scorer, args.bench, args.data, args.limit, args.generate,
                                     args.with_context, args.context_words, args.allow_hub)
    except (bench.BenchmarkError, bench.BenchmarkMissing, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result["notice"] = NOT_MEDICAL_ADVICE
    print(bench.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
