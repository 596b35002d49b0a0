"""Export a merged course model (Qwen2 or Llama layout) to GGUF for llama.cpp, and check it.

llama.cpp's own converter recognises BPE pre-tokenizers by hashing known models' outputs, so it
refuses the tokenizer trained here. This writer uses the ``gguf`` package's ``GGUFWriter``
directly and states the tokenizer as byte-level BPE (``tokenizer.ggml.model = "gpt2"``) with the
pre-tokenizer split read from ``tokenizer.json`` (``gpt-2``, ``qwen2`` or ``smollm``: they cut
digits differently). ``parity`` then checks that llama.cpp tokenizes like transformers and computes the
same next-token logits: exactly for f32, within a stated rounding tolerance for f16 and q8_0.

    path = export(model_dir, out_dir / "model-f16.gguf", "f16")
    parity(model_dir, path, prompts, n_tokens=16)  # {"match": True, "max_logit_diff": ..., ...}
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

QUANT_TYPES = ("f32", "f16", "q8_0")


def gguf_chat_template(template: str) -> str:
    """The chat template for llama.cpp's Jinja engine: transformers' ``{% generation %}``
    markers (used only to mask the training loss) are not Jinja and would fail there."""
    return re.sub(r"{%-?\s*(end)?generation\s*-?%}", "", template)


def _permute_rope(w, n_head: int):
    """HF Llama stores q/k with rotary halves split; GGML's Llama rope wants them interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# Qwen2's pre-tokenizer split (digits one by one, case-insensitive contractions); llama.cpp knows it
