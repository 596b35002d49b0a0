"""SFT from the command line, for ``accelerate launch`` (multi-process, multi-GPU, FSDP).

    accelerate launch --config_file configs/accelerate/ddp_2gpu.yaml -m medkit.train.sft_cli --profile gpu-24gb
    python -m medkit.train.sft_cli --base <model dir> --train-file qa.jsonl --max-steps 20 --out /tmp/sft

With ``--weights-report`` every rank writes a hash of its trainable weights to
``<out>/weights-rank<N>.txt``; identical hashes mean the ranks stayed in sync.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m medkit.train.sft_cli")
    ap.add_argument("--profile", default="tiny")
    ap.add_argument("--base", help="model folder or hub id (default: the profile's base via the latest 01_data run)")
    ap.add_argument("--train-file", help="QA jsonl (default: the latest 01_data QA train split)")
    ap.add_argument("--max-steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--out", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--weights-report", action="store_true")
    args = ap.parse_args(argv)

    from .. import config, notebook
    from ..data import pipeline
    from . import common, sft

    cfg = config.resolve(args.profile, "sft", max_steps=args.max_steps, batch_size=args.batch_size, seed=args.seed)
    session = notebook.start("sft_cli", args.profile, args.seed, quiet=True)
    base = args.base or common.resolve_model_ref(cfg["base_model"], session)
    if args.train_file:
        rows = [json.loads(line) for line in Path(args.train_file).read_text().split("\n") if line.strip()]
    else:
        rows = pipeline.load_split(session.get("datasets"), "qa", "train")
    out = Path(args.out or session.dir / "checkpoints")
    model, tok = common.load_causal_lm(base, cfg["dtype"])  # the Trainer places it on its device
    trainer = sft.make_trainer(model, tok, rows, rows[:32], cfg, out, eval_strategy="no", save_strategy="no")
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    if args.weights_report:
        h = hashlib.sha256()
        for name, p in sorted(trainer.model.named_parameters()):
            if p.requires_grad:
                h.update(name.encode())
                h.update(p.detach().cpu().float().numpy().tobytes())
        out.mkdir(parents=True, exist_ok=True)
        world = os.environ.get("WORLD_SIZE", "1")
        (out / f"weights-rank{rank}.txt").write_text(f"{h.hexdigest()} world={world} steps={trainer.state.global_step}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
