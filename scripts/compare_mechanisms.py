"""Compare batching mechanisms in one process: raw `model.generate`, transformers' continuous
batching (`generate_batch`), and llmctl's engine — same model, prompts and output length.

    python scripts/compare_mechanisms.py --batches 1,16,32 --max-tokens 128

Prints output tokens/s for each mechanism and batch size, and each one's ratio to raw generate.
Every figure counts the tokens actually generated.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch


def prompts(tokenizer, n: int) -> list[list[int]]:
    topics = ["the sea", "a robot", "autumn", "a city at night", "gravity", "a long journey", "music", "bread"]
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a short story about {topics[i % len(topics)]} (#{i})."}],
            add_generation_prompt=True, tokenize=False)
        out.append(tokenizer(text, add_special_tokens=False)["input_ids"])
    return out


def run_raw(model, tokenizer, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    width = max(map(len, batch))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                             min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad)
    return (out.shape[1] - width) * len(batch), time.perf_counter() - started


def run_hf_cb(model, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
    started = time.perf_counter()
    with torch.inference_mode():
        results = model.generate_batch(inputs=batch, generation_config=config, progress_bar=False, warmup=False)
    elapsed = time.perf_counter() - started
    return sum(len(r.generated_tokens) for r in results.values()), elapsed


def run_engine(engine, batch: list[list[int]], max_tokens: int) -> tuple[int, float]:
    from llmctl.engine import Finish, SamplingParams, Sequence

    started = time.perf_counter()
    seqs = [engine.submit(Sequence(list(p), SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)))
            for p in batch]
    total = 0
    for seq in seqs:
        while not isinstance(seq.events.get(), Finish):
            total += 1
    return total, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--batches", default="1,16,32")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--skip-hf-cb", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from llmctl.core.loader import LoadOptions, load_model
    from llmctl.engine import BuiltinEngine, EngineConfig

    loaded = load_model(LoadOptions(model_path=args.model_path))
    model, tokenizer = loaded.model, loaded.tokenizer
    engine = BuiltinEngine(model, loaded.eos_token_ids, EngineConfig(max_num_seqs=64, kv_cache_tokens=1 << 20))
    engine.start()
    sizes = [int(b) for b in args.batches.split(",")]
    mechanisms = {"raw generate": lambda b: run_raw(model, tokenizer, b, args.max_tokens),
                  "llmctl engine": lambda b: run_engine(engine, b, args.max_tokens)}
    if not args.skip_hf_cb:
        mechanisms["transformers CB"] = lambda b: run_hf_cb(model, b, args.max_tokens)
    for fn in mechanisms.values():  # warm-up
        fn(prompts(tokenizer, 2))
    results: dict[str, dict[int, float]] = {name: {} for name in mechanisms}
    for size in sizes:
        batch = prompts(tokenizer, size)
        for name, fn in mechanisms.items():
            tokens, seconds = fn(batch)
            results[name][size] = tokens / seconds
            print(f"batch {size:>3}  {name:<16} {tokens:>6} tokens in {seconds:6.2f} s = "
                  f"{tokens / seconds:7.1f} tok/s", flush=True)
    engine.stop()
    print(f"\n{'mechanism':<16}" + "".join(f"{'b=' + str(s):>16}" for s in sizes))
    for name, row in results.items():
        cells = "".join(f"{row[s]:8.1f} ({row[s] / results['raw generate'][s]:.2f}x)" for s in sizes)
        print(f"{name:<16}{cells}")
    if args.out:
        args.out.write_text(json.dumps({"model": loaded.name, "max_tokens": args.max_tokens,
                                        "tokens_per_second": results}, indent=2))


if __name__ == "__main__":
    main()
