"""What a cached prefix still costs: attention over it, per row, measured on the raw model.

    python scripts/bench_long_context.py [--prefix-tokens 1527] [--new-tokens 20] [--rows 15]

A prefix cache removes the prefill of a shared prompt, not the attention of the new tokens over
it: every row that continues a 1,500-token prefix attends to 1,500 keys in each layer, at each
prefill and decode step. This script times one forward pass of the model (default: the embedded
SmolLM2, bf16) over ``--new-tokens`` new tokens and over one token (a decode step), for 1 and for
``--rows`` rows whose cache already holds ``--prefix-tokens`` tokens, and the same without the
prefix, once with transformers' own attention (SDPA) and once with the builtin engine's CPU
attention (llmctl.engine.attention), in the same process. No server: the model itself.

Then the attention alone, at one layer's shapes for the same rows (the model's query and KV heads,
bf16): transformers' SDPA function (on CPU with a mask: KV heads repeated to the query heads, then
SDPA), torch's SDPA with `enable_gqa`, llmctl's grouped function, and llmctl's function with the
prefix read from one shared copy (`attend_with_shared`: every row has the same prefix, as an
agent's requests after one system prompt have).
"""

from __future__ import annotations

import argparse
import statistics
import time
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmctl.core.embedded import ensure_embedded_model
from llmctl.engine import attention
from llmctl.engine.kv import SharedPrefix, SharedView


def timed_forward(model, base: DynamicCache | None, prefix: int, rows: int, new: int, repeat: int) -> float:
    """Median seconds of one forward pass of ``new`` tokens for ``rows`` rows after ``prefix`` cached tokens."""
    times = []
    for _ in range(repeat):
        cache = DynamicCache()
        if base is not None:  # every row starts from the same cached prefix, as after a prefix-cache hit
            model(input_ids=torch.zeros((1, 1), dtype=torch.long), past_key_values=cache, use_cache=True)
            for layer, source in zip(cache.layers, base.layers, strict=False):
                layer.keys = source.keys.repeat(rows, 1, 1, 1).contiguous()
                layer.values = source.values.repeat(rows, 1, 1, 1).contiguous()
        ids = torch.randint(100, 1000, (rows, new))
        mask = torch.ones(rows, prefix + new, dtype=torch.long)
        positions = torch.arange(prefix, prefix + new).expand(rows, -1)
        started = time.perf_counter()
        model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache, use_cache=True,
              logits_to_keep=1)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def attention_kernels(heads: int, kv_heads: int, head_dim: int, rows: int, prefix: int, new: int,
                      dtype: torch.dtype, repeat: int = 20) -> dict[str, float]:
    """Median ms of one layer's attention, four ways, for ``rows`` rows of ``new`` queries over prefix + new
    keys (the prefix the same in every row)."""
    keys = prefix + new
    q = torch.randn(rows, heads, new, head_dim, dtype=dtype)
    shared_kv = torch.randn(1, 2, kv_heads, prefix, head_dim, dtype=dtype)  # [layers, K/V, ...]
    k = torch.cat([shared_kv[0, 0].expand(rows, -1, -1, -1),
                   torch.randn(rows, kv_heads, new, head_dim, dtype=dtype)], 2)
    v = torch.cat([shared_kv[0, 1].expand(rows, -1, -1, -1),
                   torch.randn(rows, kv_heads, new, head_dim, dtype=dtype)], 2)
    view = SharedView.of(SharedPrefix([], shared_kv), torch.full((rows,), prefix))
    mask = torch.ones(rows, 1, new, keys, dtype=torch.bool).tril(diagonal=prefix)
    bias = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)  # attention.grouped_mask's
    layer = types.SimpleNamespace(num_key_value_groups=heads // kv_heads, training=False, is_causal=True)

    def transformers_sdpa():
        return sdpa_attention_forward(layer, q, k, v, mask)[0]

    def sdpa_gqa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)

    def grouped():
        return attention.grouped_attention_forward(layer, q, k, v, bias)[0]

    def shared():
        return attention.attend_with_shared(q, k[:, :, prefix:], v[:, :, prefix:], bias[..., prefix:],
                                            head_dim ** -0.5, view, 0)

    reference = transformers_sdpa().float()
    out = {}
    for name, fn in (("transformers_sdpa", transformers_sdpa), ("sdpa_enable_gqa", sdpa_gqa), ("grouped", grouped),
                     ("shared", shared)):
        assert (fn().float() - reference).abs().max() < 0.05, name  # the same attention, to bf16 rounding
        times = []
        for _ in range(repeat):
            started = time.perf_counter()
            fn()
            times.append(time.perf_counter() - started)
        out[name] = statistics.median(times) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prefix-tokens", type=int, default=1527)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model_path or ensure_embedded_model(),
                                                 dtype=getattr(torch, args.dtype)).eval()
    with torch.inference_mode():
        base = DynamicCache()
        started = time.perf_counter()  # what a request pays when the prefix is not cached: its whole prefill
        model(input_ids=torch.randint(100, 1000, (1, args.prefix_tokens)), past_key_values=base, use_cache=True)
        print(f"prefill of the {args.prefix_tokens}-token prefix itself, one row: "
              f"{(time.perf_counter() - started) * 1000:.0f} ms")
        cases = [(rows, new, prefix) for rows in (1, args.rows) for new in (args.new_tokens, 1)
                 for prefix in (args.prefix_tokens, 0)]
        ms = {}
        for n, (rows, new, prefix) in enumerate(cases):  # both attentions on each case, the order flipping
            for choice in ("transformers", "grouped")[::1 if n % 2 else -1]:
                attention.select(model, choice)
                ms[choice, rows, new, prefix] = timed_forward(model, base if prefix else None, prefix, rows, new,
                                                              args.repeat) * 1000
        print(f"{'rows':>4} {'new tokens':>10} {'cached prefix':>13} {'transformers ms':>15} {'llmctl ms':>9} "
              f"{'ratio':>6}")
        for rows, new, prefix in cases:
            before, after = ms["transformers", rows, new, prefix], ms["grouped", rows, new, prefix]
            print(f"{rows:4d} {new:10d} {prefix:13d} {before:15.0f} {after:9.0f} {after / before:6.2f}", flush=True)
    config = model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    print(f"\none layer's attention ({heads} query heads, {kv_heads} KV heads, head dim {head_dim}, "
          f"{args.dtype}), {args.rows} rows, ms:")
    print(f"{'new tokens':>10} {'cached prefix':>13} {'transformers SDPA':>17} {'SDPA enable_gqa':>15} "
          f"{'llmctl grouped':>14} {'llmctl shared':>13}")
    for new in (1, args.new_tokens):
        ms = attention_kernels(heads, kv_heads, head_dim, args.rows, args.prefix_tokens, new,
                               getattr(torch, args.dtype))
        print(f"{new:10d} {args.prefix_tokens:13d} {ms['transformers_sdpa']:17.2f} {ms['sdpa_enable_gqa']:15.2f} "
              f"{ms['grouped']:14.2f} {ms['shared']:13.2f}", flush=True)


if __name__ == "__main__":
    main()
