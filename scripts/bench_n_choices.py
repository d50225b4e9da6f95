"""n choices in one request against the same n as separate requests, on a real `llmctl serve`, as ratios.

    python scripts/bench_n_choices.py --out docs/bench-n-choices-smollm2-cpu.json
    python scripts/bench_n_choices.py --model-path /models/x --n 8 --prompt-tokens 1500 --rounds 3

One request with `n` prefills its prompt once and forks the row; n separate requests (sent at once,
so they are batched together) prefill it n times. Both sample `max_tokens` tokens per choice
(ignore_eos), so the decode work is the same; the difference is the prefill. Figures are medians
over the rounds, measured in one run (only the ratio means anything on a shared machine).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from llmctl.server.testing import free_port

PARAGRAPH = ("The quick brown fox jumps over the lazy dog while the river runs past the old mill, and the "
             "miller counts the sacks of flour one by one before the market opens in the town square. ")


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port)]
    if args.model_path:
        command += ["--model-path", args.model_path]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ready":
                return proc, url
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not become ready")


def prompt_of(url: str, tokens: int) -> str:
    text = PARAGRAPH
    while httpx.post(url + "/tokenize", json={"prompt": text}).json()["count"] < tokens:
        text += PARAGRAPH
    return text + "\nSummarize this."


def one_request(url: str, body: dict, n: int) -> float:
    started = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json={**body, "n": n}, timeout=600)
    r.raise_for_status()
    assert len(r.json()["choices"]) == n
    return time.perf_counter() - started


def separate_requests(url: str, body: dict, n: int) -> float:
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        for r in pool.map(lambda _: httpx.post(url + "/v1/chat/completions", json=body, timeout=600), range(n)):
            r.raise_for_status()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1500)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    proc, url = start_server(args)
    try:
        body = {"messages": [{"role": "user", "content": prompt_of(url, args.prompt_tokens)}],
                "max_tokens": args.max_tokens, "ignore_eos": True, "temperature": 1.0, "seed": 1}
        prompt_tokens = httpx.post(url + "/tokenize", json={"messages": body["messages"]}).json()["count"]
        one_request(url, body, 2)  # warm-up
        grouped, separate = [], []
        for _ in range(args.rounds):
            grouped.append(one_request(url, body, args.n))
            separate.append(separate_requests(url, body, args.n))
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(30)
    result = {
        "model": health["model"], "device": health["device"], "dtype": health["dtype"], "n": args.n,
        "prompt_tokens": prompt_tokens, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "one_request_with_n_s": round(statistics.median(grouped), 3),
        "n_separate_requests_s": round(statistics.median(separate), 3),
    }
    result["speedup"] = round(result["n_separate_requests_s"] / result["one_request_with_n_s"], 2)
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
