"""Engine targets in one run: raw model.generate vs llmctl's server on the same model, as ratios, written to JSON.

    python scripts/bench_engine.py --out bench-engine.json                       # the full targets
    python scripts/bench_engine.py --requests 32 --max-tokens 16 --out short.json  # a quick check

`llmctl serve` runs in its own process on 127.0.0.1, as it is deployed. At each level, round after
round, this process first runs raw `model.generate` (greedy, left-padded batches of that size) and
then `llmctl bench` (a child process) sends the same prompts at that concurrency with the same
output length (ignore_eos); figures are medians over the rounds. A side thread times GET /health
while the highest level runs. Memory: the server's peak resident set against weights + KV budget.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from llmctl.bench.loadgen import BenchPlan, Workload
from llmctl.bench.offline import load_offline_model, run_offline
from llmctl.bench.prompts import builtin_prompts
from llmctl.bench.stats import Stats
from llmctl.core import hardware
from llmctl.core.loader import LoadedModel
from llmctl.server.testing import free_port

console = Console()


class HealthProbe(threading.Thread):
    """Times GET /health every ``interval`` seconds; keeps the samples taken while >= ``busy`` streams run."""

    def __init__(self, url: str, busy: int, interval: float = 0.02) -> None:
        super().__init__(name="health-probe", daemon=True)
        self.url, self.busy, self.interval = url, busy, interval
        self.samples: list[float] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._halt.wait(self.interval):
                started = time.perf_counter()
                try:
                    r = client.get(self.url + "/health")
                except httpx.HTTPError:
                    self.errors += 1
                    continue
                elapsed = time.perf_counter() - started
                if r.status_code != 200:
                    self.errors += 1
                elif r.json()["running"] >= self.busy:
                    self.samples.append(elapsed)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@contextlib.contextmanager
def serve_subprocess(args: argparse.Namespace, high: int, extra: tuple[str, ...] = ()) -> Iterator[tuple[str, int]]:
    """`llmctl serve` in its own process, as it is deployed, with flags ``extra``; yields its URL and pid."""
    port = free_port()
    command = [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--dtype", args.dtype, "--device", args.device, "--max-num-seqs", str(high),
               "--max-waiting", str(max(64, high)), "--kv-cache-tokens", str(args.kv_cache_tokens),
               "--log-level", "warning", *extra]
    if args.model_path:
        command += ["--model-path", str(args.model_path)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"llmctl serve exited with {proc.returncode}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("llmctl serve did not become ready")
            time.sleep(0.2)
        yield url, proc.pid
    finally:
        proc.terminate()
        proc.wait(60)


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V cache one token takes over all layers."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def peak_memory_bytes(url: str, pid: int, cuda: bool) -> int:
    """The server's peak: GPU memory reserved on CUDA, else its peak resident set (VmHWM)."""
    if cuda:
        return int(httpx.get(url + "/metrics", timeout=10).json()["gpu_memory_reserved_gb"] * hardware.GIB)
    with open(f"/proc/{pid}/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise SystemExit("cannot read the server's peak memory")


def run_client(url: str, args: argparse.Namespace, level: int) -> dict:
    command = [sys.executable, "-m", "llmctl", "bench", "--url", url, "--concurrency", str(level),
               "--max-tokens", str(args.max_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--seed", str(args.seed), "--warmup", str(args.warmup), "--json"]
    if args.requests:
        command += ["--requests", str(args.requests)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llmctl bench failed with exit code {done.returncode}")
    return json.loads(done.stdout)


def median_offline(rounds: list[list]) -> list:
    """Per batch size, the round with the median output throughput."""
    chosen = []
    for i in range(len(rounds[0])):
        runs = sorted((r[i] for r in rounds), key=lambda lv: lv.output_throughput)
        chosen.append(runs[(len(runs) - 1) // 2] if len(runs) % 2 else _mean_level(runs[len(runs) // 2 - 1:][:2]))
    return chosen


def _mean_level(pair: list):
    import dataclasses

    return dataclasses.replace(pair[0], output_throughput=statistics.fmean(lv.output_throughput for lv in pair))


def median_levels(rounds: list[dict[int, dict]]) -> dict[int, dict]:
    """Per level: median output throughput, TTFT and TPOT over the rounds."""
    out = {}
    for level in rounds[0]:
        runs = [r[level] for r in rounds]
        merged = dict(runs[-1])
        merged["output_throughput"] = statistics.median(r["output_throughput"] for r in runs)
        for key in ("ttft_ms", "tpot_ms"):
            values = [r[key]["median"] for r in runs if r[key]["median"] is not None]
            merged[key] = {**runs[-1][key], "median": statistics.median(values) if values else None}
        merged["rounds_output_throughput"] = [r["output_throughput"] for r in runs]
        out[level] = merged
    return out


def check(name: str, value: float | None, target: str, passed: bool | None, unit: str = "") -> dict:
    return {"name": name, "value": None if value is None else round(value, 4), "unit": unit, "target": target,
            "pass": passed}


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def evaluate(offline: dict[int, dict], server: dict[int, dict], health: Stats, probes: int, busy: int,
             memory: dict) -> list[dict]:
    def tput(levels: dict[int, dict], c: int) -> float | None:
        return levels[c]["output_throughput"] if c in levels else None

    r16 = ratio(tput(server, 16), tput(offline, 16))
    s16_s1 = ratio(tput(server, 16), tput(server, 1))
    r1 = ratio(tput(server, 1), tput(offline, 1))
    s32, s16 = tput(server, 32), tput(server, 16)
    ttft16 = server[16]["ttft_ms"]["median"] / 1000 if 16 in server and server[16]["ttft_ms"]["median"] else None
    mem = memory["peak_over_budget"]
    return [
        check("server c16 / raw generate batch 16 (output tok/s)", r16, ">= 0.85",
              None if r16 is None else r16 >= 0.85, "x"),
        check("server c16 / server c1 (output tok/s)", s16_s1, ">= 8", None if s16_s1 is None else s16_s1 >= 8, "x"),
        check("server c1 / raw generate batch 1 (output tok/s)", r1, ">= 0.95",
              None if r1 is None else r1 >= 0.95, "x"),
        check("server c32 output tok/s > server c16", ratio(s32, s16), "> 1", None if s32 is None or s16 is None
              else s32 > s16, "x"),
        check("TTFT p50 at c16", ttft16, "< 1.5", None if ttft16 is None else ttft16 < 1.5, "s"),
        check(f"GET /health p99 while >= {busy} streams run ({probes} probes)", health.p99, "< 50",
              None if health.p99 is None else health.p99 < 50, "ms"),
        check("server peak memory / (weights + KV budget)", mem, "<= 1.5", mem <= 1.5, "x"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", type=Path, default=None, help="Default: the embedded SmolLM2-135M-Instruct.")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--concurrency", default="1,16,32", help="Levels (server) and batch sizes (generate).")
    parser.add_argument("--requests", type=int, default=None, help="Requests per level. Default: 4 per stream.")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--kv-cache-tokens", type=int, default=65536)
    parser.add_argument("--rounds", type=int, default=3, help="Alternating raw/server rounds; medians reported.")
    parser.add_argument("--out", type=Path, default=Path("bench-engine.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    levels = [int(c) for c in args.concurrency.split(",")]
    high = max(levels)

    console.print(f"Loading {args.model_path or 'the embedded model'} ...")
    loaded: LoadedModel = load_offline_model(args.model_path, args.dtype, args.device)
    cuda = loaded.input_device.type == "cuda"
    per_token = kv_bytes_per_token(loaded.model)
    plan = BenchPlan([], Workload([]), levels, args.requests)
    prompts = builtin_prompts(plan.prompt_count(), args.prompt_tokens, args.seed)  # what `llmctl bench` sends
    offline_rounds, client_rounds = [], []
    with serve_subprocess(args, high) as (url, server_pid):
        # Raw generate and the server take turns at each level, round after round, so that a slow
        # spell of a shared machine hits both sides; each figure is the median over the rounds.
        busy = max(1, int(high * 0.9))  # between one stream's end and the next one's start fewer run
        probe = None
        for n in range(1, args.rounds + 1):
            offline_round, client_round = [], []
            for level in levels:
                console.print(f"round {n}/{args.rounds}, level {level}: raw model.generate, then the server")
                offline_round += run_offline(loaded, prompts, [level], args.max_tokens, plan.requests_for)
                if level == high and probe is None:
                    probe = HealthProbe(url, busy)
                    probe.start()
                try:
                    client_round.append(run_client(url, args, level))
                finally:
                    if probe is not None and probe.is_alive():
                        probe.stop()
            offline_rounds.append(offline_round)
            client_rounds.append(client_round)
        peak = peak_memory_bytes(url, server_pid, cuda)
    offline = median_offline(offline_rounds)
    server = median_levels([{c["runs"][0]["levels"][0]["concurrency"]: c["runs"][0]["levels"][0] for c in rnd}
                            for rnd in client_rounds])

    workload_tokens = high * (max(lv["prompt_tokens_mean"] or 0 for lv in server.values())
                              + args.max_tokens)
    memory = {
        "measured": "server GPU memory reserved" if cuda else "server peak resident memory (VmHWM)",
        "peak_bytes": peak,
        "weights_bytes": loaded.weights_bytes,
        "kv_bytes_per_token": per_token,
        "kv_budget_bytes": args.kv_cache_tokens * per_token,
        "kv_workload_bytes": int(workload_tokens * per_token),
    }
    memory["peak_over_budget"] = peak / (loaded.weights_bytes + memory["kv_budget_bytes"])
    memory["peak_over_workload"] = peak / (loaded.weights_bytes + memory["kv_workload_bytes"])

    raw = {lv.batch_size: {"output_throughput": lv.output_throughput} for lv in offline}
    health = Stats.of(probe.samples)
    checks = evaluate(raw, server, health, len(probe.samples), busy, memory)
    result = {
        "model": loaded.name, "dtype": loaded.dtype, "device": loaded.device,
        "gpu": (hardware.gpu_names() or [None])[0], "config": vars(args) | {"out": str(args.out),
                                                                           "model_path": str(args.model_path)},
        "offline": [lv.__dict__ for lv in offline], "server_levels_median": server,
        "rounds": {"offline": [[lv.__dict__ for lv in r] for r in offline_rounds], "server": client_rounds},
        "health_ms": health.__dict__ | {"samples": len(probe.samples), "errors": probe.errors,
                                        "min_running": busy},
        "memory": memory, "checks": checks,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    report(offline, server, checks, memory, loaded)
    console.print(f"Wrote {args.out}")


def report(offline, server: dict[int, dict], checks: list[dict], memory: dict, loaded: LoadedModel) -> None:
    table = Table(title=f"{loaded.name} ({loaded.dtype}, {loaded.device}): output tokens/s", title_justify="left")
    for column in ("level", "raw generate", "server", "server / raw", "server TTFT p50 ms", "server TPOT p50 ms"):
        table.add_column(column, justify="right")
    for lv in offline:
        s = server.get(lv.batch_size)
        table.add_row(str(lv.batch_size), f"{lv.output_throughput:,.1f}",
                      f"{s['output_throughput']:,.1f}" if s else "-",
                      f"{s['output_throughput'] / lv.output_throughput:.3f}" if s else "-",
                      f"{s['ttft_ms']['median']:,.1f}" if s and s["ttft_ms"]["median"] else "-",
                      f"{s['tpot_ms']['median']:,.2f}" if s and s["tpot_ms"]["median"] else "-")
    console.print(table)
    targets = Table(title="targets", title_justify="left")
    for column in ("check", "value", "target", "result"):
        targets.add_column(column, justify="right" if column != "check" else "left")
    for c in checks:
        verdict = "[green]pass[/green]" if c["pass"] else "n/a" if c["pass"] is None else "[red]FAIL[/red]"
        value = "-" if c["value"] is None else f"{c['value']:,.3f} {c['unit']}"
        targets.add_row(c["name"], value, f"{c['target']} {c['unit']}", verdict)
    console.print(targets)
    gib = hardware.GIB
    console.print(f"memory ({memory['measured']}): peak {memory['peak_bytes'] / gib:.3f} GiB; weights "
                  f"{memory['weights_bytes'] / gib:.3f} GiB + KV budget {memory['kv_budget_bytes'] / gib:.3f} GiB "
                  f"(this workload's KV: {memory['kv_workload_bytes'] / gib:.3f} GiB)", highlight=False)


if __name__ == "__main__":
    main()