# as pre-tokenizer "qwen2". transformers saves the course's tiny Qwen2 tokenizers with it too.
QWEN2_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the pre-tokenizer in a ``tokenizer.json``: ``gpt-2`` for plain
    byte-level BPE (GPT-2's split), ``qwen2`` for Qwen2's split + byte level, ``smollm`` for
    SmolLM2's (digits one by one, then GPT-2's split). The split decides
    how digits and contractions become tokens, so a wrong name changes the token ids."""
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    parts = pre.get("pretokenizers") or []
    # SmolLM2's: every digit isolated, then GPT-2's byte-level split (llama.cpp's "smollm")
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Digits"
            and parts[0].get("individual_digits") and parts[1].get("type") == "ByteLevel"
            and parts[1].get("use_regex", True)):
        return "smollm"
    if (pre.get("type") == "Sequence" and len(parts) == 2 and parts[0].get("type") == "Split"
            and (parts[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "qwen2"
    raise ValueError(f"pre-tokenizer {json.dumps(pre)[:200]} is not GPT-2's, Qwen2's or SmolLM2's byte-level split; "
                     f"for other hub models use llama.cpp's convert_hf_to_gguf.py")


def _tokenizer_fields(model_dir: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    # what transformers actually runs: for a qwen2 model it applies Qwen2's split even when
    # tokenizer.json on disk says plain byte level
    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"].get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise ValueError(f"{model_dir}: only byte-level BPE tokenizers (GPT-2 style) are exported; "
                         f"got model {spec['model'].get('type')!r}")
    vocab = tok.get_vocab()
    size = max(vocab.values()) + 1
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [5] * size  # UNUSED until set
    for text, idx in vocab.items():
        tokens[idx], types[idx] = text, 1  # NORMAL
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = 3 if added.get("special") else 4  # CONTROL / USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    return {"tok": tok, "tokens": tokens, "types": types, "merges": merges, "pre": pre_tokenizer_name(spec)}


def export(model_dir: str | Path, out_path: str | Path, quant: str = "f16") -> Path:
    """Write ``model_dir`` (a merged HF Qwen2/Llama causal LM) as GGUF with weights in
    ``quant`` (f32, f16 or q8_0; norms and biases stay f32). Returns the path."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFWriter
    from gguf.quants import quantize
    from transformers import AutoConfig, AutoModelForCausalLM

    if quant not in QUANT_TYPES:
        raise ValueError(f"quant must be one of {QUANT_TYPES}, got {quant!r}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    cfg = AutoConfig.from_pretrained(model_dir)
    arch = cfg.model_type
    if arch not in ("qwen2", "llama"):
        raise ValueError(f"{model_dir}: GGUF export supports qwen2 and llama models, not {arch!r}")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    t = _tokenizer_fields(model_dir)
    tok = t["tok"]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    w = GGUFWriter(str(out_path), arch)
    w.add_name(model_dir.name)
    w.add_context_length(int(cfg.max_position_embeddings))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    w.add_feed_forward_length(int(cfg.intermediate_size))
    w.add_head_count(int(cfg.num_attention_heads))
    n_kv = int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    w.add_head_count_kv(n_kv)
    rope = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta") or getattr(cfg, "rope_theta", 10000.0)
    w.add_rope_freq_base(float(rope))
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[quant])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(t["pre"])
    w.add_token_list(t["tokens"])
    w.add_token_types(t["types"])
    w.add_token_merges(t["merges"])
    if tok.bos_token_id is not None:
        w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    if tok.pad_token_id is not None:
        w.add_pad_token_id(tok.pad_token_id)
    # the course's chat templates put BOS in the template themselves (R1) or use none (ChatML)
    w.add_add_bos_token(False)
    if tok.chat_template:
        w.add_chat_template(gguf_chat_template(tok.chat_template))

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

    def put(name: str, arr) -> None:
        arr = np.ascontiguousarray(arr)
        if arr.ndim == 1 or quant == "f32":
            w.add_tensor(name, arr.astype(np.float32))
        elif quant == "f16":
            w.add_tensor(name, arr.astype(np.float16))
        else:
            q = quantize(arr.astype(np.float32), GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=GGMLQuantizationType.Q8_0)

    put("token_embd.weight", state["model.embed_tokens.weight"])
    put("output_norm.weight", state["model.norm.weight"])
    # tied embeddings: write the output matrix anyway, every llama.cpp version then loads it
    put("output.weight", state.get("lm_head.weight", state["model.embed_tokens.weight"]))
    for i in range(int(cfg.num_hidden_layers)):
        for hf, gg in names.items():
            for kind in ("weight", "bias"):
                key = f"model.layers.{i}.{hf}.{kind}"
                if key not in state:
                    continue
                arr = state[key]
                if arch == "llama" and hf == "self_attn.q_proj":
                    arr = _permute_rope(arr, int(cfg.num_attention_heads))
                elif arch == "llama" and hf == "self_attn.k_proj":
                    arr = _permute_rope(arr, n_kv)
                put(f"blk.{i}.{gg}.{kind}", arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out_path


def llama_class():
    """``llama_cpp.Llama``, or a clear error when llama-cpp-python is missing (callers that export
    first ask before the export)."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("llama-cpp-python is not installed: run `make setup` (it builds the wheel once "
                          "into ~/.cache/medkit-wheels) or `pip install llama-cpp-python==0.3.36`.") from e
    return Llama


def load_llama(gguf_path: str | Path, n_ctx: int = 512, threads: int | None = None, logits_all: bool = False):
    """A ``llama_cpp.Llama`` on the file (quiet), or a clear error when llama-cpp-python is missing.
    ``logits_all`` keeps every position's logits (``parity`` compares them step by step)."""
    Llama = llama_class()
    # n_threads_batch too: llama.cpp's default reads the prompt on every core, beside a thread cap
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False,
                 seed=0, logits_all=logits_all)


# Tolerances are in units of the step's logit spread (the standard deviation of transformers'
# logits over the vocabulary), so they mean the same for a random-weight test model and a trained
# one. f16 rounds each weight to 11 significant bits and q8_0 to 8 bits per block of 32: logits move
# by a small fraction of their spread (09 prints the measured largest). A wrong conversion (a missing
# RoPE permutation, a swapped tensor) moves them by about their whole spread, and a wrong
# pre-tokenizer changes the prompt's token ids.
# A step where llama.cpp's top token differs from transformers' is a near-tie, not a conversion
# bug, when transformers itself ranks the two tokens within NEAR_TIE spreads of each other.
NEAR_TIE = {"f32": 0.0, "f16": 0.05, "q8_0": 0.3}
# the largest logit difference allowed at any teacher-forced step, in spreads
LOGIT_TOL = {"f32": 0.01, "f16": 0.05, "q8_0": 0.3}


