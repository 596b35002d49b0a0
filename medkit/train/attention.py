"""Grouped-query attention on the CPU without copying the key/value cache.

SmolLM2, like Llama 3 and Qwen2, has fewer key/value heads than query heads: its 9 query heads
share 3 key/value heads. transformers' ``sdpa`` attention passes that to
``torch.nn.functional.scaled_dot_product_attention`` as "grouped" only when there is no attention
mask; with one (a batch of left-padded prompts, which is every batched generation in the course)
it first repeats each key/value head for its query heads (``repeat_kv``): a copy of the whole cache,
three times over, in every layer and at every generated token. On a CPU that copy grows with the
reply: in a profile of 05's 32 held-out cases (SmolLM2, 160 new tokens, one thread) it was a
quarter of the time.

``gqa_sdpa`` folds the query heads onto their key/value head instead: the queries of one group
become extra query rows of that head, the mask is repeated for them (a few rows, not the cache),
and attention runs once per key/value head. Every query row sees exactly the keys and values it
saw before, so the output is the same attention, computed without the copy.

It is used for inference on the CPU with a mask and a grouped model. Everywhere else (training,
no mask, GPUs, models with as many key/value heads as query heads) it hands over to transformers'
own ``sdpa`` function unchanged. ``register()`` adds it to transformers under :data:`NAME`; a model
opts in with ``model.set_attn_implementation(NAME)`` (``common.load_causal_lm`` does on the CPU).
The name is not saved with the model: a saved folder loads with the default attention anywhere.
"""
from __future__ import annotations

from typing import Any

NAME = "medkit_gqa_sdpa"


def gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None,
             is_causal: bool | None = None, **kwargs: Any):
    """An attention function with the signature of transformers' ``sdpa_attention_forward``:
    ``query`` (batch, heads, q, dim), ``key``/``value`` (batch, kv_heads, k, dim), a boolean or
    additive ``attention_mask`` (batch or 1, 1, q, k) or None; returns ``(output, None)`` with the
    output as (batch, q, heads, dim)."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    n_rep = int(getattr(module, "num_key_value_groups", 1) or 1)
    if (n_rep == 1 or attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[1] != 1
            or query.device.type != "cpu" or module.training or torch.is_grad_enabled()
            or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    b, h, q, d = query.shape
    hk = key.shape[1]
    # head h = kv * n_rep + r (as repeat_kv lays them out) -> row r * q + i of kv head ``kv``
    folded = query.reshape(b, hk, n_rep * q, d)
    mb, _, mq, mk = attention_mask.shape
    mask = attention_mask.unsqueeze(2).expand(mb, 1, n_rep, mq, mk).reshape(mb, 1, n_rep * mq, mk)
    out = torch.nn.functional.scaled_dot_product_attention(folded, key, value, attn_mask=mask, dropout_p=0.0,
                                                           scale=scaling)
    return out.reshape(b, h, q, d).transpose(1, 2).contiguous(), None


def register() -> str:
    """Make :data:`NAME` known to transformers (attention and mask functions); safe to call
    again. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, gqa_sdpa)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


def use_on_cpu(model) -> Any:
    """Switch a CPU model that uses transformers' ``sdpa`` attention to :data:`NAME`; any other
    model is returned unchanged. Returns the model."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) != "sdpa" or model.device.type != "cpu":
        return model
    model.set_attn_implementation(register())
    return model
