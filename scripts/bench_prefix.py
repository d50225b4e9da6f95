"""Prefix caching on vs off in one run: agent, multi-turn and no-sharing workloads, as ratios, written to JSON.

    python scripts/bench_prefix.py --out bench-prefix.json                                   # the targets
    python scripts/bench_prefix.py --rounds 1 --agent-requests 16 --turns 2 --out quick.json  # a quick check

Two `llmctl serve` processes on 127.0.0.1 serve the same model, one with `--prefix-cache-tokens 0`
(off) and one with the default bound (on). Round after round, each workload runs on one server and
then on the other, the order flipping every round, so a slow spell of a shared machine weighs on
both; figures are medians over the rounds, and a ratio is the median of the rounds' own ratios.
Every round has prompts of its own (its own system prompt, its own conversations), so the server
with the cache gains nothing from an earlier round.

- agent: a shared system prompt of --system-tokens, --agent-clients concurrent clients sending short
  questions (--agent-requests in all), 64 output tokens each: TTFT p50 and output tokens/s. The
  round's system prompt is first sent --agent-warmup times (other questions), as an agent backend
  sends it all day: the measured requests are the steady state, not the server's first sight of it
  (`--agent-warmup 0` measures that cold start, where half the requests wait for the first prefill).
- multi-turn: --conversations conversations of --turns turns at once, each turn resending the whole
  history with the model's earlier answers: total time, and TTFT p50 of each turn.
- no sharing: distinct prompts of --plain-tokens, --plain-clients at a time: output tokens/s.

Every request bans the model's end-of-sequence token (logit_bias), so each of its tokens is text and
the first one is what TTFT measures (see `end_of_sequence_ids`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx
from bench_engine import serve_subprocess  # noqa: E402  (scripts/ is on sys.path when run as a script)
from rich.console import Console
from rich.table import Table

from llmctl.bench.loadgen import BenchPlan, Endpoint, Workload, resolve_model, run_benchmark, send_request
from llmctl.bench.prompts import builtin_prompts
from llmctl.bench.stats import Stats

console = Console()
SERVERS = ("off", "on")


def on_each(urls: dict[str, str], workload: Workload, clients: int, requests: int, order: list[str],
            what: str, warmup: int = 0) -> dict:
    """One level of ``workload`` on each server in ``order``; the level summaries by server."""
    levels = {}
    for name in order:
        plan = BenchPlan([Endpoint(urls[name], label=name)], workload, [clients], requests, warmup=warmup)
        (run,), _ = run_benchmark(plan)
        levels[name] = level = run.levels[0]
        if level.failed:
            raise SystemExit(f"{what} workload: {level.failed} request(s) failed on {name}: {level.errors}")
    return levels


def agent_round(urls: dict[str, str], args: argparse.Namespace, n: int, order: list[str]) -> dict[str, dict]:
    """One round of the agent workload on both servers; per server: TTFT p50 (ms) and output tokens/s."""
    prompts = builtin_prompts(args.agent_requests, args.question_tokens, seed=args.seed + n,
                              shared_prefix_tokens=args.system_tokens)
    # The warm-up: other questions after the same system prompt, as an agent backend running for a while has sent.
    warmup = builtin_prompts(args.agent_warmup, args.question_tokens, seed=args.seed + n, offset=args.agent_requests,
                             shared_prefix_tokens=args.system_tokens)
    workload = Workload(prompts, max_tokens=args.max_tokens, eos_bias_ids=args.eos_ids, warmup_prompts=warmup)
    levels = on_each(urls, workload, args.agent_clients, args.agent_requests, order, "agent", args.agent_warmup)
    return {name: {"ttft_p50_ms": lv.ttft_ms.median, "output_throughput": lv.output_throughput,
                   "duration_s": lv.duration_s} for name, lv in levels.items()}


async def conversation(client: httpx.AsyncClient, endpoint: Endpoint, args: argparse.Namespace,
                       first: int) -> list[float]:
    """One conversation of args.turns turns, each resending the history; returns each turn's TTFT (s)."""
    workload = Workload([], max_tokens=args.max_tokens, eos_bias_ids=args.eos_ids)
    questions = builtin_prompts(args.turns, args.turn_tokens, seed=args.seed, offset=first)
    history: list[dict] = []
    ttfts = []
    for turn in range(args.turns):
        history.append(questions[turn][0])
        result = await send_request(client, endpoint, workload, history)
        if not result.success:
            raise SystemExit(f"multi-turn workload: a request to {endpoint.label} failed: {result.error}")
        ttfts.append(result.ttft)
        history.append({"role": "assistant", "content": result.text})
    return ttfts


