"""vLLM's two Python engines side by side: `LLMEngine` driven from one thread vs `AsyncLLM`.

    python scripts/bench_vllm_drivers.py [--streams 1,16] [--max-tokens 128] [--rounds 3]

The choice behind `llmctl serve --engine vllm` (docs/engine.md). Each driver runs in a process of
its own (vLLM's settings are process-wide), on the same model (default: the embedded SmolLM2, bf16),
with the same engine arguments (`--enforce-eager` by default, so both start in seconds), and serves
the same requests: ``streams`` requests at once, 64 prompt tokens each, ``--max-tokens`` output
tokens (ignore_eos, greedy), token ids in and out as llmctl uses them.

- llm-engine: `LLMEngine` with vLLM's in-process engine core (VLLM_ENABLE_V1_MULTIPROCESSING=0),
  built and stepped on one non-main thread: add_request, then step() until every request is done,
  reading DELTA outputs, as llmctl's engine thread does.
- async-llm: `AsyncLLM` (its engine core in a child process, output handling in asyncio), one
  `generate()` task per request, as vLLM's own server does.

Output: per driver and level, output tokens/s and time to first token (median over rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path


def engine_kwargs(args) -> dict:
    return dict(model=str(args.model), dtype="bfloat16", max_model_len=2048, max_num_seqs=32,
                enforce_eager=not args.compile, skip_tokenizer_init=True, kv_cache_memory_bytes=1 << 30)


def prompts(n: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(64)] for _ in range(n)]


def params(max_tokens: int):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, detokenize=False,
                          output_kind=RequestOutputKind.DELTA)


def run_llm_engine(args, levels: list[int]) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import EngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.llm_engine import LLMEngine

    results: dict = {}

    def work() -> None:  # the engine lives on this thread, as in llmctl
        started = time.perf_counter()
        engine = LLMEngine.from_engine_args(EngineArgs(**engine_kwargs(args)))
        results["build_s"] = time.perf_counter() - started
        for n, streams in enumerate([*levels] * args.rounds + [levels[0]]):  # the last pass: warm-up discarded
            t0 = time.perf_counter()
            first: dict[str, float] = {}
            tokens = 0
            for i, p in enumerate(prompts(streams, n)):
                engine.add_request(f"{n}-{i}", TokensPrompt(prompt_token_ids=p), params(args.max_tokens))
            while engine.has_unfinished_requests():
                for out in engine.step():
                    got = len(out.outputs[0].token_ids)
                    if got and out.request_id not in first:
                        first[out.request_id] = time.perf_counter() - t0
                    tokens += got
            record(results, streams, tokens, time.perf_counter() - t0, list(first.values()))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return results


def run_async_llm(args, levels: list[int]) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.inputs import TokensPrompt
    from vllm.v1.engine.async_llm import AsyncLLM

    results: dict = {}

    async def one(engine, request_id: str, prompt: list[int], t0: float, first: list[float]) -> int:
        tokens = 0
        async for out in engine.generate(TokensPrompt(prompt_token_ids=prompt), params(args.max_tokens), request_id):
            got = len(out.outputs[0].token_ids)
            if got and not tokens:
                first.append(time.perf_counter() - t0)
            tokens += got
        return tokens

    async def main() -> None:
        started = time.perf_counter()
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_kwargs(args)))
        results["build_s"] = time.perf_counter() - started
        try:
            for n, streams in enumerate([*levels] * args.rounds + [levels[0]]):
                t0 = time.perf_counter()
                first: list[float] = []
                counts = await asyncio.gather(*(one(engine, f"{n}-{i}", p, t0, first)
                                                for i, p in enumerate(prompts(streams, n))))
                record(results, streams, sum(counts), time.perf_counter() - t0, first)
        finally:
            engine.shutdown()

    asyncio.run(main())
    return results


def record(results: dict, streams: int, tokens: int, seconds: float, ttfts: list[float]) -> None:
    results.setdefault("runs", []).append({"streams": streams, "tokens": tokens, "seconds": seconds,
                                           "ttft_p50_s": statistics.median(ttfts) if ttfts else None})


def summarize(results: dict, levels: list[int]) -> dict:
    runs = results["runs"][1:]  # the first run is also the warm-up; the extra last pass takes its place
    out = {}
    for streams in levels:
        mine = [r for r in runs if r["streams"] == streams]
        out[streams] = {"tok_s": statistics.median(r["tokens"] / r["seconds"] for r in mine),
                        "ttft_p50_ms": statistics.median(r["ttft_p50_s"] * 1000 for r in mine)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--streams", default="1,16")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="Let vLLM compile (minutes) instead of --enforce-eager.")
    parser.add_argument("--driver", choices=["llm-engine", "async-llm"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.model_path is None:
        from llmctl.core.embedded import ensure_embedded_model

        args.model_path = ensure_embedded_model()
    args.model = args.model_path
    levels = [int(s) for s in args.streams.split(",")]
    if args.driver:  # a child: one driver, results as JSON on the last line
        run = run_llm_engine if args.driver == "llm-engine" else run_async_llm
        print(json.dumps(run(args, levels)), flush=True)
        return
    report = {}
    for driver in ("llm-engine", "async-llm"):
        cmd = [sys.executable, __file__, "--driver", driver, "--model-path", str(args.model_path), "--streams",
               args.streams, "--max-tokens", str(args.max_tokens), "--rounds", str(args.rounds),
               *(["--compile"] if args.compile else [])]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"{driver} failed:\n{done.stderr[-3000:]}")
        results = json.loads(done.stdout.strip().splitlines()[-1])
        report[driver] = {"build_s": round(results["build_s"], 1), "levels": summarize(results, levels)}
        print(f"{driver}: engine built in {results['build_s']:.1f} s", flush=True)
    print(f"\n{'streams':>7} {'driver':12s} {'tok/s':>8} {'TTFT p50 ms':>12}")
    for streams in levels:
        for driver, r in report.items():
            level = r["levels"][streams]
            print(f"{streams:7d} {driver:12s} {level['tok_s']:8.1f} {level['ttft_p50_ms']:12.0f}")
        ratio = report["llm-engine"]["levels"][streams]["tok_s"] / report["async-llm"]["levels"][streams]["tok_s"]
        print(f"{'':7s} llm-engine / async-llm throughput: {ratio:.2f}x")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":  # vLLM's CPU backend spawns processes: the guard is required
    main()
