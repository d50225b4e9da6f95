"""A CPU attention function for the builtin engine's batches: grouped-query attention as two matmuls.

The builtin engine's batches are left-padded, so every forward pass carries a padding mask. With a
mask, transformers' SDPA path on CPU repeats each KV head to its query heads (a copy of the whole
cache, per layer, per step) and runs SDPA's masked kernel; on a long context that is most of a
decode step (`scripts/bench_long_context.py` times both). This function computes the same attention
without the copy: the query heads that share a KV head are stacked into one matrix, so each KV head
is read once; scores and softmax are in float32; the mask is added, as one float32 tensor built once
per forward pass (`grouped_mask`), with float32's lowest value where a key is hidden, so a row of
left padding (which sees no key at all) stays finite instead of turning into NaN.

It is registered with transformers under `GROUPED` (attention and mask interfaces) and computes only
what it does exactly: a long prefill (more scores per row than `SCORE_BLOCK`, or no mask at all) and
anything it does not implement (logit soft-capping, attention sinks, position biases, dropout in
training, gradients) go to transformers' SDPA function, as before. Sliding windows arrive in the mask.
"""

from __future__ import annotations

import logging
from typing import get_args

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llmctl.engine.builtin_setup import Attention
from llmctl.engine.kv import SharedView

log = logging.getLogger(__name__)

GROUPED = "llmctl_grouped"
ORIGINAL = "_llmctl_original_attention"  # set on a model whose attention `select` changed
# This function materializes every score (float32), a few rows at a time: at most this many per block,
# 8 MiB, which stays in a CPU's cache. A row with more (a long prefill) goes to SDPA, whose fused
# kernel tiles them and is then faster (`scripts/bench_long_context.py`).
SCORE_BLOCK = 1 << 21
# Rows reading a shared prefix: their scores over prefix and own keys, in the model's dtype, at most this
# many per block (2 MiB in bfloat16; larger blocks fell out of cache and ran twice as slow).
SHARED_BLOCK = 1 << 20
# A row of fewer keys than this is padded to it with masked keys: torch's CPU softmax computes a row shorter
# than a vector register (16 floats with AVX-512) with scalar code, which rounds otherwise than the vector
# code does, so a one-token step over 11 keys and a verifying pass over 24 (speculative decoding) would differ.
MIN_KEYS = 32


def grouped_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                              attention_mask: torch.Tensor | None, dropout: float = 0.0,
                              scaling: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of ``query`` [B, H, Q, D] over ``key``/``value`` [B, KVH, K, D]; returns [B, Q, H, D].

    ``attention_mask`` is `grouped_mask`'s: None (causal and nothing else) or additive float32 [B, 1, Q, K].
    """
    shared = kwargs.pop("shared_prefix", None)
    if shared is not None:  # rows of this batch read a shared prefix: only this function knows how
        if _unsupported(module, query, key, value, attention_mask, dropout, kwargs):
            raise NotImplementedError("a shared prefix needs plain attention (no soft-capping, sinks, biases)")
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        layer = module.layer_idx  # transformers' attention modules number their layer (torch types it as a module)
        assert isinstance(layer, int)
        return attend_with_shared(query, key, value, attention_mask, scale, shared, layer), None
    rows, heads, queries, dim = query.shape
    keys = key.shape[2]
    per_row = heads * queries * keys  # scores
    if (attention_mask is None and queries > 1) or per_row > SCORE_BLOCK \
            or _unsupported(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads = key.shape[1]
    group = heads // kv_heads
    scale = dim ** -0.5 if scaling is None else scaling
    # Query heads i*group .. (i+1)*group-1 use KV head i (transformers' repeat_kv order).
    stacked = query.reshape(rows, kv_heads, group * queries, dim)
    out = torch.empty((rows, kv_heads, group * queries, dim), dtype=value.dtype, device=value.device)
    step = SCORE_BLOCK // per_row
    for start in range(0, rows, step):  # a few rows at a time, so their scores stay in cache
        block = slice(start, start + step)
        _attend_own(stacked[block], key[block], value[block],
                    None if attention_mask is None else attention_mask[block], scale, out[block])
    return out.view(rows, heads, queries, dim).transpose(1, 2).contiguous(), None


def _attend_own(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                scale: float, out: torch.Tensor) -> None:
    """Attention of rows' stacked ``query`` [R, KVH, group * Q, D] over their own ``key``/``value``
    [R, KVH, K, D] under additive ``mask`` [R, 1, Q, K], into ``out``; scores and softmax in float32."""
    count, kv_heads, _, _ = query.shape
    if key.shape[2] < MIN_KEYS:
        key, value, mask = _pad_keys(key, value, mask)
    scores = torch.matmul(query, key.transpose(-1, -2)).float().mul_(scale)
    if mask is not None:
        scores.view(count, kv_heads, -1, mask.shape[2], key.shape[2]).add_(mask[:, :, None])
    torch.matmul(scores.softmax(dim=-1).to(value.dtype), value, out=out)


def _pad_keys(key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``key``, ``value`` [R, KVH, K, D] and ``mask`` [R, 1, Q, K] (None: nothing hidden, one query) with zero
    keys and values appended up to `MIN_KEYS`, hidden by the mask: their probabilities are exactly 0."""
    pad = MIN_KEYS - key.shape[2]
    if mask is None:
        mask = torch.zeros((key.shape[0], 1, 1, key.shape[2]), dtype=torch.float32, device=key.device)
    return (torch.nn.functional.pad(key, (0, 0, 0, pad)), torch.nn.functional.pad(value, (0, 0, 0, pad)),
            torch.nn.functional.pad(mask, (0, pad), value=torch.finfo(torch.float32).min))


