"""Compute threads on a shared CPU: llmctl's default vs torch's default, idle and with every core kept busy.

    python scripts/bench_contention.py --out bench-contention.json
    python scripts/bench_contention.py --model-path /models/Qwen2.5-0.5B-Instruct --seconds 30

Each measurement is a fresh process (OpenMP reads its settings once, when torch loads) that sets its
threads up the way it is named, loads the model as `llmctl serve` does (embedded SmolLM2 by default,
its default dtype) and times greedy `model.generate` of one stream and of 16 streams at once, each
for up to ``--seconds`` (tok/s = new tokens / elapsed). "llmctl" is what `llmctl serve` does without
--cpu-threads; "torch" leaves torch's defaults alone. "busy" runs while a second process keeps one
worker spinning on every usable core. The four cells run one after another in one run, and the
table puts them side by side with the ratios.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

MODES = ("torch", "llmctl")
CONDITIONS = ("idle", "busy")
STREAMS = (1, 16)
PROMPT = [{"role": "user", "content": "Write a short story about a lighthouse keeper and a storm."}]


def _spin() -> None:
    while True:
        pass


def busy_process(cores: int) -> subprocess.Popen:
    """A second process that keeps ``cores`` cores busy until it is killed."""
    code = ("import multiprocessing, sys\nfrom scripts.bench_contention import _spin\n"
            "ps = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(int(sys.argv[1]))]\n"
            "[p.start() for p in ps]\n[p.join() for p in ps]\n")
    return subprocess.Popen([sys.executable, "-c", code, str(cores)], cwd=Path(__file__).resolve().parents[1])


def child(mode: str, model_path: str | None, seconds: float, max_tokens: int) -> dict:
    """One measurement process: set the threads up as ``mode`` does, load, time 1 and 16 streams."""
    if mode == "llmctl":
        from llmctl.core.threads import configure_cpu_threads, resolve_cpu_threads

        configure_cpu_threads(resolve_cpu_threads(None))
    import torch

    from llmctl.bench.offline import chat_texts, load_offline_model

    loaded = load_offline_model(model_path)
    tok = loaded.tokenizer
    tok.padding_side = "left"
    text = chat_texts(tok, [PROMPT])[0]
    result = {"mode": mode, "threads": torch.get_num_threads(), "wait_policy": os.environ.get("OMP_WAIT_POLICY", "-"),
              "dtype": loaded.dtype}
    for streams in STREAMS:
        enc = tok([text] * streams, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.inference_mode():
            # Warm-up, bounded too: under contention torch's default may take most of a minute for 16 prompts.
            loaded.model.generate(**enc, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id,
                                  max_time=seconds / 4)
            started = time.perf_counter()
            out = loaded.model.generate(**enc, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                        max_time=seconds, pad_token_id=tok.pad_token_id)
            elapsed = time.perf_counter() - started
        new = (out.shape[1] - enc["input_ids"].shape[1]) * streams
        result[f"tok_s_{streams}"] = new / elapsed
    return result


def measure(mode: str, condition: str, args: argparse.Namespace, cores: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "LLMCTL_CPU_THREADS")}
    cmd = [sys.executable, __file__, "--child", mode, "--seconds", str(args.seconds),
           "--max-tokens", str(args.max_tokens)] + (["--model-path", args.model_path] if args.model_path else [])
    busy = busy_process(cores) if condition == "busy" else None
    try:
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    return {**json.loads(out.strip().splitlines()[-1]), "condition": condition}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--seconds", type=float, default=20.0, help="Most seconds one generate may take.")
    parser.add_argument("--max-tokens", type=int, default=64, help="New tokens per stream (fewer if --seconds ends).")
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here.")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_path, args.seconds, args.max_tokens)))
        return
    from llmctl.core.threads import usable_cores

    cores = usable_cores()
    load = os.getloadavg()[0]
    console = Console(width=200 if not sys.stdout.isatty() else None)
    rows = []
    for condition in CONDITIONS:
        for mode in MODES:
            rows.append(measure(mode, condition, args, cores))
            console.print(json.dumps(rows[-1]), highlight=False)
    table = Table(title=f"tok/s, {cores} usable cores, 1-min load average {load:.1f} at the start")
    for column in ("condition", "mode", "threads", "OMP_WAIT_POLICY", "1 stream", "16 streams"):
        table.add_column(column)
    for r in rows:
        table.add_row(r["condition"], r["mode"], str(r["threads"]), r["wait_policy"], f"{r['tok_s_1']:.1f}",
                      f"{r['tok_s_16']:.1f}")
    console.print(table)
    by = {(r["condition"], r["mode"]): r for r in rows}
    ratios = {f"{c}_{s}": by[c, "llmctl"][f"tok_s_{s}"] / by[c, "torch"][f"tok_s_{s}"]
              for c in CONDITIONS for s in STREAMS}
    for c in CONDITIONS:
        console.print(f"llmctl/torch {c}: 1 stream {ratios[f'{c}_1']:.2f}x, 16 streams {ratios[f'{c}_16']:.2f}x")
    if args.out:
        args.out.write_text(json.dumps({"cores": cores, "load_average": load, "rows": rows, "ratios": ratios},
                                       indent=2))


if __name__ == "__main__":
    multiprocessing.freeze_support()
    main()
