"""Speculative decoding, side by side: `llmctl serve` without and with n-gram speculation, in one run.

    python scripts/bench_spec.py --out bench-spec.json
    python scripts/bench_spec.py --rounds 3 --speculative-config '{"method": "ngram", "num_speculative_tokens": 5}'

Starts two servers on 127.0.0.1 (the embedded SmolLM2 by default, bf16 on CPU, default threads), one plain
and one with ``--speculative-config``, and runs three workloads against each in turn (plain, then
speculative, ``--rounds`` times, so drift on a shared machine hits both alike):

- repeat: one stream, greedy, prompts whose answer repeats the prompt (a record into JSON, a function to fix,
  a tool's JSON with one field changed, a paragraph to correct, a plan to restate); the texts of both
  servers are compared token for token (identical: yes/no);
- free: one stream, greedy, free text (stories, explanations);
- 16 streams: 16 requests at once, free text and repeats mixed, sampled at temperature 0.7 with seeds.

tok/s is completion tokens over wall time (one stream: summed over its requests, one after another, the two
servers taking turns request by request; 16 streams: all tokens over the time until the last one ended).
The speculative server's /metrics give the acceptance rate and tokens per speculating step.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = '{"method": "ngram", "num_speculative_tokens": 8, "prompt_lookup_max": 4, "prompt_lookup_min": 1}'
# The repeat prompts are what an agent asks where the answer repeats the input, worded so that
# SmolLM2-135M-Instruct copies it (its greedy answers do; scripts/spec_ceiling.py counts how much): a record
# into JSON, a function to fix and return whole, a tool's JSON returned with one field changed, a paragraph
# corrected, a plan restated. Earlier prompts that the model answers in its own words instead are in
# scripts/spec_ceiling.py (EARLIER_REPEAT).
RECORD = """order_id: 48213
customer: Maria Gonzalez
email: maria.gonzalez@example.com
phone: +1 503 555 0142
street: 12 Harbor Street
city: Portland
state: OR
zip: 97201
item: blue widget
quantity: 3
unit_price: 12.50
status: shipped
carrier: UPS
tracking: 1Z999AA10123456784"""
FUNCTION = '''def moving_average(values, window):
    """Return the averages of each run of `window` consecutive values."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    for start in range(len(values) - window):
        chunk = values[start:start + window]
        averages.append(sum(chunk) / window)
    return averages
