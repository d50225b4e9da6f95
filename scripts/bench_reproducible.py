"""What reproducible answers cost on the builtin engine (docs/engine.md, "Reproducible answers").

    python scripts/bench_reproducible.py [--prompt-tokens 512] [--streams 16] [--new-tokens 32] [--longest-prompt 300]
                                         [--rounds 3]

1. Reproducible prefills (the default): a prompt prefilled alone runs in chunks of `CHUNK_TOKENS`
   fixed by absolute position. This times one prompt of ``--prompt-tokens`` on the raw model
   (default: the embedded SmolLM2, bf16, the engine's attention) in one pass and in chunks of 64, 128
   and 256 tokens, interleaved over ``--rounds``, and prints each chunking's median and its ratio to
   one pass.
2. `--deterministic` (batch invariance): ``--streams`` requests of different prompt lengths submitted
   at once to the engine, each ``--new-tokens`` long (greedy, ignore_eos), with the engine's default
   and with deterministic=True, interleaved over ``--rounds``; prints each mode's decode tok/s (median)
   and the ratio, and whether every request's tokens were the same in every deterministic round as alone.
No server: the engine on its own thread. Prints JSON lines too (``--json``).
"""

# ruff: noqa: E402 (torch is imported after its thread settings)
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from llmctl.core.threads import configure_cpu_threads

# Torch's threads: LLMCTL_CPU_THREADS, else every usable core (where `llmctl serve`'s adaptive count starts).
# The engines here are not tuned: the runs it compares all compute at that one count.
configure_cpu_threads(int(os.environ.get("LLMCTL_CPU_THREADS", "0")) or None)

import torch
from transformers import AutoModelForCausalLM, DynamicCache

from llmctl.core.embedded import ensure_embedded_model
from llmctl.engine import BuiltinEngine, EngineConfig, Sequence, attention
from llmctl.engine.base import Finish
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.sampling import SamplingParams


def prefill_seconds(model, ids: torch.Tensor, chunk: int) -> float:
    """Seconds to prefill ``ids`` [1, T] in chunks of ``chunk`` tokens fixed by absolute position."""
    cache, total, start = DynamicCache(), ids.shape[1], 0
    started = time.perf_counter()
    with torch.inference_mode():
        while start < total:
            end = min(total, (start // chunk + 1) * chunk)
            model(input_ids=ids[:, start:end], attention_mask=torch.ones((1, end), dtype=torch.long),
                  position_ids=torch.arange(start, end)[None], past_key_values=cache, use_cache=True,
                  logits_to_keep=1)
            start = end
    return time.perf_counter() - started


def tokens_of(seq: Sequence) -> list[int]:
    out = []
    while not isinstance(event := seq.events.get(timeout=600), Finish):
        out.append(event)
    return out


def run_streams(model, prompts: list[list[int]], new_tokens: int, deterministic: bool) -> tuple[float, list]:
    """Decode tok/s of all ``prompts`` submitted at once, and each one's tokens."""
    engine = BuiltinEngine(model, frozenset(), EngineConfig(max_num_seqs=len(prompts)),
                           options=BuiltinOptions(deterministic=deterministic))
    engine.start()
    try:
        params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
        seqs = [Sequence(list(p), params) for p in prompts]
        started = time.perf_counter()
        for seq in seqs:
            engine.submit(seq)
        outputs = [tokens_of(seq) for seq in seqs]
        return len(prompts) * new_tokens / (time.perf_counter() - started), outputs
    finally:
        engine.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--longest-prompt", type=int, default=300, help="Prompts run from 20 tokens to this.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model_path or ensure_embedded_model(), dtype=torch.bfloat16)
    model.eval()
    print(f"model: {model.config._name_or_path}, dtype bf16, attention {attention.select(model, 'auto')}, "
          f"{torch.get_num_threads()} torch thread(s)")
    vocab = model.config.vocab_size
    ids = torch.randint(100, vocab - 1, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    chunks = [args.prompt_tokens, 256, 128, 64]
    prefill_seconds(model, ids, args.prompt_tokens)  # warm-up
    times: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.rounds):
        for chunk in chunks:
            times[chunk].append(prefill_seconds(model, ids, chunk))
    one_pass = statistics.median(times[args.prompt_tokens])
    print(f"\nprefill of {args.prompt_tokens} tokens, median of {args.rounds}:")
    for chunk in chunks:
        median = statistics.median(times[chunk])
        label = "one pass" if chunk == args.prompt_tokens else f"chunks of {chunk}"
        print(f"  {label:>14}: {median:6.2f} s  {median / one_pass:5.2f}x one pass")
        if args.json:
            print(json.dumps({"prefill_tokens": args.prompt_tokens, "chunk": chunk, "seconds": median}))

    generator = torch.Generator().manual_seed(1)
    lengths = [20 + (args.longest_prompt - 20) * i // max(1, args.streams - 1) for i in range(args.streams)]
    prompts = [torch.randint(100, vocab - 1, (n,), generator=generator).tolist() for n in lengths]
    rates: dict[bool, list[float]] = {False: [], True: []}
    alone = [run_streams(model, [p], args.new_tokens, True)[1][0] for p in prompts[:1]]
    same = True
    for _ in range(args.rounds):
        for mode in (False, True):
            rate, outputs = run_streams(model, prompts, args.new_tokens, mode)
            rates[mode].append(rate)
            if mode:
                same = same and outputs[0] == alone[0]
    default, deterministic = statistics.median(rates[False]), statistics.median(rates[True])
    print(f"\n{args.streams} streams ({lengths[0]}-{lengths[-1]} prompt tokens), {args.new_tokens} new tokens each, "
          f"median of {args.rounds}:")
    print(f"  default:        {default:7.1f} tok/s")
    print(f"  --deterministic: {deterministic:6.1f} tok/s  {deterministic / default:5.2f}x default")
    print(f"  first request's tokens in every --deterministic round == alone: {same}")
    if args.json:
        print(json.dumps({"streams": args.streams, "default_tok_s": default, "deterministic_tok_s": deterministic,
                          "same_as_alone": same}))


if __name__ == "__main__":
    main()
