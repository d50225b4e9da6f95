"""The builtin engine's CPU attention function against transformers' own SDPA function.

Tensor-level: the same inputs through both (decode, a padded prefill over a cached prefix, a row of
nothing but padding, several row blocks, the causal no-mask case, what falls back). Model-level:
tiny random models of several architectures give the same logits either way, and `select` picks
the function only where it should.
"""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmctl.engine import BuiltinEngine, EngineConfig, attention
from llmctl.engine.attention import GROUPED, grouped_attention_forward, grouped_mask
from llmctl.engine.builtin_setup import BuiltinOptions

HEADS, KV_HEADS, DIM = 6, 2, 16


def module(groups: int = HEADS // KV_HEADS, **extra):
    return types.SimpleNamespace(**{"num_key_value_groups": groups, "training": False, "is_causal": True, **extra})


def qkv(rows: int, queries: int, keys: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, HEADS, queries, DIM, generator=g, dtype=dtype),
            torch.randn(rows, KV_HEADS, keys, DIM, generator=g, dtype=dtype),
            torch.randn(rows, KV_HEADS, keys, DIM, generator=g, dtype=dtype))


def left_padded_mask(rows: int, queries: int, keys: int, padding: list[int]) -> torch.Tensor:
    """Boolean [rows, 1, queries, keys]: causal with the queries last, row r's first padding[r] keys hidden."""
    causal = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
    mask = causal.expand(rows, 1, queries, keys).clone()
    for row, pad in enumerate(padding):
        mask[row, :, :, :pad] = False
    return mask


def additive(mask: torch.Tensor) -> torch.Tensor:
    return torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("queries,keys,padding", [
    (1, 40, [0, 5, 39]),        # decode: one new token over a left-padded cache
    (7, 40, [0, 12, 20]),       # prefill of 7 tokens after a cached prefix
    (12, 12, [0, 3, 8]),        # prefill from nothing, left-padded
])
def test_matches_transformers_sdpa(queries, keys, padding):
    q, k, v = qkv(len(padding), queries, keys)
    mask = left_padded_mask(len(padding), queries, keys, padding)
    expected, _ = sdpa_attention_forward(module(), q, k, v, mask, scaling=DIM ** -0.5)
    got, _ = grouped_attention_forward(module(), q, k, v, additive(mask), scaling=DIM ** -0.5)
    # Rows of queries that see no key at all (padding queries) are garbage either way; compare the rest.
    seen = mask.any(-1)[:, 0]  # [rows, queries]
    assert got.shape == expected.shape
    torch.testing.assert_close(got[seen], expected[seen], atol=1e-5, rtol=1e-5)


def test_bfloat16_matches_within_rounding():
    q, k, v = qkv(3, 1, 300, dtype=torch.bfloat16)
    mask = left_padded_mask(3, 1, 300, [0, 100, 250])
    expected, _ = sdpa_attention_forward(module(), q, k, v, mask, scaling=DIM ** -0.5)
    got, _ = grouped_attention_forward(module(), q, k, v, additive(mask), scaling=DIM ** -0.5)
    assert got.dtype == torch.bfloat16
    assert (got.float() - expected.float()).abs().max() < 0.02


def test_a_row_of_only_padding_stays_finite():
    """A padding query sees no key; with -inf the softmax would give NaN and poison the cache."""
    q, k, v = qkv(2, 4, 10)
    mask = left_padded_mask(2, 4, 10, [0, 8])  # row 1's first two queries see nothing
    assert not mask[1, 0, 0].any()
    got, _ = grouped_attention_forward(module(), q, k, v, additive(mask))
    assert torch.isfinite(got).all()


