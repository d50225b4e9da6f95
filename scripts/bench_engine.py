"""Engine targets in one run: raw model.generate vs llmctl's server on the same model, as ratios, written to JSON.

    python scripts/bench_engine.py --out bench-engine.json                       # the full targets
    python scripts/bench_engine.py --requests 32 --max-tokens 16 --out short.json  # a quick check

The model is loaded once. First `model.generate` runs greedy left-padded batches at each batch size;
then the same LoadedModel is served by an in-process llmctl service on 127.0.0.1 and benchmarked by
`llmctl bench` in a child process (so the load generator does not share the server's interpreter
lock), at the same concurrency levels, prompts and output length (ignore_eos). A side thread times
GET /health while the highest level runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from llmctl.bench import BenchPlan, Stats, Workload, builtin_prompts
from llmctl.core import hardware
from llmctl.core.loader import LoadedModel, LoadOptions
from llmctl.engine import EngineConfig
from llmctl.offline import load_offline_model, run_offline
from llmctl.server.service import Service, ServiceSettings
from llmctl.testing import serve_in_thread

console = Console()


class HealthProbe(threading.Thread):
    """Times GET /health every ``interval`` seconds; keeps the samples taken while ``busy()`` is true."""

    def __init__(self, url: str, busy, interval: float = 0.02) -> None:
        super().__init__(name="health-probe", daemon=True)
        self.url, self.busy, self.interval = url, busy, interval
        self.samples: list[float] = []
        self.errors = 0
        self._halt = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self._halt.wait(self.interval):
                if not self.busy():
                    continue
                started = time.perf_counter()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok and self.busy():
                    self.samples.append(time.perf_counter() - started)
                self.errors += not ok

    def stop(self) -> None:
        self._halt.set()
        self.join()


def kv_bytes_per_token(model) -> int:
    """Bytes of K and V cache one token takes over all layers."""
    cfg = model.config
    cfg = getattr(cfg, "text_config", None) or cfg
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    return 2 * cfg.num_hidden_layers * kv_heads * head_dim * next(model.parameters()).element_size()


def peak_memory_bytes(cuda: bool) -> int:
    import torch

    if cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_client(url: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "llmctl", "bench", "--url", url, "--concurrency", args.concurrency,
               "--max-tokens", str(args.max_tokens), "--prompt-tokens", str(args.prompt_tokens),
               "--seed", str(args.seed), "--warmup", str(args.warmup), "--json"]
    if args.requests:
        command += ["--requests", str(args.requests)]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"llmctl bench failed with exit code {done.returncode}")
    return json.loads(done.stdout)


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
        check("peak memory / (weights + KV budget)", mem, "<= 1", mem <= 1.0, "x"),
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
    parser.add_argument("--out", type=Path, default=Path("bench-engine.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    levels = [int(c) for c in args.concurrency.split(",")]
    high = max(levels)

    rss_before = hardware.process_rss_gb() * hardware.GIB
    console.print(f"Loading {args.model_path or 'the embedded model'} ...")
    loaded: LoadedModel = load_offline_model(args.model_path, args.dtype, args.device)
    cuda = loaded.input_device.type == "cuda"
    per_token = kv_bytes_per_token(loaded.model)
    plan = BenchPlan([], Workload([]), levels, args.requests)
    prompts = builtin_prompts(plan.prompt_count(), args.prompt_tokens, args.seed)  # what `llmctl bench` sends
    console.print(f"raw model.generate at batch sizes {levels} ...")
    offline = run_offline(loaded, prompts, levels, args.max_tokens, plan.requests_for)

    if cuda:
        import torch

        torch.cuda.reset_peak_memory_stats()
    engine = EngineConfig(max_num_seqs=high, max_waiting=max(64, high), kv_cache_tokens=args.kv_cache_tokens)
    service = Service(ServiceSettings(load=LoadOptions(model_path=args.model_path, dtype=args.dtype,
                                                       device=args.device), engine=engine),
                      loader=lambda _options: loaded)
    service.load()
    if service.status != "ready":
        raise SystemExit(f"The service did not start: {service.error}")
    with serve_in_thread(service, threads=high + engine.max_waiting + 16) as url:
        console.print(f"llmctl server on {url}; llmctl bench at concurrency {levels} ...")
        # Between one stream's end and the next one's start fewer run; 90% of the level counts as busy.
        busy = max(1, int(high * 0.9))
        probe = HealthProbe(url, lambda: service.inflight >= busy)
        probe.start()
        try:
            client = run_client(url, args)
        finally:
            probe.stop()
            service.shutdown()

    peak = peak_memory_bytes(cuda) - (0 if cuda else rss_before)
    workload_tokens = high * (max(lv["prompt_tokens_mean"] or 0 for lv in client["runs"][0]["levels"])
                              + args.max_tokens)
    memory = {
        "measured": "GPU peak allocated" if cuda else "peak RSS minus RSS before loading",
        "peak_bytes": peak,
        "weights_bytes": loaded.weights_bytes,
        "kv_bytes_per_token": per_token,
        "kv_budget_bytes": args.kv_cache_tokens * per_token,
        "kv_workload_bytes": int(workload_tokens * per_token),
    }
    memory["peak_over_budget"] = peak / (loaded.weights_bytes + memory["kv_budget_bytes"])
    memory["peak_over_workload"] = peak / (loaded.weights_bytes + memory["kv_workload_bytes"])

    server = {lv["concurrency"]: lv for lv in client["runs"][0]["levels"]}
    raw = {lv.batch_size: {"output_throughput": lv.output_throughput} for lv in offline}
    health = Stats.of(probe.samples)
    checks = evaluate(raw, server, health, len(probe.samples), busy, memory)
    result = {
        "model": loaded.name, "dtype": loaded.dtype, "device": loaded.device,
        "gpu": (hardware.gpu_names() or [None])[0], "config": vars(args) | {"out": str(args.out),
                                                                           "model_path": str(args.model_path)},
        "offline": [lv.__dict__ for lv in offline], "server": client,
        "health_ms": health.__dict__ | {"samples": len(probe.samples), "errors": probe.errors,
                                        "min_inflight": busy},
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
