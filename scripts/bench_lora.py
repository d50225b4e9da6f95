"""LoRA adapters on the builtin engine: 16 streams on the base model vs 16 streams spread over 4 adapters, side by
side in one run, and the first request's TTFT after an adapter is loaded at run time.

    python scripts/bench_lora.py --out bench-lora.json
    python scripts/bench_lora.py --rounds 1 --max-tokens 32      # a quick check

One `llmctl serve` process (the embedded SmolLM2-135M-Instruct unless --model-path) serves the model and
--adapters adapters made with PEFT for it (rank --rank on every attention and MLP projection, random weights,
the shape a real fine-tune has). Round after round, --streams concurrent streaming chat requests (each its own
prompt, --max-tokens tokens, end of sequence ignored) run on the base model, then on the adapters (stream i
names adapter i mod --adapters), the order flipping every round so a slow spell of a shared machine weighs on
both. Throughput is output tokens over the round's wall time; the ratio is the median of the rounds' ratios.
Then an adapter is loaded with POST /v1/load_lora_adapter and requested once (the first TTFT after loading),
then again, beside the base model's TTFT for the same prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
from bench_engine import serve_subprocess  # noqa: E402  (scripts/ is on sys.path when run as a script)

from llmctl.bench.loadgen import Endpoint, Workload, send_request
from llmctl.bench.prompts import builtin_prompts

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapters(model: Path, folder: Path, count: int, rank: int) -> list[Path]:
    """``count`` PEFT adapters for ``model`` with random (small) weights, saved under ``folder``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = []
    for i in range(count):
        base = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        torch.manual_seed(i)
        peft_model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(TARGETS),
                                                     init_lora_weights=False))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.normal_(0.0, 0.01)
        peft_model.save_pretrained(folder / f"adapter-{i}")
        paths.append(folder / f"adapter-{i}")
    return paths


async def streams(url: str, models: list[str | None], workload: Workload) -> dict:
    """One request per entry of ``models`` at once; output tokens per second over the wall time, TTFT p50."""
    async with httpx.AsyncClient(timeout=workload.request_timeout, limits=httpx.Limits(max_connections=64)) as client:
        started = time.perf_counter()
        results = await asyncio.gather(*(send_request(client, Endpoint(url, model=model), workload, prompt)
                                         for model, prompt in zip(models, workload.prompts, strict=False)))
        wall = time.perf_counter() - started
    failed = [r.error for r in results if not r.success]
    if failed:
        raise SystemExit(f"{len(failed)} request(s) failed: {failed[:3]}")
    tokens = sum(r.completion_tokens for r in results)
    return {"output_tokens": tokens, "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 2),
            "ttft_p50_ms": round(1000 * statistics.median(r.ttft for r in results if r.ttft is not None), 1)}


def one(url: str, model: str | None, workload: Workload) -> float:
    """TTFT (ms) of one request for ``model``."""
    return asyncio.run(streams(url, [model], workload))["ttft_p50_ms"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kv-cache-tokens", type=int, default=65536)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from llmctl.core.embedded import ensure_embedded_model

    model = args.model_path or ensure_embedded_model()
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_adapters(model, Path(tmp), args.adapters + 1, args.rank)
        names = [f"adapter-{i}" for i in range(args.adapters)]
        flags = ["--model-path", str(model)] + [f for n, p in zip(names, paths, strict=False)
                                                for f in ("--lora", f"{n}={p}")]
        flags += ["--max-loras", str(args.adapters + 1), "--max-lora-rank", str(args.rank)]
        args.model_path = None  # serve_subprocess adds --model-path itself when set: it is in flags
        with serve_subprocess(args, args.streams, tuple(flags)) as (url, _pid):
            rounds = []
            for n in range(args.rounds):
                prompts = builtin_prompts(args.streams, args.prompt_tokens, seed=n)
                workload = Workload(prompts, max_tokens=args.max_tokens)
                plans = {"base": [None] * args.streams,
                         "adapters": [names[i % args.adapters] for i in range(args.streams)]}
                order = list(plans) if n % 2 == 0 else list(reversed(plans))
                result = {name: asyncio.run(streams(url, plans[name], workload)) for name in order}
                result["ratio"] = round(result["adapters"]["tokens_per_s"] / result["base"]["tokens_per_s"], 3)
                rounds.append(result)
                print(f"round {n + 1}: base {result['base']['tokens_per_s']} tok/s, {args.adapters} adapters "
                      f"{result['adapters']['tokens_per_s']} tok/s, ratio {result['ratio']}", flush=True)
            probe = Workload(builtin_prompts(1, args.prompt_tokens, seed=99), max_tokens=8)
            base_ttft = one(url, None, probe)
            started = time.perf_counter()
            r = httpx.post(url + "/v1/load_lora_adapter", timeout=120,
                           json={"lora_name": "fresh", "lora_path": str(paths[-1])})
            load_ms = round(1000 * (time.perf_counter() - started), 1)
            if r.status_code != 200:
                raise SystemExit(f"load_lora_adapter: {r.status_code} {r.text}")
            first, second = one(url, "fresh", probe), one(url, "fresh", probe)
    report = {
        "command": " ".join(["python", "scripts/bench_lora.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": str(model), "adapters": args.adapters, "rank": args.rank, "streams": args.streams,
        "max_tokens": args.max_tokens, "rounds": rounds,
        "median": {"base_tokens_per_s": statistics.median(r["base"]["tokens_per_s"] for r in rounds),
                   "adapters_tokens_per_s": statistics.median(r["adapters"]["tokens_per_s"] for r in rounds),
                   "ratio": statistics.median(r["ratio"] for r in rounds)},
        "after_load": {"load_ms": load_ms, "first_ttft_ms": first, "second_ttft_ms": second,
                       "base_ttft_ms": base_ttft},
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