def test_rows_in_several_blocks_give_the_same_result(monkeypatch):
    q, k, v = qkv(5, 3, 50)
    mask = additive(left_padded_mask(5, 3, 50, [0, 1, 2, 3, 4]))
    whole, _ = grouped_attention_forward(module(), q, k, v, mask)
    monkeypatch.setattr(attention, "SCORE_BLOCK", 2 * HEADS * 3 * 50)  # two rows a block: 3 blocks
    blocks, _ = grouped_attention_forward(module(), q, k, v, mask)
    torch.testing.assert_close(blocks, whole, atol=0, rtol=0)


def test_decode_without_a_mask_sees_every_key():
    q, k, v = qkv(2, 1, 20)
    expected, _ = sdpa_attention_forward(module(), q, k, v, None)
    got, _ = grouped_attention_forward(module(), q, k, v, None)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_what_it_does_not_compute_goes_to_sdpa(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "sdpa_attention_forward",
                        lambda *a, **kw: calls.append(kw) or (torch.zeros(1), None))
    q, k, v = qkv(1, 4, 4)
    mask = additive(left_padded_mask(1, 4, 4, [0]))
    grouped_attention_forward(module(), q, k, v, None)  # causal prefill, no mask: SDPA's fused kernel
    grouped_attention_forward(module(), q, k, v, mask, softcap=30.0)
    grouped_attention_forward(module(sinks=torch.zeros(HEADS)), q, k, v, mask)
    grouped_attention_forward(module(training=True), q, k, v, mask, dropout=0.1)
    monkeypatch.setattr(attention, "SCORE_BLOCK", 8)  # one row has more scores than a block
    grouped_attention_forward(module(), q, k, v, mask)
    assert len(calls) == 5
    with torch.enable_grad():  # gradients: its in-place writes are not differentiable
        grouped_attention_forward(module(), q.requires_grad_(), k, v, mask)
    assert len(calls) == 6


def test_grouped_mask_is_sdpas_mask_made_additive():
    from transformers.masking_utils import sdpa_mask

    padding = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    kwargs = dict(batch_size=2, q_length=2, kv_length=5, q_offset=3, attention_mask=padding)
    boolean = sdpa_mask(**kwargs)
    bias = grouped_mask(**kwargs, dtype=torch.bfloat16)
    assert bias.dtype == torch.float32
    assert torch.equal(bias == 0, boolean)


COMMON = dict(vocab_size=200, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256)
MODELS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=200, n_embd=48, n_layer=2, n_head=6, n_positions=256),
    "mistral-sliding": lambda: transformers.MistralConfig(**COMMON, sliding_window=10),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_models_give_the_same_logits_with_either_attention(name):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MODELS[name]()).eval()
    ids = torch.randint(3, 200, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[1, :5], mask[2, :17] = 0, 0
    with torch.inference_mode():
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert attention.select(model, "grouped") == GROUPED
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], atol=1e-4, rtol=1e-4)
    assert attention.select(model, "transformers") == "sdpa"  # and back


def test_the_engine_uses_it_on_cpu_unless_told_otherwise():
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MODELS["llama"]()).eval()
    assert model.config._attn_implementation == "sdpa"
    assert BuiltinEngine(model, frozenset(), options=BuiltinOptions(attention="transformers")).attention == "sdpa"
    assert BuiltinEngine(model, frozenset(), EngineConfig()).attention == GROUPED
    assert model.config._attn_implementation == GROUPED
    with pytest.raises(ValueError, match="attention must be one of"):
        BuiltinOptions(attention="flash")


def test_auto_keeps_eager_and_non_cpu_models():
    torch.manual_seed(0)
    eager = transformers.AutoModelForCausalLM.from_config(MODELS["llama"](), attn_implementation="eager")
    assert attention.select(eager, "auto") == "eager"
    # A CUDA device cannot exist here: a model whose embeddings report one stands in for it.
    model = transformers.AutoModelForCausalLM.from_config(MODELS["llama"]())
    fake = types.SimpleNamespace(weight=types.SimpleNamespace(device=torch.device("cuda", 0)))
    model.get_input_embeddings = lambda: fake
    assert attention.select(model, "auto") == "sdpa"
