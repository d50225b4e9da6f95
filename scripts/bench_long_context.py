"""What a cached prefix still costs: attention over it, per row, measured on the raw model.

    python scripts/bench_long_context.py [--prefix-tokens 1527] [--new-tokens 20] [--rows 15]

A prefix cache removes the prefill of a shared prompt, not the attention of the new tokens over
it: every row that continues a 1,500-token prefix attends to 1,500 keys in each layer, at each
prefill and decode step. This script times one forward pass of the model (default: the embedded
SmolLM2, bf16) over ``--new-tokens`` new tokens for 1 and for ``--rows`` rows whose cache already
holds ``--prefix-tokens`` tokens, and the same without the prefix, to show how much of a row's time
is the long context. No server: the model itself, in this process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from llmctl.core.embedded import ensure_embedded_model


def timed_forward(model, base: DynamicCache | None, prefix: int, rows: int, new: int, repeat: int) -> float:
    """Median seconds of one forward pass of ``new`` tokens for ``rows`` rows after ``prefix`` cached tokens."""
    times = []
    for _ in range(repeat):
        cache = DynamicCache()
        if base is not None:  # every row starts from the same cached prefix, as after a prefix-cache hit
            model(input_ids=torch.zeros((1, 1), dtype=torch.long), past_key_values=cache, use_cache=True)
            for layer, source in zip(cache.layers, base.layers):
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--prefix-tokens", type=int, default=1527)
    parser.add_argument("--new-tokens", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model_path or ensure_embedded_model(),
                                                 dtype=getattr(torch, args.dtype)).eval()
    with torch.inference_mode():
        base = DynamicCache()
        model(input_ids=torch.randint(100, 1000, (1, args.prefix_tokens)), past_key_values=base, use_cache=True)
        print(f"{'rows':>4} {'new tokens':>10} {'cached prefix':>13} {'forward ms':>10} {'ms per row':>10}")
        for rows in (1, args.rows):
            for new in (args.new_tokens, 1):
                for prefix, cache in ((args.prefix_tokens, base), (0, None)):
                    seconds = timed_forward(model, cache, prefix, rows, new, args.repeat)
                    print(f"{rows:4d} {new:10d} {prefix:13d} {seconds * 1000:10.0f} {seconds * 1000 / rows:10.1f}",
                          flush=True)


if __name__ == "__main__":
    main()