def attend_with_shared(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, shared: SharedView, layer: int) -> torch.Tensor:
    """`grouped_attention_forward` for a batch whose rows in ``shared.groups`` also attend to a shared
    prefix that precedes every key of their own. Returns [B, Q, H, D].

    A few reader rows at a time (`SHARED_BLOCK` scores), the scores of all their queries over the
    prefix are one matrix product against the one copy of its keys; each row's scores over its own
    keys (masked) are placed after them, one softmax runs over both, and the probabilities multiply
    the prefix's values (again one product for the block) and the row's own. Scores and
    probabilities are in the model's dtype with the softmax accumulated in float32, as transformers'
    eager attention computes them; a fused kernel per part and an exact merge of the two softmaxes
    (cascade attention) measured 1.3-1.7x slower on CPU. Rows that read no prefix attend as usual.
    """
    rows, heads, queries, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    width = heads // kv_heads * queries
    if mask is None and queries > 1:  # causal and nothing else: the last query sees every key
        causal = torch.ones((queries, own), dtype=torch.bool, device=query.device).tril_(own - queries)
        mask = torch.zeros(causal.shape, dtype=torch.float32, device=query.device)
        mask = mask.masked_fill_(~causal, torch.finfo(torch.float32).min)[None, None].expand(rows, 1, -1, -1)
    # [B, KVH, group * Q, D]: query heads i*group .. (i+1)*group-1 use KV head i (transformers' repeat_kv order).
    stacked = query.reshape(rows, kv_heads, width, dim)
    out = torch.empty((rows, kv_heads, width, dim), dtype=value.dtype, device=value.device)
    readers = torch.zeros(rows, dtype=torch.bool, device=query.device)
    for members, tokens in shared.groups:
        readers[members] = True
        step = max(1, SHARED_BLOCK // (kv_heads * width * (tokens + own)))
        for start in range(0, len(members), step):
            block = members[start:start + step]
            out[block] = _with_prefix(stacked[block] * scale, key[block], value[block],
                                      None if mask is None else mask[block], shared.keys(layer)[:, :tokens],
                                      shared.values(layer)[:, :tokens])
    if not bool(readers.all()):  # rows that read no prefix: their own keys only
        alone, step = (~readers).nonzero().squeeze(1), max(1, SCORE_BLOCK // (heads * queries * own))
        for start in range(0, len(alone), step):
            block = alone[start:start + step]
            part = torch.empty((len(block), kv_heads, width, dim), dtype=value.dtype, device=value.device)
            _attend_own(stacked[block], key[block], value[block], None if mask is None else mask[block], scale, part)
            out[block] = part
    shared.layers.add(layer)
    return out.view(rows, heads, queries, dim).transpose(1, 2).contiguous()


def _with_prefix(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                 prefix_keys: torch.Tensor, prefix_values: torch.Tensor) -> torch.Tensor:
    """Attention of the scaled ``query`` [R, KVH, W, D] of R rows over a prefix's keys and values
    [KVH, P, D], then each row's own ``key``/``value`` [R, KVH, K, D] under additive ``mask`` [R, 1, Q, K]
    (W = group * Q); returns [R, KVH, W, D]."""
    count, kv_heads, width, dim = query.shape
    prefix, own = prefix_keys.shape[1], key.shape[2]
    scores = torch.empty((kv_heads, count * width, prefix + own), dtype=query.dtype, device=query.device)
    together = query.transpose(0, 1).reshape(kv_heads, count * width, dim)
    torch.bmm(together, prefix_keys.transpose(1, 2), out=scores[:, :, :prefix])
    mine = torch.matmul(query, key.transpose(-1, -2))  # [R, KVH, W, K]
    if mask is not None:
        mine.view(count, kv_heads, -1, mask.shape[2], own).add_(mask[:, :, None])
    scores.view(kv_heads, count, width, prefix + own)[..., prefix:] = mine.transpose(0, 1)
    probs = torch.softmax(scores, dim=-1)
    out = torch.bmm(probs[:, :, :prefix], prefix_values).view(kv_heads, count, width, dim).transpose(0, 1)
    return out + torch.matmul(probs.view(kv_heads, count, width, -1)[..., prefix:].transpose(0, 1), value)


def grouped_mask(*args, **kwargs) -> torch.Tensor | None:
    """SDPA's mask (None where causal is all there is) as an additive float32 mask, built once per forward.

    Adding a float mask costs a fifth of filling a boolean one across the grouped heads; masked
    places get float32's lowest value rather than -inf, so a fully masked row stays finite.
    """
    mask = sdpa_mask(*args, **kwargs)
    if mask is None:
        return None
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, torch.finfo(torch.float32).min)


def _unsupported(module, query, key, value, attention_mask, dropout, kwargs) -> bool:
    return bool(
        (dropout and module.training)
        or (query.requires_grad and torch.is_grad_enabled())  # training: writes into `out` are not differentiable
        or kwargs.get("softcap")
        or kwargs.get("position_bias") is not None
        or kwargs.get("output_attentions")
        or getattr(module, "sinks", None) is not None
        or query.shape[1] % key.shape[1]
        or not query.shape[-1] == key.shape[-1] == value.shape[-1]
        or (attention_mask is not None and attention_mask.dim() != 4)
    )


def register() -> None:
    """Make `GROUPED` a name transformers models accept as their attention implementation."""
    AttentionInterface.register(GROUPED, grouped_attention_forward)
    AttentionMaskInterface.register(GROUPED, grouped_mask)


def select(model, choice: str = "auto") -> str:
    """Set the attention the builtin engine runs ``model`` with; returns the implementation in use.

    ``auto``: the grouped function on CPU when the model runs transformers' SDPA (on a GPU, SDPA's
    fused kernels are the better choice and stay); ``grouped``: the grouped function wherever the
    model runs; ``transformers``: whatever transformers chose when the model was loaded.
    """
    if choice not in get_args(Attention):
        raise ValueError(f"attention must be one of {', '.join(get_args(Attention))}, not {choice!r}")
    current = model.config._attn_implementation
    original = getattr(model, ORIGINAL, current)  # what transformers chose, before any engine changed it
    device = model.get_input_embeddings().weight.device
    wanted = choice == "grouped" or (choice == "auto" and original == "sdpa" and device.type == "cpu")
    target = GROUPED if wanted else original
    if target == current:
        return current
    register()
    try:
        model.set_attn_implementation(target)
    except (ValueError, ImportError) as exc:  # a model class that accepts no custom attention
        log.warning("Keeping %s attention: %s", current, exc)
        return current
    setattr(model, ORIGINAL, original)
    return target