def parity_verdict(res: dict[str, Any]) -> str:
    """One sentence on a :func:`parity` result: which of its conditions failed, and whether the
    failure looks like rounding (every prompt tokenized alike, every disagreement a near-tie, only
    the logit tolerance passed) or like a broken conversion."""
    q, tol = res["quant"], res["logit_tol"]
    if res["match"]:
        return (f"{q}: parity. Prompts tokenized alike, {res['steps_agree']}/{res['steps']} greedy steps agree "
                f"({res['near_ties']} near-ties), logits within {res['max_rel_diff']:.3f} of the {tol} spreads allowed.")
    failed = []
    prompts_ok = all(r["prompt_tokens_equal"] for r in res["rows"])
    if not prompts_ok:
        failed.append("the prompts tokenize differently (a tokenizer or template bug)")
    if res["unexplained"]:
        failed.append(f"{res['unexplained']} step(s) pick another top token with no near-tie (a conversion bug)")
    if q == "f32" and not res["exact"]:
        failed.append("the greedy tokens differ (an f32 file must decode the same tokens)")
    if res["max_rel_diff"] > tol:
        failed.append(f"logits moved up to {res['max_rel_diff']:.3f} spreads ({res['max_logit_diff']:.3f} in logits), "
                      f"past the {tol} allowed")
    rounding = prompts_ok and not res["unexplained"] and (q != "f32" or res["exact"])
    return (f"{q}: no parity: " + "; ".join(failed) + "."
            + (" Every token agrees or is a near-tie, so this is the rounding of the weights and kernels, "
               "not a broken conversion, but more than the tolerance allows." if rounding else ""))


def quant_of(gguf_path: str | Path) -> str:
    """The weight type written in an exported file's name (``...-f16.gguf`` → ``f16``)."""
    stem = Path(gguf_path).stem.lower()
    for q in sorted(QUANT_TYPES, key=len, reverse=True):
        if stem.endswith(q) or f"-{q}" in stem or f"_{q}" in stem:
            return q
    raise ValueError(f"{gguf_path}: cannot tell the weight type from the name; pass quant= "
                     f"(one of {QUANT_TYPES})")