async def multi_turn(endpoint: Endpoint, args: argparse.Namespace, n: int) -> dict:
    timeout = httpx.Timeout(600.0, connect=10.0)
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.perf_counter()
        per_conversation = await asyncio.gather(*(
            conversation(client, endpoint, args, (n * args.conversations + c) * args.turns)
            for c in range(args.conversations)))
        total = time.perf_counter() - started
    by_turn = [Stats.of([c[t] for c in per_conversation]).median for t in range(args.turns)]
    return {"total_s": total, "ttft_p50_ms_by_turn": by_turn}


def plain_round(urls: dict[str, str], args: argparse.Namespace, n: int, order: list[str]) -> dict[str, dict]:
    prompts = builtin_prompts(args.plain_requests, args.plain_tokens, seed=args.seed + 1000 + n)
    levels = on_each(urls, Workload(prompts, max_tokens=args.plain_max_tokens, eos_bias_ids=args.eos_ids),
                     args.plain_clients, args.plain_requests, order, "no-sharing")
    return {name: {"output_throughput": lv.output_throughput} for name, lv in levels.items()}


def end_of_sequence_ids(model_path: Path | None) -> tuple[int, ...]:
    """The ids the server stops on (`llmctl.core.loader.eos_ids`), which every request bans (logit_bias
    -100, as `llmctl bench --eos-bias` does): with ignore_eos alone, a model that wants to stop emits
    one again and again, and as it is no text the client's first token, and its TTFT, would come whole
    decode steps late."""
    from transformers import AutoTokenizer, GenerationConfig

    from llmctl.core.embedded import ensure_embedded_model
    from llmctl.core.loader import eos_ids

    path = model_path or ensure_embedded_model()
    try:
        configured = GenerationConfig.from_pretrained(path).eos_token_id
    except OSError:  # no generation_config.json
        configured = None
    return tuple(sorted(eos_ids(configured, AutoTokenizer.from_pretrained(path))))


def medians(rounds: list[dict[str, dict]], key: str) -> dict[str, float]:
    return {name: statistics.median(r[name][key] for r in rounds) for name in SERVERS}


