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

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from llmctl.engine.base import ATTENTION_CHOICES
from llmctl.engine.shared import SharedView

log = logging.getLogger(__name__)

GROUPED = "llmctl_grouped"
ORIGINAL = "_llmctl_original_attention"  # set on a model whose attention `select` changed
# This function materializes every score (float32), a few rows at a time: at most this many per block,
# 8 MiB, which stays in a CPU's cache. A row with more (a long prefill) goes to SDPA, whose fused
# kernel tiles them and is then faster (`scripts/bench_long_context.py`).
SCORE_BLOCK = 1 << 21


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
        return attend_with_shared(query, key, value, attention_mask, scale, shared, module.layer_idx), None
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
        end = min(rows, start + step)
        scores = torch.matmul(stacked[start:end], key[start:end].transpose(-1, -2)).float().mul_(scale)
        if attention_mask is not None:
            scores.view(end - start, kv_heads, group, queries, keys).add_(attention_mask[start:end, :, None])
        probs = scores.softmax(dim=-1).to(value.dtype)
        torch.matmul(probs, value[start:end], out=out[start:end])
    return out.view(rows, heads, queries, dim).transpose(1, 2).contiguous(), None


def attend_with_shared(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                       scale: float, shared: SharedView, layer: int) -> torch.Tensor:
    """`grouped_attention_forward` for a batch whose rows in ``shared.groups`` also attend to a shared
    prefix that precedes every key of their own: each part's softmax is computed apart (float32, with
    its maximum and sum) and the two are merged exactly. Returns [B, Q, H, D]."""
    rows, heads, queries, dim = query.shape
    kv_heads, own = key.shape[1], key.shape[2]
    group = heads // kv_heads
    if mask is None and queries > 1:  # causal and nothing else: the last query sees every key
        causal = torch.ones((queries, own), dtype=torch.bool, device=query.device).tril_(own - queries)
        mask = torch.zeros(causal.shape, dtype=torch.float32, device=query.device)
        mask = mask.masked_fill_(~causal, torch.finfo(torch.float32).min)[None, None]
    # [B, KVH, group * Q, D]: query heads i*group .. (i+1)*group-1 use KV head i (transformers' repeat_kv order).
    stacked = query.reshape(rows, kv_heads, group * queries, dim)
    out = torch.empty((rows, kv_heads, group * queries, dim), dtype=torch.float32, device=query.device)
    top = torch.empty((rows, kv_heads, group * queries, 1), dtype=torch.float32, device=query.device)
    total = torch.empty_like(top)
    per_row = heads * queries * own
    step = max(1, SCORE_BLOCK // max(1, per_row))
    for start in range(0, rows, step):  # each row's own keys, a few rows at a time
        end = min(rows, start + step)
        scores = torch.matmul(stacked[start:end], key[start:end].transpose(-1, -2)).float().mul_(scale)
        if mask is not None:
            scores.view(end - start, kv_heads, group, queries, own).add_(mask[start:end, :, None])
        _softmax_parts(scores, value[start:end], out[start:end], top[start:end], total[start:end])
    for members, tokens in shared.groups:  # the prefix: one pass per KV head over all its readers' queries
        width = group * queries
        q = stacked[members].transpose(0, 1).reshape(kv_heads, len(members) * width, dim)
        p_out, p_top, p_total = _prefix_part(q, shared.keys(layer)[:, :tokens], shared.values(layer)[:, :tokens],
                                             scale)
        p_out, p_top, p_total = (t.view(kv_heads, len(members), width, -1).transpose(0, 1)
                                 for t in (p_out, p_top, p_total))
        o_top = top[members]
        new_top = torch.maximum(o_top, p_top)
        own_weight, prefix_weight = (o_top - new_top).exp_(), (p_top - new_top).exp_()
        out[members] = out[members] * own_weight + p_out * prefix_weight
        total[members] = total[members] * own_weight + p_total * prefix_weight
    shared.layers.add(layer)
    result = out.div_(total).to(value.dtype).view(rows, heads, queries, dim)
    return result.transpose(1, 2).contiguous()


def _prefix_part(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention of ``query`` [KVH, N, D] over a prefix's ``key``/``value`` [KVH, P, D], unmasked, as
    `_softmax_parts`' three parts (float32). On CPU, SDPA's fused kernel, which also gives the
    log-sum-exp (the maximum then, with a sum of 1); elsewhere a few query rows at a time."""
    heads, n, dim = query.shape
    if query.device.type == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query[None], key[None], value[None], 0.0, False, scale=scale)
        return out[0].float(), lse[0, ..., None], torch.ones((heads, n, 1), device=query.device)
    out = torch.empty((heads, n, dim), dtype=torch.float32, device=query.device)
    top = torch.empty((heads, n, 1), dtype=torch.float32, device=query.device)
    total = torch.empty_like(top)
    step = max(1, SCORE_BLOCK // (heads * key.shape[-2]))
    for start in range(0, n, step):
        end = min(n, start + step)
        scores = torch.matmul(query[:, start:end], key.transpose(-1, -2)).float().mul_(scale)
        _softmax_parts(scores, value, out[:, start:end], top[:, start:end], total[:, start:end])
    return out, top, total


def _softmax_parts(scores: torch.Tensor, value: torch.Tensor, out: torch.Tensor, top: torch.Tensor,
                   total: torch.Tensor) -> None:
    """Unnormalized softmax(``scores``) @ ``value`` into ``out`` (float32), with each row's maximum score
    in ``top`` and its sum of exponentials in ``total``: the parts two softmaxes merge from."""
    torch.amax(scores, dim=-1, keepdim=True, out=top)
    weights = scores.sub_(top).exp_()
    torch.sum(weights, dim=-1, keepdim=True, out=total)
    out.copy_(torch.matmul(weights.to(value.dtype), value))


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
    if choice not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, not {choice!r}")
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