def hf_reference(model_dir: str | Path, questions: list[str], n_tokens: int = 16, hf=None) -> dict[str, Any]:
    """transformers' side of :func:`parity`, computed once and shared by every export of the same
    model (09 checks f32, f16 and q8_0 against it): per question, the chat-formatted prompt's token
    ids, ``n_tokens`` greedy steps (plain argmax, no stopping rule) and each step's logits. The
    steps run incrementally on the key/value cache, as ``generate`` does. ``hf``: an already loaded
    ``(model, tokenizer)``."""
    import torch

    from ..train.common import load_causal_lm, messages

    model, tok = hf or load_causal_lm(str(model_dir))
    model.eval()
    rows = []
    for q in questions:
        text = tok.apply_chat_template(messages(q), tokenize=False, add_generation_prompt=True)
        prompt = tok(text, add_special_tokens=False)["input_ids"]
        ids, logits_per_step, cache, new = list(prompt), [], None, list(prompt)
        with torch.no_grad():
            for _ in range(n_tokens):
                out = model(torch.tensor([new]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits = out.logits[0, -1].float().numpy()
                logits_per_step.append(logits)
                new = [int(logits.argmax())]
                ids.append(new[0])
        rows.append({"question": q, "text": text, "prompt": prompt, "ids": ids, "logits": logits_per_step})
    return {"model_dir": str(model_dir), "n_tokens": n_tokens, "rows": rows, "tokenizer": tok}


def parity(model_dir: str | Path, gguf_path: str | Path, questions: list[str], n_tokens: int = 16,
           llm=None, hf=None, quant: str | None = None, reference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Compare transformers and llama.cpp on chat prompts, so that a conversion bug fails and
    rounding does not.

    Per prompt: the chat-formatted prompt must give the same token ids in both libraries; both
    decode ``n_tokens`` greedily (``generated_equal``: the same ids, reported); and llama.cpp is
    then run teacher-forced along transformers' greedy tokens, so every step compares the two
    libraries' logits on the same context. A step agrees when both pick the same top token; a
    disagreement is a near-tie when transformers ranks the two tokens within ``NEAR_TIE[quant]``
    logit spreads (the margin is reported). ``match``: every prompt's ids are equal, every
    disagreement is a near-tie, and the largest logit difference is within ``LOGIT_TOL[quant]``
    spreads (``max_rel_diff``; ``max_logit_diff`` is the same in logits); for f32 the greedy tokens
    must also be identical. ``hf``: an already loaded ``(model, tokenizer)``; ``reference``:
    :func:`hf_reference`'s result for this model and these questions, so that transformers runs
    once for several exports (``hf`` is then not needed; another model, other questions or another
    ``n_tokens`` are refused)."""
    import numpy as np

    quant = quant or quant_of(gguf_path)
    if reference is None:
        reference = hf_reference(model_dir, questions, n_tokens, hf)
    elif reference["model_dir"] != str(model_dir):
        raise ValueError(f"{gguf_path}: the transformers reference is of {reference['model_dir']}, not {model_dir}")
    elif [r["question"] for r in reference["rows"]] != list(questions):
        raise ValueError(f"{gguf_path}: the transformers reference was computed for other questions")
    elif reference["n_tokens"] != n_tokens:
        raise ValueError(f"{gguf_path}: the transformers reference was computed for {reference['n_tokens']} tokens, "
                         f"not {n_tokens}")
    tok = reference["tokenizer"]
    if llm is None:
        llm = load_llama(gguf_path, logits_all=True)
    rows = []
    for ref in reference["rows"]:
        q, text, hf_prompt, ids, hf_logits = ref["question"], ref["text"], ref["prompt"], ref["ids"], ref["logits"]
        cpp_prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        hf_ids = ids[len(hf_prompt):]
        llm.reset()
        cpp_ids = []
        for t_id in llm.generate(hf_prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            cpp_ids.append(int(t_id))
            if len(cpp_ids) >= len(hf_ids):
                break
        # teacher-forced: llama.cpp's logits for each step of transformers' greedy path
        llm.reset()
        llm.eval(ids[:-1])
        cpp_logits = np.asarray(llm.scores[len(hf_prompt) - 1: len(ids) - 1], dtype=np.float32)
        steps = []
        for h, c in zip(hf_logits, cpp_logits):
            n = min(len(h), len(c))  # llama.cpp may pad the vocabulary
            h, c = h[:n], c[:n]
            top_h, top_c = int(h.argmax()), int(c.argmax())
            spread = float(h.std()) or 1.0
            diff = float(np.abs(h - c).max())
            steps.append({"agree": top_h == top_c, "margin": float(h[top_h] - h[top_c]) / spread,
                          "max_logit_diff": diff, "rel_diff": diff / spread,
                          "hf_gap": float(np.sort(h)[-1] - np.sort(h)[-2]) / spread})
        rows.append({"question": q, "prompt_tokens_equal": list(cpp_prompt) == hf_prompt,
                     "hf_ids": hf_ids, "llamacpp_ids": cpp_ids, "generated_equal": cpp_ids == hf_ids,
                     "hf_text": tok.decode(hf_ids), "llamacpp_text": tok.decode(cpp_ids),
                     "steps_agree": sum(s["agree"] for s in steps), "steps": len(steps),
                     "near_ties": sum(not s["agree"] and s["margin"] <= NEAR_TIE[quant] for s in steps),
                     "unexplained": sum(not s["agree"] and s["margin"] > NEAR_TIE[quant] for s in steps),
                     "max_logit_diff": max(s["max_logit_diff"] for s in steps),
                     "max_rel_diff": max(s["rel_diff"] for s in steps),
                     "min_hf_gap": min(s["hf_gap"] for s in steps)})
    max_rel = max(r["max_rel_diff"] for r in rows)
    match = (all(r["prompt_tokens_equal"] and r["unexplained"] == 0 for r in rows)
             and max_rel <= LOGIT_TOL[quant]
             and (quant != "f32" or all(r["generated_equal"] for r in rows)))
    return {"match": match, "quant": quant, "n_tokens": n_tokens, "rows": rows,
            "exact": all(r["generated_equal"] for r in rows),
            "steps_agree": sum(r["steps_agree"] for r in rows), "steps": sum(r["steps"] for r in rows),
            "near_ties": sum(r["near_ties"] for r in rows), "unexplained": sum(r["unexplained"] for r in rows),
            "max_logit_diff": max(r["max_logit_diff"] for r in rows), "max_rel_diff": max_rel,
            "near_tie_tol": NEAR_TIE[quant], "logit_tol": LOGIT_TOL[quant]}
