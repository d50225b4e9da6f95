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
