"""What every training stage shares: loading a base model by profile reference, the chat
prompt, training arguments by device, generation, and teacher-forced scoring."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..metrics import perplexity

SYSTEM_PROMPT = "You are a careful medical information assistant. Answer briefly and specifically."


def resolve_model_ref(ref: str, session=None) -> str:
    """``tiny:<family>`` → the cached tiny base from 01_data; ``smol:<name>`` → the shipped
    model converted by ``medkit.smol`` (01_data converts it; the cache makes this a lookup);
    ``artifact:<name>`` → that artifact; anything else is a hub id or a local folder."""
    if ref.startswith("smol:"):
        from .. import smol

        return str(smol.ensure(ref.split(":", 1)[1]).path)
    if ref.startswith("tiny:"):
        if session is None:
            raise ValueError(f"{ref}: a session is needed to find the tiny base built by 01_data")
        return str(session.get(f"tiny_{ref.split(':', 1)[1]}"))
    if ref.startswith("artifact:"):
        if session is None:
            raise ValueError(f"{ref}: a session is needed to find the artifact")
        return str(session.get(ref.split(":", 1)[1]))
    return ref


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def fp32_adapters_for_fp16(trainer, dtype: str):
    """Keep the trainable weights in fp32 when training in fp16 (a T4 has no bf16). trl's
    ``SFTTrainer`` casts a 4-bit model's adapter weights to bf16, and fp16 mixed precision
    unscales gradients with a GradScaler, which fails on bf16 gradients; fp32 weights are what
    mixed precision expects. Returns the trainer."""
    if dtype == "float16":
        import torch

        for p in trainer.model.parameters():
            if p.requires_grad and p.dtype != torch.float32:
                p.data = p.data.float()
    return trainer


def load_causal_lm(path: str, dtype: str = "float32", device: str = "cpu", load_in_4bit: bool = False):
    """(model, tokenizer) with a pad token and a chat template, or a clear error naming the model.

    ``load_in_4bit``: NF4 weights (bitsandbytes) computing in ``dtype``, for a model whose 16-bit
    weights do not fit beside the others (``medkit.memplan``): 05's merged 8B on a T4, 08's
    leaderboard. On the CPU a model with grouped key/value heads attends through
    ``attention.gqa_sdpa``: the same attention, without copying the cache for each query head."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import attention

    tok = AutoTokenizer.from_pretrained(path)
    if not tok.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template; SFT and DPO format every example "
                         f"with the model's own template. Use an instruct/chat model or set tokenizer.chat_template.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if load_in_4bit:
        from .qlora import bnb_config

        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), quantization_config=bnb_config(dtype),
            device_map={"": 0} if device == "cuda" else {"": device})
        return attention.use_on_cpu(model), tok
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    model.to(device)
    return attention.use_on_cpu(model), tok


