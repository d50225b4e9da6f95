"""What computing one-row products as two rows (`llmctl.engine.invariant`) costs a plain one-stream decode step.

    python scripts/bench_invariant.py --steps 200 --rounds 3

Loads the embedded SmolLM2 in bf16 on CPU twice (one copy widened, one as transformers runs it) with the
engine's attention, prefills the same prompt in each and times one-token decode steps, the two copies
taking turns in blocks of 20 steps so that drift on a shared machine hits both alike. Prints each copy's
median step time and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import DynamicCache

from llmctl.core.embedded import embedded_gguf_path
from llmctl.core.loader import LoadOptions, load_model
from llmctl.engine import attention, invariant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="decode steps per copy and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch compute threads (the server's default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    models = {}
    for name in ("plain", "widened"):
        model = load_model(LoadOptions(model_path=embedded_gguf_path(), dtype="bfloat16", device="cpu")).model
        attention.select(model, "auto")
        if name == "widened":
            print(f"widened {invariant.widen(model)} linear layers")
        models[name] = model
    prompt = torch.arange(100, 400)[None]
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(args.rounds):
            state = {}
            for name, model in models.items():
                cache = DynamicCache()
                model(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache)
                state[name] = [cache, prompt.shape[1]]
            for _block in range(args.steps // 20):
                for name, model in models.items():
                    cache, length = state[name]
                    for _ in range(20):
                        started = time.perf_counter()
                        model(input_ids=torch.tensor([[length % 1000 + 7]]), past_key_values=cache,
                              attention_mask=torch.ones((1, length + 1), dtype=torch.long),
                              position_ids=torch.tensor([[length]]))
                        times[name].append(time.perf_counter() - started)
                        length += 1
                    state[name][1] = length
    plain, widened = statistics.median(times["plain"]), statistics.median(times["widened"])
    print(f"{'':10} {'median ms/step':>15} {'steps':>6}")
    for name, value in (("plain", plain), ("widened", widened)):
        print(f"{name:10} {value * 1e3:15.2f} {len(times[name]):6d}")
    print(f"widened / plain: {widened / plain:.3f}x step time")


if __name__ == "__main__":
    main()
