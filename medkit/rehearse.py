"""A rehearsal of a GPU profile: every notebook's GPU code path, on whatever CUDA GPU is present.

    python -m medkit.rehearse --profile colab-t4 --dry-run   # CPU: meta-device models, memory plan
    python -m medkit.rehearse --profile colab-t4             # GPU: a few real steps of each stage

``--dry-run`` builds each real model on the ``meta`` device from its published configuration
(:mod:`medkit.memplan`), prints the memory plan of every step, and exits 1 when a step does not fit
the profile's budget.

On a GPU the rehearsal uses models of the **real architectures and sizes**, initialised at random
(nothing is downloaded), a tokenizer trained here on the course's passages (``medkit.tiny``), and the
profile's dtype, 4-bit loading, gradient checkpointing and 8-bit AdamW. The process's GPU memory is
capped at the profile's budget (``torch.cuda.set_per_process_memory_fraction``), so a T4's
out-of-memory shows on a bigger card. Each stage runs a few steps through the same ``medkit``
functions the notebooks call; peak GPU memory and time are printed per stage, and any error fails
the run (exit 1). Random weights make the losses meaningless: only the code paths, dtypes and
memory are rehearsed. ``--only sft,cot`` runs some stages.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from . import config, memplan

STAGES = ("sft", "dpo", "qlora", "cot", "rag", "serve")


# ---------------------------------------------------------------- dry run (CPU)

def dry_run(profile: str, out=print) -> int:
    """Build every model of ``profile`` on the meta device, print the plan; 0 if all fits."""
    t0 = time.perf_counter()
    names = sorted({memplan.canonical(m) for m in _models(profile)})
    out(f"rehearse --dry-run: profile {profile}, budget {memplan.gpu_budget_gib(profile):g} GiB, "
        f"dtype {memplan.profile_dtype(profile)}")
    out("| model (meta device) | parameters | in blocks' linear layers | embeddings + head |")
    out("| --- | ---: | ---: | ---: |")
    for n in names:
        s = memplan.shapes(n)
        out(f"| {n} | {s.params / 1e6:,.1f} M | {s.linear / 1e6:,.1f} M | {(s.embed + s.head) / 1e6:,.1f} M |")
    steps = memplan.plan(profile)
    out("")
    out(memplan.table(steps))
    bad = [s for s in steps if not s.fits]
    out("")
    for s in bad:
        out("DOES NOT FIT: " + s.explain())
    out(f"{len(steps) - len(bad)} of {len(steps)} steps fit ({time.perf_counter() - t0:.1f} s)")
    return 1 if bad else 0


def _models(profile: str) -> list[str]:
    st = config.PROFILES[profile]["stages"]
    return [st["sft"]["base_model"], st["t5"]["base_model"], st["qlora"]["base_model"], st["cot"]["base_model"],
            st["rag"]["embedder"], st["rag"]["reranker"], st["eval"]["bertscore_model"]]


# ---------------------------------------------------------------- on the GPU

class Rehearsal:
    """Runs the stages on the GPU under the profile's memory cap and keeps one row per stage."""

    def __init__(self, profile: str, workdir: Path, steps: int = 3):
        import torch

        self.profile, self.workdir, self.steps = profile, Path(workdir), steps
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        total = torch.cuda.get_device_properties(0).total_memory
        self.budget = memplan.gpu_budget_gib(profile) * memplan.GIB
        self.fraction = min(1.0, self.budget / total)
        # the profile's dtype (a T4 runs fp16 even where this GPU has bf16)
        self.dtype = memplan.profile_dtype(profile) if config.pick_dtype("cuda") == "bfloat16" else "float16"
        self.device_name = torch.cuda.get_device_name(0)
        self._tok: dict[str, Any] = {}

    def prepare(self, families: dict[str, str]) -> None:
        """Write the random models before the cap: building an 8B in 16-bit takes 15 GiB at once,
        while loading it in 4-bit (what the notebooks do) streams it layer by layer."""
        import torch

        t0 = time.perf_counter()
        for name, family in families.items():
            self.save_random(name, family)
        print(f"rehearse: {len(families)} random models written in {time.perf_counter() - t0:.0f} s", flush=True)
        torch.cuda.set_per_process_memory_fraction(self.fraction, 0)

    # shared pieces
    def tokenizer(self, family: str):
        """A tokenizer trained here on the course's passages, with ``family``'s chat template."""
        if family not in self._tok:
            from . import kb, tiny
            from .data import generate

            texts = [p["text"] for p in generate.passages(kb.load())]
            raw = tiny.train_tokenizer(texts, vocab_size=4096)
            tok = tiny.family_tokenizer(raw, family)
            if family == "llama":  # the released R1-Distill template (trl ships it), as on the hub
                try:
                    from trl.chat_template_utils import deepseek_r1_distill_chat_template

                    tok.chat_template = deepseek_r1_distill_chat_template
                except ImportError:
                    pass
            self._tok[family] = tok
        return self._tok[family]

    def save_random(self, name: str, family: str) -> Path:
        """The real architecture with random weights, saved in 16-bit with a local tokenizer, so
        the notebooks' loaders (4-bit too) read it as they read the hub model."""
        import torch

        name = memplan.canonical(name)
        folder = self.workdir / name.replace("/", "__")
        if not (folder / "config.json").exists():
            model = memplan.build(name, "cuda", getattr(torch, self.dtype))
            model.save_pretrained(folder)
            self.tokenizer(family).save_pretrained(folder)
            del model
            torch.cuda.empty_cache()
        return folder

    def cfg(self, stage: str, **kw) -> dict[str, Any]:
        cfg = config.resolve(self.profile, stage, max_steps=self.steps, **kw)
        return dict(cfg, dtype=self.dtype, device="cuda")

    def rows_long(self, n: int, words: int) -> list[dict[str, str]]:
        """QA rows whose answers reach the stage's sequence length (the plan's worst case)."""
        from . import kb
        from .data import generate

        text = " ".join(p["text"] for p in generate.passages(kb.load())[:200]).split()
        return [{"question": " ".join(text[i * 7: i * 7 + 20]) + "?", "answer": " ".join(text[i: i + words])}
                for i in range(n)]

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        import gc

        import torch

        gc.collect()  # trainers hold reference cycles: the last stage's model goes only now
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        row = {"stage": name, "dtype": self.dtype, "ok": False}
        try:
            row.update(fn() or {})
            row["ok"] = True
        except Exception as exc:  # noqa: BLE001 - every failure is reported, then the run fails
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - t0, 1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated() / memplan.GIB, 2)
        self.rows.append(row)
        print(json.dumps(row), flush=True)

    # the stages
    def sft_and_dpo(self) -> None:
        from .train import common, dpo, sft

        name = config.PROFILES[self.profile]["stages"]["sft"]["base_model"]
        folder = self.save_random(name, "qwen2")
        state: dict[str, Any] = {}

        def do_sft():
            cfg = self.cfg("sft")
            model, tok = common.load_causal_lm(str(folder), self.dtype, "cuda")
            rows = self.rows_long(cfg["batch_size"] * 2 + 4, cfg["seq_len"])
            trainer = sft.make_trainer(model, tok, rows[:-4], rows[-4:], cfg, self.workdir / "sft",
                                       eval_strategy="no", save_strategy="no")
            res = trainer.train()
            gens = common.generate(trainer.model, tok, [common.messages(r["question"]) for r in rows[:4]],
                                   max_new_tokens=16)
            state["merged"] = sft.save_adapter_and_merged(trainer, tok, self.workdir / "sft_model", cfg)["merged"]
            return {"model": name, "steps": res.global_step, "loss": round(res.training_loss, 3),
                    "generated": len(gens), "checkpointing": cfg.get("gradient_checkpointing", False)}

        def do_dpo():
            cfg = self.cfg("dpo")
            model, tok = common.load_causal_lm(str(state["merged"]), self.dtype, "cuda")
            long = self.rows_long(cfg["batch_size"] * 2 + 2, cfg["seq_len"] // 2)
            pairs = [{"prompt": r["question"], "chosen": r["answer"], "rejected": r["answer"][::-1]} for r in long]
            trainer = dpo.make_trainer(model, tok, pairs[:-2], pairs[-2:], cfg, self.workdir / "dpo",
                                       eval_strategy="no")
            res = trainer.train()
            return {"model": name, "steps": res.global_step, "checkpointing": cfg.get("gradient_checkpointing", False)}

        self.run("02 sft (LoRA)", do_sft)
        if "merged" in state:
            self.run("03 dpo (LoRA)", do_dpo)

    def qlora(self) -> None:
        from .evaluate import mcq
        from .train import qlora

        name = config.PROFILES[self.profile]["stages"]["qlora"]["base_model"]

        def do():
            folder = self.save_random(name, "phi")
            cfg = self.cfg("qlora")
            model, tok, model_type = qlora.load_base(str(folder), cfg, quantized=True)
            peft_model = qlora.add_lora(model, cfg["lora"], True, cfg.get("gradient_checkpointing", False))
            words = " ".join(["word"] * (cfg["seq_len"] // 2))
            rows = [{"id": str(i), "question": f"Question {i}? " + words, "opa": "a", "opb": "b", "opc": "c",
                     "opd": "d", "cop": i % 4, "exp": words} for i in range(cfg["batch_size"] * 2 + 4)]
            trainer = qlora.make_trainer(peft_model, tok, rows[:-4], rows[-4:], cfg, self.workdir / "qlora",
                                         eval_strategy="no")
            res = trainer.train()
            acc = mcq.accuracy(mcq.loglik_choices(trainer.model, tok, rows[-4:]))
            return {"model": name, "steps": res.global_step, "compute": qlora.compute_dtype(cfg, model_type),
                    "mcq_scored": acc is not None}

        self.run("04 qlora (4-bit)", do)

    def cot(self) -> None:
        from .train import common, cot

        name = config.PROFILES[self.profile]["stages"]["cot"]["base_model"]
        state: dict[str, Any] = {}

        def do_train():
            folder = self.save_random(name, "llama")
            cfg = self.cfg("cot")
            model, tok, path = cot.load_for_training(str(folder), cfg)
            reasoning = " ".join(["because"] * (cfg["seq_len"] // 3))
            rows = [{"id": str(i), "Question": f"Case {i}: fever and cough?", "Complex_CoT": reasoning,
                     "Response": "**Diagnosis:** x\n\n**Treatment Plan:** y"} for i in range(cfg["batch_size"] * 4)]
            trainer = cot.make_trainer(model, tok, rows, None, cfg, self.workdir / "cot")
            res = trainer.train()
            gens = common.generate(cot.prepare_inference(model, path), tok, [cot.build_prompt("Fever?")] * 4,
                                   max_new_tokens=16)
            state["folder"] = folder
            del model, trainer
            common.free_memory()
            return {"model": name, "path": path, "steps": res.global_step, "optim": cfg.get("optim"),
                    "generated": len(gens)}

        def do_reload():
            cfg = self.cfg("cot")
            model, tok, how = cot.reload_merged(state["folder"], cfg)
            gens = common.generate(model, tok, [cot.build_prompt("Fever?")], max_new_tokens=8)
            return {"model": name, "reloaded": how, "generated": len(gens)}

        self.run("05 cot (4-bit, 8-bit AdamW)", do_train)
        if "folder" in state:
            self.run("05 reload merged", do_reload)

    def rag(self) -> None:
        from .rag import rerank

        st = config.PROFILES[self.profile]["stages"]["rag"]

        def do():
            from sentence_transformers import SentenceTransformer

            emb = self.save_random(st["embedder"], "qwen2")
            rr = self.save_random(st["reranker"], "qwen2")
            encoder = SentenceTransformer(str(emb), device="cuda")
            vecs = encoder.encode(["fever and cough"] * 64, batch_size=64)
            reranker = rerank.CrossEncoderReranker(str(rr), "cuda", max_length=st.get("reranker_max_length", 512))
            texts = {f"p{i}": "asthma is treated with inhalers " * 60 for i in range(10)}
            ranked = reranker.rerank("how is asthma treated?", [(k, 0.0) for k in texts], texts, top=3)
            return {"embedder": st["embedder"], "reranker": st["reranker"], "vectors": int(vecs.shape[0]),
                    "reranked": len(ranked)}

        self.run("06 rag (embedder + cross-encoder)", do)

    def serve(self) -> None:
        import importlib.util

        from .serve import engines, hf_server

        name = config.PROFILES[self.profile]["stages"]["sft"]["base_model"]
        folder = self.workdir / "sft_model" / "merged"

        def do_hf():
            import asyncio

            from .train import common

            model, tok = common.load_causal_lm(str(folder), self.dtype, "cuda")
            dec = hf_server.BatchDecoder(model, tok, mode="batch")
            loop = asyncio.new_event_loop()
            job = hf_server._Job(tok("fever", add_special_tokens=False)["input_ids"], 8, 0.0, {}, loop, asyncio.Queue())
            dec._decode([job])
            dec.close()
            return {"model": name, "device": str(model.device), "tokens": len(job.tokens)}

        self.run("09 HF server decode (GPU)", do_hf)
        if importlib.util.find_spec("vllm") is None:
            self.rows.append({"stage": "09 vLLM", "ok": True, "skipped": "vllm is not installed"})
            return

        def do_vllm():
            import httpx

            port = engines.free_port()
            cmd = engines.vllm_command(folder, port, max_model_len=512, dtype=self.dtype,
                                       extra=["--gpu-memory-utilization", f"{self.fraction * 0.9:.2f}"])
            with engines.EngineServer(cmd, port, "vllm-rehearsal", self.workdir / "vllm.log", start_timeout=300) as eng:
                r = httpx.post(eng.url + "/chat/completions", timeout=60, json={
                    "model": "medkit", "messages": [{"role": "user", "content": "fever?"}], "max_tokens": 8})
                r.raise_for_status()
            return {"model": name, "status": r.status_code}

        self.run("09 vLLM", do_vllm)

    def table(self) -> str:
        lines = [f"GPU: {self.device_name}; capped at {self.budget / memplan.GIB:g} GiB ({self.fraction:.0%}); "
                 f"profile {self.profile}", "",
                 "| stage | dtype | peak GPU GiB | seconds | result |", "| --- | --- | ---: | ---: | --- |"]
        for r in self.rows:
            result = "ok" if r.get("ok") and not r.get("skipped") else (r.get("skipped") or r.get("error", "failed"))
            lines.append(f"| {r['stage']} | {r.get('dtype', '')} | {r.get('peak_gib', '')} | {r.get('seconds', '')} | {result} |")
        return "\n".join(lines)


def run_gpu(profile: str, workdir: Path, only: list[str] | None = None, steps: int = 3) -> int:
    import torch

    if not torch.cuda.is_available():
        print("rehearse: no CUDA GPU here; use --dry-run on a CPU", file=sys.stderr)
        return 2
    reh = Rehearsal(profile, workdir, steps)
    todo = only or list(STAGES)
    st = config.PROFILES[profile]["stages"]
    families = {}
    if {"sft", "dpo", "serve"} & set(todo):
        families[st["sft"]["base_model"]] = "qwen2"
    if "qlora" in todo:
        families[st["qlora"]["base_model"]] = "phi"
    if "cot" in todo:
        families[st["cot"]["base_model"]] = "llama"
    if "rag" in todo:
        families.update({st["rag"]["embedder"]: "qwen2", st["rag"]["reranker"]: "qwen2"})
    reh.prepare(families)
    if "sft" in todo or "dpo" in todo or "serve" in todo:
        reh.sft_and_dpo()
    if "qlora" in todo:
        reh.qlora()
    if "cot" in todo:
        reh.cot()
    if "rag" in todo:
        reh.rag()
    if "serve" in todo:
        reh.serve()
    print(reh.table())
    (Path(workdir) / "rehearsal.json").write_text(json.dumps(reh.rows, indent=1) + "\n")
    return 0 if all(r.get("ok") for r in reh.rows) else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    gpu_profiles = [p for p in config.PROFILES if config.PROFILES[p].get("gpu_budget_gib")]
    ap.add_argument("--profile", required=True, choices=gpu_profiles)
    ap.add_argument("--dry-run", action="store_true", help="CPU only: meta-device models and the memory plan")
    ap.add_argument("--only", default="", help=f"comma-separated stages of {','.join(STAGES)}")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--workdir", default="outputs/rehearsal")
    args = ap.parse_args(argv)
    code = dry_run(args.profile)
    if args.dry_run:
        return code
    only = [s for s in args.only.split(",") if s] or None
    return max(code, run_gpu(args.profile, Path(args.workdir) / args.profile, only, args.steps))


if __name__ == "__main__":
    sys.exit(main())