def free_memory() -> int:
    """Collect garbage and return cached GPU blocks to the driver, after the caller dropped its
    references (``del model, trainer``). Returns the bytes still allocated on the GPU (0 on CPU)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        return int(torch.cuda.memory_allocated())
    return 0


def messages(question: str, system: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def precision_flags(dtype: str) -> dict[str, bool]:
    """TrainingArguments precision flags for the resolved dtype (fp16 on a T4, bf16 where the
    GPU has it, neither on the CPU)."""
    return {"bf16": dtype == "bfloat16", "fp16": dtype == "float16"}


def score_labelled_positions_only() -> bool:
    """Make trl's fused LM head score only the positions that have a label on the CPU too.

    trl's trainers compute the loss with a fused LM head (``trl.trainer.add_fused_lm_head``) that
    projects hidden states onto the vocabulary in tiles. With Triton (CUDA) it keeps only the
    positions whose next token has a label; anywhere else it scores every position, so that tile
    shapes stay fixed for compilers such as Neuron's, and masks the rest out afterwards. On a CPU
    nothing is compiled, and every prompt token then goes through SmolLM2's 49,152-word output
    layer for nothing: 06-style evidence rows are ~400 tokens of prompt for ~50 of answer, and the
    (tokens, 32,768) tiles were 70 MB apiece in 04's training step. trl reads one private switch,
    ``trl.trainer.utils._use_triton``, for that choice; this wraps it so that a CPU device
    counts as compact as well. The loss is the same (masked positions add nothing either way).
    Idempotent; returns False, changing nothing, if trl no longer has that switch
    (``tests/test_train.py::test_fused_lm_head_scores_only_labelled_positions_on_the_cpu`` fails
    then, so the trl pin is revisited)."""
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    current = getattr(trl_utils, "_use_triton", None)
    if current is None:
        return False
    if getattr(current, "medkit_cpu_compact", False):
        return True

    def use_compact(device, _trl_choice=current):
        return device.type == "cpu" or _trl_choice(device)

    use_compact.medkit_cpu_compact = True
    trl_utils._use_triton = use_compact
    return True


def _mergeable_lora_layers(model) -> list | None:
    """The LoRA layers of ``model`` when folding them into their weights is safe and worth it:
    every adapted layer a plain ``nn.Linear`` with fp32 weights, not merged, adapters enabled.
    ``None`` otherwise (not a PEFT model; 4-bit layers, where a merge would re-quantise; 16-bit
    weights, where adding and subtracting the update would round them; other tuner layers)."""
    if not hasattr(model, "peft_config"):
        return None
    import torch
    from peft.tuners.lora import LoraLayer
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    if not tuned or not all(isinstance(m, LoraLayer) for m in tuned):
        return None
    for m in tuned:
        base = m.get_base_layer()
        if (type(base) is not torch.nn.Linear or base.weight.dtype != torch.float32 or m.merged
                or m.disable_adapters):
            return None
    return tuned


class lora_merged:
    """``with lora_merged(model):`` runs inference with a LoRA model's adapters folded into its
    weights, then takes them out again. An unmerged adapter adds three small matmuls (dropout,
    A, B) to every adapted layer on every forward; folded in, the model costs what its base does.
    On SmolLM2 with LoRA on all seven projections (2 CPU threads) that is ~15% of greedy
    generation time. Only where ``_mergeable_lora_layers`` says so (fp32 weights: taking the
    update out again restores them to float rounding); anywhere else it does nothing."""

    def __init__(self, model):
        self.model, self.layers = model, None

    def __enter__(self):
        import torch

        self.layers = _mergeable_lora_layers(self.model)
        if self.layers:
            with torch.no_grad():
                for m in self.layers:
                    m.merge()
        return self.model

    def __exit__(self, *exc):
        import torch

        if self.layers:
            with torch.no_grad():
                for m in self.layers:
                    m.unmerge()
        return False


def generate(model, tok, prompts: list[list[dict[str, str]]], max_new_tokens: int = 64,
             batch_size: int = 16, **generate_kwargs: Any) -> list[dict[str, Any]]:
    """Greedy answers to chat prompts (``generate_kwargs`` go to ``model.generate``, e.g.
    ``num_beams``/``length_penalty``). Each result has ``text`` (special tokens removed) and
    ``stopped`` (the model ended its turn with the template's end token), in the order of
    ``prompts``; the batches group prompts of similar length, and a LoRA model generates with
    its adapters folded in (``lora_merged``). Plain greedy decoding (no ``generate_kwargs``, and
    nothing in the model's generation config that changes the logits: :func:`plain_greedy`) runs
    :func:`greedy_rows`, which drops each row from the batch once it has ended; anything else
    goes to ``model.generate``."""
    import torch

    model.eval()
    old_side = tok.padding_side
    tok.padding_side = "left"
    end_ids = {tok.eos_token_id}
    texts = [tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    # batches of similar prompt length: less left padding to run through the model
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]] if texts else []
    order = sorted(range(len(texts)), key=lambda k: lengths[k])
    out: list[dict[str, Any] | None] = [None] * len(texts)
    own_loop = not generate_kwargs and plain_greedy(model)
    try:
        with lora_merged(model):
            for i in range(0, len(order), batch_size):
                idx = order[i: i + batch_size]
                enc = tok([texts[k] for k in idx], return_tensors="pt", padding=True,
                          add_special_tokens=False).to(model.device)
                if own_loop:
                    rows = greedy_rows(model, enc["input_ids"], enc["attention_mask"], max_new_tokens, end_ids)
                else:
                    with torch.no_grad():
                        gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                             pad_token_id=tok.pad_token_id, eos_token_id=list(end_ids),
                                             **generate_kwargs)
                    rows = gen[:, enc["input_ids"].shape[1]:].tolist()
                for k, row in zip(idx, rows):
                    out[k] = reply_fields(tok, row, end_ids)
    finally:
        tok.padding_side = old_side
    return out  # type: ignore[return-value]


# Generation settings with which ``generate`` adds a logits processor (or a stopping rule) to greedy
# decoding. Where a model's generation config sets one, :func:`generate` leaves decoding to
# ``model.generate`` (Qwen2.5-Instruct's repetition penalty on the GPU profiles, for one).
_PROCESSOR_FIELDS = ("repetition_penalty", "no_repeat_ngram_size", "encoder_no_repeat_ngram_size", "bad_words_ids",
                     "min_length", "min_new_tokens", "forced_bos_token_id", "forced_eos_token_id", "suppress_tokens",
                     "begin_suppress_tokens", "sequence_bias", "exponential_decay_length_penalty",
                     "renormalize_logits", "stop_strings", "max_time", "guidance_scale")


def plain_greedy(model) -> bool:
    """True when greedy decoding of this decoder is the argmax of its logits at every step:
    nothing in its generation config changes them (:data:`_PROCESSOR_FIELDS` at their defaults)."""
    from transformers import GenerationConfig

    if getattr(model.config, "is_encoder_decoder", False):
        return False
    config, default = getattr(model, "generation_config", None), GenerationConfig()
    return config is None or all(getattr(config, f, None) in (None, getattr(default, f, None))
                                 for f in _PROCESSOR_FIELDS)


def greedy_rows(model, input_ids, attention_mask, max_new_tokens: int, end_ids: set[int]) -> list[list[int]]:
    """Greedy replies to a left-padded batch, each up to and including its first end token (or
    ``max_new_tokens`` long), **dropping a row from the batch once it has ended**.

    ``model.generate`` keeps every row until the longest reply ends, so a batch pays for its
    finished rows at every later step: 05's 44 cases after reasoning SFT ran 14,080 row-steps for
    7,095 tokens, since one reply ran to its 320-token limit. Here the finished rows leave the batch
    and the key/value cache (``reorder_cache``): on one core those 44 replies took 63 s against
    105 s, the same 44 texts (scratch probe, 2-core EPYC, 2026-12-07). Positions and the mask are
    built as ``generate`` builds them from left padding."""
    import torch

    dev = input_ids.device
    out: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    active = torch.arange(input_ids.shape[0], device=dev)
    attn = attention_mask
    last = attn.sum(-1) - 1  # each row's last prompt position
    ends = torch.tensor(sorted(end_ids), device=dev)
    with torch.no_grad():
        step = model(input_ids=input_ids, attention_mask=attn, position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
                     use_cache=True, logits_to_keep=1)
        cache = step.past_key_values
        for n in range(max_new_tokens):
            nxt = step.logits[:, -1].argmax(-1)
            for k, t in zip(active.tolist(), nxt.tolist()):
                out[k].append(t)
            going = ~torch.isin(nxt, ends)
            if n == max_new_tokens - 1 or not bool(going.any()):
                break
            if not bool(going.all()):
                keep = going.nonzero().squeeze(-1)
                cache.reorder_cache(keep)
                active, attn, nxt, last = active[keep], attn[keep], nxt[keep], last[keep]
            attn = torch.cat([attn, attn.new_ones(attn.shape[0], 1)], -1)
            last = last + 1
            step = model(input_ids=nxt[:, None], attention_mask=attn, position_ids=last[:, None],
                         past_key_values=cache, use_cache=True)
    return out


def reply_fields(tok, row: list[int], end_ids: set[int]) -> dict[str, Any]:
    """One generated row of token ids as :func:`generate` returns it (and the llama.cpp runtime,
    ``medkit.serve.runtime``): cut at the first end token, ``stopped`` when there was one, ``text``
    without special tokens and ``raw`` with them."""
    stopped = any(t in end_ids for t in row)
    if stopped:
        row = row[: next(j for j, t in enumerate(row) if t in end_ids)]
    return {"text": tok.decode(row, skip_special_tokens=True).strip(), "stopped": stopped,
            "raw": tok.decode(row, skip_special_tokens=False)}


def template_ok(result: dict[str, Any]) -> bool:
    """The generation followed the chat template: it ended its turn with the end token, said
    something, and did not start another role's turn."""
    raw = result["raw"]
    return result["stopped"] and bool(result["text"]) and not any(
        marker in raw for marker in ("<|im_start|>", "<｜User｜>", "Instruct:", "<|endoftext|>"))


_PROBE = "\u2063medkit-probe\u2063"  # text no template rewrites, to find the end-of-turn suffix


def render_completion(tok, prompt: list[dict[str, str]], completion: str) -> tuple[str, str]:
    """``(prompt_text, completion_text)``: the prompt exactly as at inference (with the
    generation prompt) and the assistant turn that follows it, end-of-turn text included.

    Most templates render prompt + completion as the prompt followed by the turn. Some rewrite
    an assistant turn: DeepSeek-R1-Distill's keeps only the text after ``</think>``, and its
    generation prompt already opens ``<think>\n``. Rendering the whole conversation then drops the
    reasoning and no longer starts with the prompt, so the completion is built instead from the
    generation prompt: the completion text (less what the generation prompt already opened),
    then the template's own end-of-turn suffix."""
    head = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(prompt + [{"role": "assistant", "content": completion}], tokenize=False)
    if full.startswith(head) and completion.strip() in full[len(head):]:
        return head, full[len(head):]
    probe = tok.apply_chat_template(prompt + [{"role": "assistant", "content": _PROBE}], tokenize=False)
    suffix = probe[probe.rindex(_PROBE) + len(_PROBE):]
    plain = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=False)
    opened = head[len(plain):] if head.startswith(plain) else head
    body = completion
    for k in range(min(len(opened), len(body)), 0, -1):  # e.g. R1's "<think>\n"
        if opened.endswith(body[:k]):
            body = body[k:]
            break
    return head, body + suffix


def tokenize_completion(tok, prompt: list[dict[str, str]], completion: str) -> tuple[list[int], int]:
    """Token ids of prompt + completion (rendered by :func:`render_completion`, each part
    tokenized on its own, as generation sees the prompt) and the prompt's length."""
    head, body = render_completion(tok, prompt, completion)
    h = tok(head, add_special_tokens=False)["input_ids"]
    return h + tok(body, add_special_tokens=False)["input_ids"], len(h)


def encode_completions(tok, prompts: list[list[dict[str, str]]], completions: list[str], device="cpu"):
    """Chat-format each (prompt, completion) pair and pad them into one batch. Returns
    ``(input_ids, attention_mask, labels)`` where ``labels`` is -100 on the prompt and padding,
    so only the completion (the assistant turn and its end token) is scored."""
    import torch

    ids, labels = [], []
    for p, c in zip(prompts, completions):
        full, n_prompt = tokenize_completion(tok, p, c)
        ids.append(full)
        labels.append([-100] * n_prompt + full[n_prompt:])
    width = max(map(len, ids))
    x = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in ids], device=device)
    attn = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in ids], device=device)
    y = torch.tensor([r + [-100] * (width - len(r)) for r in labels], device=device)
    return x, attn, y