'''
TOOL_RESULT = """{
  "order_id": 48213,
  "customer": "Maria Gonzalez",
  "email": "maria.gonzalez@example.com",
  "shipping_address": {
    "street": "12 Harbor Street",
    "city": "Portland",
    "state": "OR",
    "zip": "97201"
  },
  "items": [
    {"sku": "WID-BLU-01", "name": "blue widget", "quantity": 3, "unit_price": 12.5},
    {"sku": "GAD-RED-02", "name": "red gadget", "quantity": 1, "unit_price": 47.0}
  ],
  "status": "shipped",
  "carrier": "UPS",
  "tracking_number": "1Z999AA10123456784"
}"""
PASSAGE = ("The lighthouse stands on a rocky point at the nothern end of the bay. It was built in 1871 from granite "
           "quaried on the island, and its lamp could be seen twenty miles out to sea. The last keeper left in 1964, "
           "when the light was automated, and the keepers house is now a small museum that is open from May to "
           "Septmber.")
PLAN = """1. Read the failing test in tests/test_billing.py and note the expected total.
2. Find where the discount is computed in billing/discounts.py.
3. Fix the rounding so that totals are rounded once, at the end.
4. Run the billing tests again.
5. Update CHANGELOG.md with a line about the fix."""
REPEAT = [
    "Convert this record into a JSON object. Use exactly these keys, in this order, and copy every value unchanged. "
    f"Reply with the JSON only.\n\n{RECORD}",
    "This function skips the last window: for 4 values and a window of 2 it returns 2 averages instead of 3. Fix it "
    f"and reply with the whole corrected function.\n\n```python\n{FUNCTION}```",
    f"The order tool returned this JSON:\n\n{TOOL_RESULT}\n\nThe package has been delivered. Return the same JSON "
    'object with "status" set to "delivered" and everything else unchanged. Reply with the JSON only.',
    f"Correct the spelling mistakes in this paragraph and reply with the corrected paragraph only.\n\n{PASSAGE}",
    f'Here is our plan:\n\n{PLAN}\n\nSteps 1 and 2 are done. Rewrite the plan with "[done]" at the end of each '
    "finished step.",
]
FREE = [
    "Write a short story about a lighthouse keeper and a storm.",
    "Explain how a refrigerator keeps food cold, for a ten-year-old.",
    "Describe a walk through a busy market on a summer morning.",
]


def start_server(port: int, args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port),
                             *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 900) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server at {url} exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ready":
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(1)
    raise SystemExit(f"the server at {url} did not become ready")


def ask(url: str, prompt: str, max_tokens: int, **fields) -> tuple[str, int]:
    r = httpx.post(url + "/v1/chat/completions", timeout=900, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0, **fields})
    r.raise_for_status()
    body = r.json()
    return body["choices"][0]["message"]["content"], body["usage"]["completion_tokens"]


def timed(url: str, prompt: str, max_tokens: int) -> tuple[str, int, float]:
    started = time.perf_counter()
    text, n = ask(url, prompt, max_tokens)
    return text, n, time.perf_counter() - started


def many_streams(url: str, streams: int, max_tokens: int) -> tuple[float, int, float, list[str]]:
    prompts = [(REPEAT + FREE)[i % (len(REPEAT) + len(FREE))] for i in range(streams)]
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda ip: ask(url, ip[1], max_tokens, temperature=0.7, seed=ip[0]),
                                enumerate(prompts)))
    seconds = time.perf_counter() - started
    tokens = sum(n for _, n in results)
    return tokens / seconds, tokens, seconds, [t for t, _ in results]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--speculative-config", default=DEFAULT_SPEC)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None, help="Write the results as JSON here too.")
    parser.add_argument("--port", type=int, default=18461, help="The plain server's port; the other takes the next.")
    args = parser.parse_args()
    # No request may time out on a busy machine: the default per-request timeout is 60 s, this is the most it takes.
    common = ["--dtype", args.dtype, "--max-num-seqs", str(max(16, args.streams)), "--request-timeout", "300"]
    if args.model_path:
        common += ["--model-path", args.model_path]
    servers = {"plain": args.port, "speculative": args.port + 1}
    procs = {"plain": start_server(servers["plain"], common),
             "speculative": start_server(servers["speculative"],
                                         [*common, "--speculative-config", args.speculative_config])}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in servers.items()}
    one_stream = {"repeat, 1 stream": REPEAT, "free text, 1 stream": FREE}
    workloads = [*one_stream, f"{args.streams} streams"]
    results: dict = {w: {"plain": [], "speculative": []} for w in workloads}
    texts: dict = {w: {"plain": [], "speculative": []} for w in workloads}
    try:
        for name, url in urls.items():
            wait_ready(url, procs[name])
            ask(url, "Hello", 8)  # warm-up
        for round_ in range(args.rounds):
            # Request by request, the two servers take turns (who goes first alternates by round), so a change in
            # the machine's load hits both alike.
            order = ("plain", "speculative") if round_ % 2 == 0 else ("speculative", "plain")
            for workload, prompts in one_stream.items():
                for prompt in prompts:
                    for name in order:
                        text, tokens, seconds = timed(urls[name], prompt, args.max_tokens)
                        results[workload][name].append({"tokens": tokens, "seconds": seconds})
                        if round_ == 0:
                            texts[workload][name].append(text)
                        print(f"round {round_ + 1} {workload:>20} {name:>11}: {tokens / seconds:6.2f} tok/s "
                              f"({tokens} tokens, {seconds:.1f} s)", flush=True)
            workload = workloads[-1]
            for name in order:
                rate, tokens, seconds, _ = many_streams(urls[name], args.streams, args.max_tokens // 2)
                results[workload][name].append({"tokens": tokens, "seconds": seconds})
                print(f"round {round_ + 1} {workload:>20} {name:>11}: {rate:6.2f} tok/s ({tokens} tokens, "
                      f"{seconds:.1f} s)", flush=True)
        metrics = httpx.get(urls["speculative"] + "/metrics").json()["speculative"]
        threads = httpx.get(urls["plain"] + "/health").json().get("cpu_threads")
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)
    report(results, texts, metrics, args, threads)


def report(results: dict, texts: dict, metrics: dict, args, threads) -> None:
    table = Table(title=f"Speculative decoding, SmolLM2 {args.dtype} on CPU ({os.cpu_count()} cores, {threads} "
                        f"compute thread(s)), {args.rounds} round(s)")
    for column in ("workload", "plain tok/s", "speculative tok/s", "speculative / plain", "identical text"):
        table.add_column(column, justify="right" if "tok" in column or "/" in column else "left")
    summary = {}
    for workload, sides in results.items():
        # Totals over the rounds: tokens over seconds, each server alike.
        rate = {name: sum(r["tokens"] for r in runs) / sum(r["seconds"] for r in runs) for name, runs in sides.items()}
        ratio = rate["speculative"] / rate["plain"]
        greedy = "streams" not in workload
        same = texts[workload]["plain"] == texts[workload]["speculative"] if greedy else None
        if greedy and not same:  # where each differing text parts, for the record
            for i, (a, b) in enumerate(zip(texts[workload]["plain"], texts[workload]["speculative"], strict=True)):
                if a != b:
                    at = next((j for j, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
                    print(f"{workload}, prompt {i + 1}: the texts part at character {at} of {len(a)}: "
                          f"plain {a[max(0, at - 40):at + 40]!r} / speculative {b[max(0, at - 40):at + 40]!r}")
        summary[workload] = {"plain_tok_s": rate["plain"], "speculative_tok_s": rate["speculative"], "ratio": ratio,
                             "identical_text": same, "runs": sides, "texts": texts[workload]}
        table.add_row(workload, f"{rate['plain']:.2f}", f"{rate['speculative']:.2f}", f"{ratio:.2f}x",
                      "n/a (sampled)" if same is None else ("yes" if same else "NO"))
    console = Console(width=140)
    console.print(table)
    console.print(f"speculative server: {json.dumps(metrics)}")
    if args.out:
        args.out.write_text(json.dumps({"config": args.speculative_config, "results": summary,
                                        "speculative_metrics": metrics}, indent=2))


if __name__ == "__main__":
    main()
