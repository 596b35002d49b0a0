"""``medkit.train.attention``: grouped-query attention on the CPU without repeating the cache."""
import json

import pytest

from medkit.data import generate


class _Attn:
    """What the attention function reads from a transformers attention module."""

    def __init__(self, groups: int, training: bool = False):
        self.num_key_value_groups, self.training, self.is_causal = groups, training, True


def _qkv_mask(batch=3, kv_heads=2, groups=3, q=1, k=7, dim=8, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    query = torch.randn(batch, kv_heads * groups, q, dim, generator=g)
    key = torch.randn(batch, kv_heads, k, dim, generator=g)
    value = torch.randn(batch, kv_heads, k, dim, generator=g)
    # left padding (row b starts at b), causal over the last q positions
    pad = torch.arange(k)[None, :] >= torch.arange(batch)[:, None]
    causal = torch.arange(k)[None, :] <= (torch.arange(q)[:, None] + k - q)
    mask = (pad[:, None, :] & causal[None]).unsqueeze(1)  # (batch, 1, q, k)
    return query, key, value, mask


def _reference(query, key, value, mask, groups):
    """Every query head with its own copy of its key/value head (transformers' repeat_kv)."""
    import torch

    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(query, k, v, attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("q", [1, 5])
def test_folded_grouped_attention_equals_attention_with_repeated_heads(q):
    """Decoding (one new token) and a prompt pass (several), with left padding: each query head
    attends to its own key/value head, as with the cache repeated."""
    import torch

    from medkit.train import attention

    query, key, value, mask = _qkv_mask(q=q)
    with torch.no_grad():
        out, weights = attention.gqa_sdpa(_Attn(3), query, key, value, mask)
    assert weights is None and out.shape == (3, q, 6, 8)
    torch.testing.assert_close(out, _reference(query, key, value, mask, 3), rtol=1e-5, atol=1e-6)
    # a fold that paired query heads with the wrong key/value head would differ
    wrong = _reference(query.reshape(3, 3, 2, q, 8).transpose(1, 2).reshape(3, 6, q, 8), key, value, mask, 3)
    assert not torch.allclose(out, wrong, atol=1e-3)


def test_the_fold_is_taken_only_for_cpu_inference_with_a_mask(monkeypatch):
    """Training (gradients on), no mask, or one key/value head per query head go to transformers'
    own sdpa function unchanged."""
    import torch
    from transformers.integrations import sdpa_attention

    from medkit.train import attention

    calls = []

    def stock(*args, **kwargs):
        calls.append(1)
        return "stock", None

    monkeypatch.setattr(sdpa_attention, "sdpa_attention_forward", stock)
    query, key, value, mask = _qkv_mask()
    with torch.no_grad():
        attention.gqa_sdpa(_Attn(3), query, key, value, mask)
        assert calls == []  # folded
        assert attention.gqa_sdpa(_Attn(3), query, key, value, None)[0] == "stock"
        assert attention.gqa_sdpa(_Attn(1), query, key.repeat_interleave(3, 1), value, mask)[0] == "stock"
        assert attention.gqa_sdpa(_Attn(3, training=True), query, key, value, mask)[0] == "stock"
    assert attention.gqa_sdpa(_Attn(3), query, key, value, mask)[0] == "stock"  # gradients on
    assert len(calls) == 4


@pytest.fixture(scope="module")
def gqa_model(kbase, tmp_path_factory):
    """A one-layer Llama with 6 query heads sharing 2 key/value heads (SmolLM2 shares 3 per
    head too), saved with a chat-templated tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from medkit import tiny

    tok = tiny.family_tokenizer(tiny.train_tokenizer([p["text"] for p in generate.passages(kbase)][:200], 500), "llama")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("gqa") / "m"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=6, num_key_value_heads=2)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_loaded_models_generate_and_score_as_with_sdpa(gqa_model):
    """``load_causal_lm`` switches a CPU model to the folded attention; batched greedy replies to
    prompts of different lengths (left padding) and completion scores are those of ``sdpa``, and a
    training loss is computed by ``sdpa`` itself."""
    import torch

    from medkit.train import attention, common

    model, tok = common.load_causal_lm(str(gqa_model))
    assert model.config._attn_implementation == attention.NAME
    prompts = [common.messages(q) for q in ("Fever?", "What helps a cough that lasts for three weeks or more?",
                                            "Asthma", "When should chest pain be seen urgently by a doctor?")]
    answers = ["Rest and fluids.", "See a GP.", "Use the reliever inhaler.", "Call 999 now."]

    def run():
        gen = common.generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
        sums, counts, _ = common.shared_prefix_logprobs(model, tok, prompts, answers, batch_size=4)
        x, attn, y = common.encode_completions(tok, prompts, answers)
        loss = model(input_ids=x, attention_mask=attn, labels=y).loss  # gradients on: the stock path
        return [g["raw"] for g in gen], torch.tensor(sums), counts, loss.detach()

    folded = run()
    model.set_attn_implementation("sdpa")
    stock = run()
    assert folded[0] == stock[0]
    torch.testing.assert_close(folded[1], stock[1], rtol=1e-5, atol=1e-4)
    assert folded[2] == stock[2]
    torch.testing.assert_close(folded[3], stock[3])


def test_the_attention_name_is_not_saved_with_the_model(gqa_model, tmp_path):
    """A folder saved from a model that used the folded attention loads anywhere with the default."""
    from transformers import AutoModelForCausalLM

    from medkit.train import attention, common

    model, tok = common.load_causal_lm(str(gqa_model))
    assert model.config._attn_implementation == attention.NAME
    model.save_pretrained(tmp_path / "saved")
    assert attention.NAME not in (tmp_path / "saved" / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "saved" / "config.json").read_text())
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "saved").config._attn_implementation == "sdpa"
