"""What storing responses costs: throughput with `store: false` vs stored, and the latency of reading one back.

    python scripts/bench_store.py [--streams 16] [--max-tokens 64] [--rounds 8] [--store URL] [--json out.json]

The embedded SmolLM2 (or --model-path) is served in this process on 127.0.0.1 with a response store
(default: a fresh SQLite file in a temp folder; --store postgresql://... for PostgreSQL).
1. Throughput, round after round, interleaved: --streams concurrent clients each send one request
   with `store: false`, and the same prompts stored (the default); the order flips every round, so a
   drift in the machine's speed does not favour one side. Every request makes exactly --max-tokens
   tokens (ignore_eos), so both sides do the same work; the target is stored >= 0.97x (median of
   the rounds' ratios). Besides tokens per wall-clock second, each round reports tokens per CPU second
   of this process (server and clients): on a machine shared with other work, wall-clock throughput
   swings with the neighbours' load, while the CPU a token costs does not.
   The time each stored request spent writing its response (timed around the store's insert, on the
   request's thread, before the answer goes out) is reported against the request's latency: an upper
   bound on what storing costs that machine noise cannot blur.
2. Retrieve latency: GET /v1/responses/{id} for every stored response, one after another, on the
   idle server (p50, p99, mean, in ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from llmctl.core.loader import LoadOptions
from llmctl.engine import EngineConfig
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.store import ResponseState, open_store
from llmctl.server.testing import serve_in_thread

PROMPTS = ["Tell me about Paris.", "Describe Rome for a traveller.", "What is Berlin known for?",
           "Give facts about Madrid.", "Write about Lisbon.", "What should I see in Vienna?",
           "Describe Prague.", "What is special about Amsterdam?"]


def one_round(url: str, streams: int, max_tokens: int, store: bool) -> tuple[float, float, list[str], float]:
    """Output tokens per second and per CPU second of ``streams`` concurrent requests, the ids of the answers,
    and the mean request latency (s)."""

    def ask(i: int) -> tuple[dict, float]:
        body = {"input": PROMPTS[i % len(PROMPTS)], "max_output_tokens": max_tokens, "ignore_eos": True,
                "temperature": 0.7, "store": store}
        started = time.perf_counter()
        r = httpx.post(url + "/v1/responses", json=body, timeout=600)
        r.raise_for_status()
        return r.json(), time.perf_counter() - started

    started, cpu = time.perf_counter(), time.process_time()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(ask, range(streams)))
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    answers = [a for a, _ in results]
    assert all(a["usage"]["output_tokens"] == max_tokens for a in answers)
    tokens = sum(a["usage"]["output_tokens"] for a in answers)
    return tokens / elapsed, tokens / cpu, [a["id"] for a in answers], statistics.fmean(t for _, t in results)


class TimedWrites:
    """Wraps the store's insert to add up the time stored requests spend writing."""

    def __init__(self, store) -> None:
        self.seconds, self.count, self._put = 0.0, 0, store.put_response
        store.put_response = self

    def __call__(self, *args, **kwargs) -> None:
        started = time.perf_counter()
        self._put(*args, **kwargs)
        self.seconds += time.perf_counter() - started
        self.count += 1


def retrieve_latency(url: str, ids: list[str]) -> dict:
    times = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for rid in ids:
            started = time.perf_counter()
            client.get(f"/v1/responses/{rid}").raise_for_status()
            times.append((time.perf_counter() - started) * 1000)
    times.sort()
    return {"count": len(times), "p50_ms": round(statistics.median(times), 2),
            "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 2),
            "mean_ms": round(statistics.fmean(times), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--store", help="a --responses-store URL (default: a fresh SQLite file)")
    parser.add_argument("--model-path", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    url = args.store or f"sqlite:///{Path(tempfile.mkdtemp()) / 'responses.db'}"
    store = open_store(url)
    assert store is not None, "--store none measures nothing"
    service = Service(ServiceSettings(load=LoadOptions(model_path=args.model_path),
                                      engine=EngineConfig(max_num_seqs=args.streams)),
                      responses=ResponseState(store))
    service.load()
    print(f"store: {store.describe()}; model: {service.loaded.name}", flush=True)
    writes = TimedWrites(store)
    rounds, ids, latencies = [], [], []
    with serve_in_thread(service) as base:
        one_round(base, args.streams, 8, False)  # warm-up
        for n in range(1, args.rounds + 1):
            sides = {}
            for store_it in ((False, True) if n % 2 else (True, False)):
                sides[store_it] = one_round(base, args.streams, args.max_tokens, store_it)
            (plain, plain_cpu, _, _), (stored, stored_cpu, made, latency) = sides[False], sides[True]
            ids += made
            latencies.append(latency)
            rounds.append({"store_false_tok_s": round(plain, 1), "stored_tok_s": round(stored, 1),
                           "ratio": round(stored / plain, 3), "store_false_tok_cpu_s": round(plain_cpu, 1),
                           "stored_tok_cpu_s": round(stored_cpu, 1), "cpu_ratio": round(stored_cpu / plain_cpu, 3)})
            print(f"round {n}: store false {plain:.1f} tok/s, stored {stored:.1f} tok/s, ratio {stored / plain:.3f}; "
                  f"per CPU second {plain_cpu:.1f} vs {stored_cpu:.1f}, ratio {stored_cpu / plain_cpu:.3f}",
                  flush=True)
        latency = retrieve_latency(base, ids)
    service.shutdown()
    ratio = statistics.median(r["ratio"] for r in rounds)
    cpu_ratio = statistics.median(r["cpu_ratio"] for r in rounds)
    for name, value in (("tokens per second", ratio), ("tokens per CPU second", cpu_ratio)):
        print(f"{args.streams} streams x {args.max_tokens} tokens, {name}: median ratio stored/store-false "
              f"{value:.3f} (target >= 0.97): {'PASS' if value >= 0.97 else 'FAIL'}")
    write_ms = writes.seconds / writes.count * 1000
    share = writes.seconds / writes.count / statistics.fmean(latencies)
    print(f"store writes: {writes.count}, mean {write_ms:.2f} ms each, {share:.3%} of a stored request's "
          f"latency ({statistics.fmean(latencies):.2f} s)")
    print(f"retrieve: {json.dumps(latency)}")
    if args.json:
        args.json.write_text(json.dumps({"store": store.describe(), "streams": args.streams,
                                         "max_tokens": args.max_tokens, "rounds": rounds, "median_ratio": ratio,
                                         "median_cpu_ratio": cpu_ratio,
                                         "write_ms": round(write_ms, 3), "write_share_of_latency": round(share, 5),
                                         "retrieve": latency}, indent=2) + "\n")


if __name__ == "__main__":
    main()