# Prompt positions (prompts x their padded width) in one prompt pass of shared_prefix_logprobs.
# Scratch probe, one core, 04's 4-bit SmolLM2 scoring 96 course MCQs and 123 MMLU questions
# (glibc's mmap threshold fixed at 1 MB): the peak rose by 72 MB over the model at 512, by 463 MB
# at 1,024 and by 692 MB at 2,048, in about the same time (114.6, 112.5, 138.2 s); at 512, 03's 150
# held-out pairs still took 66 s against 111 s with whole prompt groups per batch
PROMPT_POSITIONS_PER_PASS = 512


def shared_prefix_logprobs(model, tok, prompts: list[list[dict[str, str]]], completions: list[str],
                           batch_size: int = 32) -> tuple[list[float], list[int], list[int]]:
    """``(sums, counts, right)`` per completion: the summed log-probability of the completion
    tokens (the chat-templated prompt + completion run in full would give the same numbers), how
    many there are, and how many the model's top guess got right; computed once per distinct
    prompt.

    An MCQ's four options or PubMedQA's yes/no/maybe share one prompt: the prompt runs once
    (``logits_to_keep=1``: only its last position's output head), its key/value cache is copied
    to each of its completions, and only the completion tokens run again and get logits. On a
    benchmark prompt of a few hundred tokens and short options this is the forward work of one
    option instead of four, and the logits tensor is completion-sized, not prompt-sized.

    Prompts run in chunks of similar length (at most ``4 * batch_size`` completions and
    :data:`PROMPT_POSITIONS_PER_PASS` prompt positions each; a longer prompt is a chunk of its
    own); a chunk's completions then run in batches of ``batch_size`` *sorted by their own
    length*, each with its own copy of its rows of the chunk's cache (:func:`_cache_rows`). A batch
    is padded to its longest completion, so a short chosen answer no longer runs at the width of
    a verbose rejected one beside it (03's held-out pairs: 30,282 padded completion positions for
    11,370 real ones when each batch held whole prompt groups), and a batch also ends before a
    completion more than twice as long as its first (:func:`_length_batches`: an MCQ's options and
    its whole reference reply, scored after the same prompt in 04). A LoRA model is scored with its
    adapters folded in (``lora_merged``)."""
    import torch

    order: dict[tuple[int, ...], list[int]] = {}
    tails: list[list[int]] = []
    for k, (p, c) in enumerate(zip(prompts, completions)):
        full, n_prompt = tokenize_completion(tok, p, c)
        order.setdefault(tuple(full[:n_prompt]), []).append(k)
        tails.append(full[n_prompt:])
    chunks: list[list[tuple[int, ...]]] = []
    for h in sorted(order, key=len):  # sorted: a chunk's prompts need little left padding
        cur = chunks[-1] if chunks else None
        if (cur is None or sum(len(order[g]) for g in cur) + len(order[h]) > 4 * batch_size
                or (len(cur) + 1) * len(h) > PROMPT_POSITIONS_PER_PASS):
            chunks.append([h])
        else:
            cur.append(h)
    sums, counts, right = [0.0] * len(tails), [0] * len(tails), [0] * len(tails)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    dev = model.device
    model.eval()
    with lora_merged(model), torch.no_grad():
        for group in chunks:
            width = max(len(h) for h in group)
            ids = torch.tensor([[pad] * (width - len(h)) + list(h) for h in group], device=dev)
            attn = torch.tensor([[0] * (width - len(h)) + [1] * len(h) for h in group], device=dev)
            pos = (attn.cumsum(-1) - 1).clamp(min=0)
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
            items = sorted(((g, k) for g, h in enumerate(group) for k in order[h]), key=lambda it: len(tails[it[1]]))
            for part in _length_batches(items, [len(tails[k]) for _, k in items], batch_size):
                rows = torch.tensor([g for g, _ in part], device=dev)
                cache = _cache_rows(out.past_key_values, rows)  # its prompt's cache, once per completion
                cwidth = max(len(tails[k]) for _, k in part)
                cids = torch.tensor([tails[k] + [pad] * (cwidth - len(tails[k])) for _, k in part], device=dev)
                cattn = torch.tensor([[1] * len(tails[k]) + [0] * (cwidth - len(tails[k])) for _, k in part],
                                     device=dev)
                cpos = attn.sum(-1)[rows].unsqueeze(-1) + torch.arange(cwidth, device=dev)
                logits = model(input_ids=cids, attention_mask=torch.cat([attn[rows], cattn], -1), position_ids=cpos,
                               past_key_values=cache, use_cache=True).logits
                # token j of a completion is predicted by the prompt's last position (j = 0) or by
                # completion position j - 1
                pred = torch.cat([out.logits[rows, -1:], logits[:, :-1]], 1).float()
                mask = cattn.bool()
                logp = torch.log_softmax(pred, -1).gather(-1, cids.unsqueeze(-1)).squeeze(-1)
                logp = torch.where(mask, logp, torch.zeros_like(logp))
                ok = (pred.argmax(-1) == cids) & mask
                for r, (_, k) in enumerate(part):
                    sums[k], counts[k], right[k] = float(logp[r].sum()), int(mask[r].sum()), int(ok[r].sum())

    return sums, counts, right


