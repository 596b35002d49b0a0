"""Export a merged course model (Qwen2 or Llama layout) to GGUF for llama.cpp, and check it.

llama.cpp's own converter recognises BPE pre-tokenizers by hashing known models' outputs, so it
refuses the tokenizer trained here. This writer uses the ``gguf`` package's ``GGUFWriter``
directly and states the tokenizer as byte-level BPE (``tokenizer.ggml.model = "gpt2"``) with the
pre-tokenizer split read from ``tokenizer.json`` (``gpt-2``, ``qwen2`` or ``smollm``: they cut
digits differently). ``parity`` then checks that llama.cpp tokenizes and greedily decodes like transformers.

    path = export(model_dir, out_dir / "model-f16.gguf", "f16")
    parity(model_dir, path, prompts, n_tokens=16)  # {"match": True, ...}
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


def load_llama(gguf_path: str | Path, n_ctx: int = 512, threads: int | None = None):
    """A ``llama_cpp.Llama`` on the file (quiet), or a clear error when llama-cpp-python is missing."""
    try:
        from llama_cpp import Llama
    except ImportError as e:
        raise ImportError("llama-cpp-python is not installed: run `make setup` (it builds the wheel once "
                          "into ~/.cache/medkit-wheels) or `pip install llama-cpp-python==0.3.36`.") from e
    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, verbose=False, seed=0)


def parity(model_dir: str | Path, gguf_path: str | Path, questions: list[str], n_tokens: int = 16,
           llm=None, hf=None) -> dict[str, Any]:
    """Compare transformers and llama.cpp on chat prompts: the same prompt token ids, and the same
    greedy first ``n_tokens`` generated ids. Returns per-prompt rows and ``match`` (all equal).
    ``hf``: an already loaded ``(model, tokenizer)`` of ``model_dir``."""
    import torch

    from ..train.common import load_causal_lm, messages

    model, tok = hf or load_causal_lm(str(model_dir))
    model.eval()
    llm = llm or load_llama(gguf_path)
    rows = []
    for q in questions:
        text = tok.apply_chat_template(messages(q), tokenize=False, add_generation_prompt=True)
        hf_prompt = tok(text, add_special_tokens=False)["input_ids"]
        cpp_prompt = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ids = list(hf_prompt)
        with torch.no_grad():  # plain greedy steps: no stopping rule, so both sides make n_tokens
            for _ in range(n_tokens):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        hf_ids = ids[len(hf_prompt):]
        llm.reset()
        cpp_ids = []
        for t_id in llm.generate(hf_prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            cpp_ids.append(int(t_id))
            if len(cpp_ids) >= len(hf_ids):
                break
        rows.append({"question": q, "prompt_tokens_equal": list(cpp_prompt) == hf_prompt,
                     "hf_ids": hf_ids, "llamacpp_ids": cpp_ids, "generated_equal": cpp_ids == hf_ids,
                     "hf_text": tok.decode(hf_ids), "llamacpp_text": tok.decode(cpp_ids)})
    return {"match": all(r["prompt_tokens_equal"] and r["generated_equal"] for r in rows),
            "n_tokens": n_tokens, "rows": rows}
