"""Structured outputs under load: throughput with a JSON schema on every request vs none, in the same run.

    python scripts/bench_structured.py [--streams 16] [--max-tokens 128] [--rounds 3] [--json out.json]

`llmctl serve` (the embedded SmolLM2 unless --model-path) runs in its own process on 127.0.0.1.
1. Compile time: one request with a schema the server has not seen, then the same schema again;
   the server's /metrics says how long the compile took and that the second request hit the cache.
   (The very first constrained request of a server also indexes the vocabulary, once: reported apart.)
2. Throughput, round after round, interleaved: --streams concurrent clients each send one request
   unconstrained, then the same prompts with `response_format: json_schema`. Every request makes
   exactly --max-tokens tokens (the free ones with ignore_eos; the schema asks for more items than
   fit), so both sides do the same work; the target is constrained >= 0.8x unconstrained.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from llmctl.server.testing import free_port

LONG_SCHEMA = {  # more items than --max-tokens can hold: every constrained request runs to the limit
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 40},
                   "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 64}},
    "required": ["city", "facts"], "additionalProperties": False,
}
PROMPTS = ["Tell me about Paris.", "Describe Rome for a traveller.", "What is Berlin known for?",
           "Give facts about Madrid.", "Write about Lisbon.", "What should I see in Vienna?",
           "Describe Prague.", "What is special about Amsterdam?"]


def start_server(args: argparse.Namespace, extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--max-num-seqs", str(args.streams), "--log-level", "warning", *(extra or [])]
    if args.model_path:
        command += ["--model-path", str(args.model_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"llmctl serve exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).json().get("status") == "ready":
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("llmctl serve did not become ready in 600 s")


def chat(client: httpx.Client, prompt: str, max_tokens: int, schema: dict | None) -> dict:
    body: dict = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "temperature": 0,
                  "timeout": 300}
    if schema is None:
        body["ignore_eos"] = True
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    started = time.perf_counter()
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    answer = r.json()
    answer["seconds"] = time.perf_counter() - started
    return answer


def grammar_metrics(client: httpx.Client) -> dict:
    m = client.get("/metrics", headers={"Accept": "application/json"}).json()
    return {k: m[k] for k in ("grammar_compiles", "grammar_cache_hits", "grammar_compile_seconds",
                              "grammar_last_compile_seconds")}


def compile_times(client: httpx.Client) -> dict:
    """Server-side compile time of a new schema, and the cache on its second use."""
    started = time.perf_counter()
    chat(client, PROMPTS[0], 4, {"type": "object", "properties": {"warm": {"type": "boolean"}}})
    index_and_compile = time.perf_counter() - started
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                               "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}},
                                               "address": {"type": "object", "properties": {
                                                   "street": {"type": "string"}, "zip": {"pattern": "^[0-9]{5}$",
                                                                                         "type": "string"}}}},
              "required": ["name", "age", "tags"]}
    first = chat(client, PROMPTS[1], 8, schema)["seconds"]
    after_first = grammar_metrics(client)
    second = chat(client, PROMPTS[1], 8, schema)["seconds"]
    after_second = grammar_metrics(client)
    return {
        "first_constrained_request_s": round(index_and_compile, 3),
        "new_schema_compile_ms": round(after_first["grammar_last_compile_seconds"] * 1000, 2),
        "new_schema_request_s": round(first, 3),
        "same_schema_request_s": round(second, 3),
        "second_request_recompiled": after_second["grammar_compiles"] != after_first["grammar_compiles"],
        "cache_hits_after": after_second["grammar_cache_hits"],
    }


def level(client: httpx.Client, args: argparse.Namespace, schema: dict | None) -> dict:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.streams)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.streams) as pool:
        answers = list(pool.map(lambda p: chat(client, p, args.max_tokens, schema), prompts))
    wall = time.perf_counter() - started
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    reasons = sorted({a["choices"][0]["finish_reason"] for a in answers})
    return {"tokens": tokens, "seconds": round(wall, 2), "tokens_per_second": round(tokens / wall, 1),
            "finish_reasons": reasons}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    proc, url = start_server(args)
    try:
        with httpx.Client(base_url=url, timeout=600) as client:
            compiled = compile_times(client)
            print("compile:", json.dumps(compiled))
            level(client, args, None)  # warm-up at full concurrency
            rounds = []
            for i in range(args.rounds):
                free = level(client, args, None)
                constrained = level(client, args, LONG_SCHEMA)
                ratio = constrained["tokens_per_second"] / free["tokens_per_second"]
                rounds.append({"free": free, "json_schema": constrained, "ratio": round(ratio, 3)})
                print(f"round {i + 1}: unconstrained {free['tokens_per_second']} tok/s, json_schema "
                      f"{constrained['tokens_per_second']} tok/s ({constrained['finish_reasons']}), ratio {ratio:.3f}")
    finally:
        proc.terminate()
        proc.wait(30)
    median = statistics.median(r["ratio"] for r in rounds)
    verdict = "PASS" if median >= 0.8 else "FAIL"
    print(f"{args.streams} streams x {args.max_tokens} tokens: median ratio json_schema/unconstrained "
          f"{median:.3f} (target >= 0.8): {verdict}")
    if args.json:
        args.json.write_text(json.dumps({"compile": compiled, "rounds": rounds, "median_ratio": median,
                                         "streams": args.streams, "max_tokens": args.max_tokens}, indent=2) + "\n")


if __name__ == "__main__":
    main()