def _length_batches(items: list, lengths: list[int], batch_size: int) -> list[list]:
    """``items`` (sorted by ``lengths``, ascending) in batches of at most ``batch_size``; a batch
    also ends before an item more than twice as long as its first, so that short completions (an
    MCQ's options) are not padded to the width of long ones scored after the same prompt (its
    whole reference reply)."""
    batches: list[list] = []
    first = 0
    for item, n in zip(items, lengths):
        if batches and len(batches[-1]) < batch_size and n <= max(2 * first, 1):
            batches[-1].append(item)
        else:
            batches.append([item])
            first = n
    return batches


def _cache_rows(cache, rows):
    """A new cache holding ``rows`` of a decoder's ``cache`` (a row may repeat), ``cache`` left as
    it was. transformers' ``reorder_cache`` replaces each layer's tensors with an ``index_select``
    of them, so it runs on shallow copies of the cache and its layers: the chunk's tensors are
    read, never copied whole."""
    import copy

    sub = copy.copy(cache)
    sub.layers = [copy.copy(layer) for layer in cache.layers]
    sub.reorder_cache(rows)
    return sub


def completion_scores(model, tok, prompts: list[list[dict[str, str]]], answers: list[str],
                      batch_size: int = 16, per_item: bool = False) -> dict[str, Any]:
    """Teacher-forced loss, perplexity and token accuracy on the answer tokens only. With
    ``per_item`` the result also holds ``items``: each answer's summed log-probability
    (``logp``), scored tokens (``tokens``) and right top guesses (``right``), so any subset can be
    scored again without running the model (``medkit.evaluate.heldout.split_result``)."""
    logp, tokens, right = shared_prefix_logprobs(model, tok, prompts, answers, batch_size)
    out = answer_figures(logp, tokens, right)
    if per_item:
        out["items"] = {"logp": logp, "tokens": tokens, "right": right}
    return out


def answer_figures(logp: list[float], tokens: list[int], right: list[int]) -> dict[str, float]:
    """Loss (mean negative log-probability per answer token), perplexity and token accuracy from
    per-answer sums, as :func:`completion_scores` reports them."""
    total_tok = sum(tokens)
    mean_loss = -sum(logp) / max(total_tok, 1)
    return {"loss": mean_loss, "perplexity": perplexity(mean_loss), "token_accuracy": sum(right) / max(total_tok, 1)}


def write_model_card(folder: str | Path, title: str, base: str, data: str, hyper: dict[str, Any],
                     metrics: dict[str, Any], notes: str = "") -> Path:
    from .. import NOT_MEDICAL_ADVICE

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {title}", "", f"> {NOT_MEDICAL_ADVICE}", "", f"- **Base model:** `{base}`",
             f"- **Data:** {data}", "", "## Hyperparameters", ""]
    lines += [f"- `{k}`: {v}" for k, v in hyper.items()]
    lines += ["", "## Held-out metrics", "", "| metric | value |", "| --- | --- |"]
    lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in metrics.items()]
    if notes:
        lines += ["", notes]
    path = folder / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
