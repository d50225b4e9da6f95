"""`llmctl serve --engine vllm` against `vllm serve` itself and against `llmctl serve` (builtin engine).

    python scripts/bench_vllm.py --out bench-vllm.json
    python scripts/bench_vllm.py --concurrency 1,4 --requests 8 --max-tokens 32   # a quick check

Run it with a Python that has both vLLM and llmctl (`make install ENGINE=vllm`). The three servers
run at once, each in its own process on 127.0.0.1, on the same model folder (default: the embedded
SmolLM2-135M-Instruct, converted to bf16), with the same batch and KV-cache sizes; `llmctl bench`'s
load generator then takes them in turn at each level (ABBA order, so a drift of the machine weighs on
all alike), with the same prompts and output length (ignore_eos). Only one server generates at a time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import httpx

from llmctl.bench.loadgen import BenchPlan, Endpoint, Workload, run_benchmark
from llmctl.bench.prompts import builtin_prompts
from llmctl.core.embedded import ensure_embedded_model
from llmctl.server.testing import free_port

BYTES_PER_TOKEN = {"SmolLM2-135M-Instruct-bf16": 30 * 3 * 64 * 2 * 2}  # layers x KV heads x head dim x (K, V) x bf16


@contextlib.contextmanager
def server(name: str, argv: list[str], port: int, log_dir: Path, env: dict | None = None) -> Iterator[str]:
    log_path = log_dir / f"{name}.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def wait_ready(url: str, timeout: float, name: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return time.monotonic() - started
        time.sleep(1)
    raise SystemExit(f"{name} was not ready within {timeout:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, help="A Hugging Face folder (default: the embedded SmolLM2).")
    parser.add_argument("--concurrency", default="1,16,32")
    parser.add_argument("--requests", type=int, help="Requests per level (default: 4 per stream, at least 8).")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-cache-tokens", type=int, default=16384)
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="Both vLLM servers skip torch.compile (start in seconds; generate slower).")
    parser.add_argument("--logs", type=Path, default=Path("bench-vllm-logs"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    model = args.model_path or ensure_embedded_model()
    per_token = BYTES_PER_TOKEN.get(model.name)
    if per_token is None:
        raise SystemExit("Give the model's KV bytes per token in BYTES_PER_TOKEN to size vllm serve's cache alike.")
    args.logs.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    common = ["--max-num-seqs", str(args.max_num_seqs)]
    eager = ["--enforce-eager"] if args.enforce_eager else []
    ports = {name: free_port() for name in ("vllm-serve", "llmctl-vllm", "llmctl-builtin")}
    argv = {
        "vllm-serve": [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--host",
                       "127.0.0.1", "--port", str(ports["vllm-serve"]), "--served-model-name", "smollm2",
                       "--kv-cache-memory-bytes", str(args.kv_cache_tokens * per_token), *common, *eager],
        "llmctl-vllm": [py, "-m", "llmctl", "serve", "--engine", "vllm", "--model-path", str(model), "--host",
                        "127.0.0.1", "--port", str(ports["llmctl-vllm"]), "--served-model-name", "smollm2",
                        "--kv-cache-tokens", str(args.kv_cache_tokens), "--max-waiting", "256",
                        "--request-timeout", "300", "--log-level", "warning", *common, *eager],
        "llmctl-builtin": [py, "-m", "llmctl", "serve", "--model-path", str(model), "--host", "127.0.0.1",
                           "--port", str(ports["llmctl-builtin"]), "--served-model-name", "smollm2",
                           "--kv-cache-tokens", str(args.kv_cache_tokens), "--max-waiting", "256",
                           "--request-timeout", "300", "--log-level", "warning", *common],
    }
    levels = [int(c) for c in args.concurrency.split(",")]
    with contextlib.ExitStack() as stack:
        urls = {name: stack.enter_context(server(name, cmd, ports[name], args.logs))
                for name, cmd in argv.items()}
        startup = {}
        for name, url in urls.items():  # the vLLM builds compile one after another anyway on 2 cores
            startup[name] = wait_ready(url, 1800, name)
            print(f"{name:15s} ready after {startup[name]:.0f} s (measured while the others started too)",
                  flush=True)
        endpoints = [Endpoint(url, "smollm2", label=name) for name, url in urls.items()]
        plan = BenchPlan(endpoints, Workload(builtin_prompts(sum(max(8, 4 * c) for c in levels) + 8, 64),
                                             max_tokens=args.max_tokens), levels, args.requests, warmup=4)
        runs, _ = run_benchmark(plan, progress=None)
    report(runs, levels)
    if args.out:
        args.out.write_text(json.dumps({"startup_s": startup, "runs": [
            {"label": r.label, "levels": [asdict(s) for s in r.levels]} for r in runs]}, indent=2))


def report(runs, levels: list[int]) -> None:
    by = {run.label: {s.concurrency: s for s in run.levels} for run in runs}
    base = by["vllm-serve"]
    print(f"\n{'streams':>7} {'server':15s} {'tok/s':>8} {'vs vllm':>8} {'TTFT p50 ms':>12} {'vs vllm':>8} "
          f"{'failed':>6}")
    for c in levels:
        for label in by:
            s = by[label][c]
            print(f"{c:7d} {label:15s} {s.output_throughput:8.1f} "
                  f"{s.output_throughput / base[c].output_throughput:7.2f}x "
                  f"{s.ttft_ms.median or 0:12.0f} {(s.ttft_ms.median or 0) / (base[c].ttft_ms.median or 1):7.2f}x "
                  f"{s.failed:6d}")


if __name__ == "__main__":
    main()
