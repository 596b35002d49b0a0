"""Does a model cite its evidence? Held-out QA questions, each with its passage and two distractors
in 06's prompt format (``medkit.train.grounded``), answered greedily and checked by 06's citation
check (``grounded.citation_report``). Prints each answer, the target and whether the check passes.

    .venv/bin/python scripts/smol_cite_probe.py <model folder> [<run folder>] [n]
"""
import glob
import sys

from medkit import kb as knowledge_base
from medkit.data import pipeline
from medkit.train import common, grounded


def main(model: str, run: str = "outputs/latest", n: int = 10) -> None:
    data = glob.glob(f"{run}/01_data/datasets/v1-*")[0]
    rows = grounded.grounded_rows(pipeline.load_split(data, "qa", "test"), pipeline.load_split(data, "passages", "all"),
                                  n, knowledge_base.load(), abstain_share=0.0, seed=5)
    m, tok = common.load_causal_lm(model, "float32", "cpu")
    rep = grounded.citation_report(m, tok, rows, max_new_tokens=80)
    for r, text, check in zip(rows, rep["texts"], rep["checks"]):
        print(f"{text[:200]!r}\n   target: {r['answer'][:120]!r}  valid: {check['valid']}")
    print(f"citation check passed on {sum(c['valid'] for c in rep['checks'])} of {rep['n']} held-out evidence prompts")


if __name__ == "__main__":
    main(sys.argv[1], *(sys.argv[2:3] or ["outputs/latest"]), *(int(x) for x in sys.argv[3:4]))