def ratio(rounds: list[dict[str, dict]], key: str) -> float:
    """The median over rounds of on / off: each round runs both servers back to back, so its ratio is
    what a slow spell of the machine, which medians taken apart can pair with either side, leaves alone."""
    return statistics.median(r["on"][key] / r["off"][key] for r in rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="bfloat16", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--kv-cache-tokens", type=int, default=65536)
    parser.add_argument("--prefix-cache-tokens", type=int, default=None, help="The on server's bound. Default: "
                                                                              "llmctl serve's default.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=64, help="Output tokens per agent and multi-turn request.")
    parser.add_argument("--system-tokens", type=int, default=1500)
    parser.add_argument("--question-tokens", type=int, default=12)
    parser.add_argument("--agent-clients", type=int, default=16)
    parser.add_argument("--agent-requests", type=int, default=32)
    parser.add_argument("--agent-warmup", type=int, default=1,
                        help="Requests with the round's system prompt before it is measured (0: a cold start).")
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--turn-tokens", type=int, default=48)
    parser.add_argument("--plain-tokens", type=int, default=256)
    parser.add_argument("--plain-max-tokens", type=int, default=128)
    parser.add_argument("--plain-clients", type=int, default=16)
    parser.add_argument("--plain-requests", type=int, default=32)
    parser.add_argument("--workloads", default="agent,multi-turn,plain")
    parser.add_argument("--out", type=Path, default=Path("bench-prefix.json"))
    args = parser.parse_args()
    args.eos_ids = end_of_sequence_ids(args.model_path)
    workloads = args.workloads.split(",")
    high = max(args.agent_clients, args.conversations, args.plain_clients)
    rounds: dict[str, list] = {w: [] for w in workloads}
    patient = ("--request-timeout", "300")  # a slow machine must not turn a long prefill into a 408
    extra = {"off": (*patient, "--prefix-cache-tokens", "0"),
             "on": patient if args.prefix_cache_tokens is None else
             (*patient, "--prefix-cache-tokens", str(args.prefix_cache_tokens))}
    with serve_subprocess(args, high, extra["off"]) as (off_url, _), \
            serve_subprocess(args, high, extra["on"]) as (on_url, _):
        urls = {"off": off_url, "on": on_url}
        for name, url in urls.items():  # one request each, so neither pays the first forward passes in a round
            endpoint = resolve_model(Endpoint(url, label=name))
            asyncio.run(_warm(endpoint))
        for n in range(args.rounds):
            order = list(SERVERS) if n % 2 == 0 else list(SERVERS[::-1])
            console.print(f"round {n + 1}/{args.rounds}: {' then '.join(order)}")
            if "agent" in workloads:
                rounds["agent"].append(agent_round(urls, args, n, order))
            if "multi-turn" in workloads:
                rounds["multi-turn"].append({name: asyncio.run(multi_turn(resolve_model(Endpoint(urls[name],
                                                                                                 label=name)), args, n))
                                             for name in order})
            if "plain" in workloads:
                rounds["plain"].append(plain_round(urls, args, n, order))
        metrics = {name: httpx.get(url + "/metrics", timeout=10).json().get("prefix_cache") for name, url in
                   urls.items()}
    result = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "rounds": rounds, "server_prefix_cache": metrics, "summary": summarize(rounds, args)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    report(result["summary"], args)
    console.print(f"prefix cache of the on server: {metrics['on']}", highlight=False)
    console.print(f"Wrote {args.out}")


async def _warm(endpoint: Endpoint) -> None:
    async with httpx.AsyncClient(timeout=600) as client:
        result = await send_request(client, endpoint, Workload([], max_tokens=8),
                                    [{"role": "user", "content": "Say hello."}])
    if not result.success:
        raise SystemExit(f"the {endpoint.label} server failed a first request: {result.error}")


def summarize(rounds: dict[str, list], args: argparse.Namespace) -> dict:
    summary: dict = {}
    if rounds.get("agent"):
        ttft, tput = medians(rounds["agent"], "ttft_p50_ms"), medians(rounds["agent"], "output_throughput")
        summary["agent"] = {"ttft_p50_ms": ttft, "output_throughput": tput,
                            "ttft_ratio": ratio(rounds["agent"], "ttft_p50_ms"),
                            "throughput_ratio": ratio(rounds["agent"], "output_throughput")}
    if rounds.get("multi-turn"):
        total = medians(rounds["multi-turn"], "total_s")
        by_turn = {name: [statistics.median(r[name]["ttft_p50_ms_by_turn"][t] for r in rounds["multi-turn"])
                          for t in range(args.turns)] for name in SERVERS}
        summary["multi-turn"] = {"total_s": total, "ttft_p50_ms_by_turn": by_turn,
                                 "total_ratio": ratio(rounds["multi-turn"], "total_s")}
    if rounds.get("plain"):
        tput = medians(rounds["plain"], "output_throughput")
        summary["plain"] = {"output_throughput": tput, "throughput_ratio": ratio(rounds["plain"], "output_throughput")}
    return summary


def report(summary: dict, args: argparse.Namespace) -> None:
    table = Table(title=f"prefix cache off vs on, medians of {args.rounds} round(s); on / off: the median of the "
                        "rounds' ratios (per turn: of the medians)", title_justify="left")
    for column in ("workload", "metric", "off", "on", "on / off", "target"):
        table.add_column(column, justify="left" if column in ("workload", "metric") else "right")
    if "agent" in summary:
        a = summary["agent"]
        table.add_row("agent", "TTFT p50 ms", f"{a['ttft_p50_ms']['off']:,.0f}", f"{a['ttft_p50_ms']['on']:,.0f}",
                      f"{a['ttft_ratio']:.3f}", "<= 0.25")
        table.add_row("agent", "output tok/s", f"{a['output_throughput']['off']:,.1f}",
                      f"{a['output_throughput']['on']:,.1f}", f"{a['throughput_ratio']:.3f}", ">= 1")
    if "multi-turn" in summary:
        m = summary["multi-turn"]
        table.add_row("multi-turn", "total s", f"{m['total_s']['off']:,.1f}", f"{m['total_s']['on']:,.1f}",
                      f"{m['total_ratio']:.3f}", "")
        by_turn = m["ttft_p50_ms_by_turn"]
        for t, (off, on) in enumerate(zip(by_turn["off"], by_turn["on"], strict=False), 1):
            table.add_row("multi-turn", f"turn {t} TTFT p50 ms", f"{off:,.0f}", f"{on:,.0f}", f"{on / off:.3f}", "")
    if "plain" in summary:
        p = summary["plain"]
        table.add_row("no sharing", "output tok/s", f"{p['output_throughput']['off']:,.1f}",
                      f"{p['output_throughput']['on']:,.1f}", f"{p['throughput_ratio']:.3f}", ">= 0.97")
    console.print(table)


if __name__ == "__main__":
    sys.exit(main())
