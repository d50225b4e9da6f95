"""Soak test: many streaming clients for a long time, with random disconnects and timeouts.

Starts `llmctl serve` as a subprocess on 127.0.0.1, runs --clients concurrent streaming clients for
--duration seconds, and checks: no unexpected errors, resident memory growth after warm-up under 5%,
and no sequence left running or waiting once the clients are gone. Bounded in time and count; all
traffic goes to 127.0.0.1. Exit code 0 when every check passes.

    python scripts/soak.py --duration 600 --clients 16             # the documented run
    python scripts/soak.py --duration 60 --model-path ./tiny-model  # a quick one
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter

import httpx
import psutil

PROMPTS = ["Tell me about the sea.", "What is the capital of France?", "Write a haiku about autumn.",
           "Explain gravity to a child.", "List five fruits.", "Describe a city at night."]


def start_server(model_path: str | None, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`llmctl serve` on a free port of 127.0.0.1 with ``extra`` arguments, once it is ready."""
    from llmctl.server.testing import free_port

    port = free_port()
    cmd = [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--log-level", "warning", *extra]
    if model_path:
        cmd += ["--model-path", model_path]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ready":
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        time.sleep(0.5)
    raise SystemExit("server did not become ready")


def client_loop(url: str, stop_at: float, seed: int, tally: Counter, errors: list, lock: threading.Lock) -> None:
    rng = random.Random(seed)
    with httpx.Client(base_url=url, timeout=120) as client:
        while time.monotonic() < stop_at:
            kind = rng.choices(["normal", "disconnect", "timeout"], weights=[8, 1, 1])[0]
            body = {"messages": [{"role": "user", "content": rng.choice(PROMPTS)}], "stream": True,
                    "max_tokens": rng.randint(16, 128), "temperature": rng.choice([0, 0.7, 1.0]),
                    "stream_options": {"include_usage": True}}
            if kind == "timeout":
                body.update(timeout=rng.uniform(0.05, 1.0), max_tokens=200, ignore_eos=True)
            outcome = run_one(client, body, kind, rng)
            with lock:
                tally[outcome] += 1
                if outcome.startswith("unexpected"):
                    errors.append(outcome)


def run_one(client: httpx.Client, body: dict, kind: str, rng: random.Random) -> str:
    try:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code == 408 and kind == "timeout":
                return "timeout (408)"
            if r.status_code == 429:
                return "rejected (429)"
            if r.status_code != 200:
                return f"unexpected status {r.status_code}: {r.read()[:200]!r}"
            lines = []
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                lines.append(line)
                if kind == "disconnect" and len(lines) >= rng.randint(2, 10):
                    return "disconnected"
            if kind == "timeout" and lines and "timeout_error" in lines[-1]:
                return "timeout (in stream)"
            if lines and lines[-1] == "data: [DONE]":
                return "completed"
            return f"unexpected stream end: {lines[-1][:200] if lines else 'no data'}"
    except httpx.HTTPError as exc:
        return f"unexpected transport error: {type(exc).__name__}: {exc}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600, help="seconds of load (default 600)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--out", default=None, help="write the summary as JSON here")
    args = parser.parse_args()

    proc, url = start_server(args.model_path, ["--max-num-seqs", str(args.clients)])
    server = psutil.Process(proc.pid)
    tally: Counter = Counter()
    errors: list[str] = []
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []
    started = time.monotonic()
    stop_at = started + args.duration
    threads = [threading.Thread(target=client_loop, args=(url, stop_at, i, tally, errors, lock), daemon=True)
               for i in range(args.clients)]
    for t in threads:
        t.start()
    while time.monotonic() < stop_at:
        rss.append((time.monotonic() - started, server.memory_info().rss / 2**20))
        time.sleep(min(5.0, max(0.1, stop_at - time.monotonic())))
    for t in threads:
        t.join(180)
    for _ in range(3):  # after the clients are gone
        time.sleep(1.0)
        rss.append((time.monotonic() - started, server.memory_info().rss / 2**20))

    deadline = time.monotonic() + 10
    health = httpx.get(url + "/health", timeout=5).json()
    while (health["running"] or health["waiting"]) and time.monotonic() < deadline:
        time.sleep(0.2)
        health = httpx.get(url + "/health", timeout=5).json()
    metrics = httpx.get(url + "/metrics", timeout=5).json()
    os.killpg(proc.pid, signal.SIGTERM)
    exit_code = proc.wait(60)

    # Single samples swing by +-5% as batches come and go; compare the median of the first minute
    # after warm-up (the first 20%) with the median of the last minute of load.
    warm_start, window = args.duration * 0.2, min(60.0, args.duration * 0.1)
    first = [m for t, m in rss if warm_start <= t < warm_start + window]
    last = [m for t, m in rss if args.duration - window <= t <= args.duration]
    baseline, final = statistics.median(first), statistics.median(last)
    growth = (final - baseline) / baseline
    summary = {
        "rss_growth_method": "median RSS of the last minute of load vs the first minute after warm-up",
        "duration_s": args.duration, "clients": args.clients, "requests": sum(tally.values()),
        "outcomes": dict(tally.most_common()), "unexpected_errors": len(errors),
        "rss_mib": {"start": round(rss[0][1], 1), "after_warmup_median": round(baseline, 1),
                    "last_minute_median": round(final, 1),
                    "max": round(max(m for _, m in rss), 1)},
        "rss_growth_after_warmup": round(growth, 4),
        "rss_trace_mib": " ".join(f"{t:.0f}s:{m:.0f}" for t, m in rss),
        "left_running": health["running"], "left_waiting": health["waiting"],
        "completion_tokens_total": metrics["completion_tokens_total"], "server_exit_code": exit_code,
    }
    checks = {
        "zero unexpected errors": not errors,
        "RSS growth after warm-up < 5%": growth < 0.05,
        "no sequence left in the batch": health["running"] == 0 and health["waiting"] == 0,
        "server exited 0 on SIGTERM": exit_code == 0,
    }
    summary["checks"] = checks
    print(json.dumps(summary, indent=2))
    for line in errors[:10]:
        print("  ", line)
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(summary, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
