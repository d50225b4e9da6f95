"""Fault script: floods a server on this machine with what took servers down, and reports what it did.

Floods, one after another, each bounded in count and time:
- big prompts: N concurrent requests of a 1 MB prompt on every route that reads one (chat, completions,
  responses, messages, count_tokens, tokenize);
- slow headers: 1,010 connections that send one header line every 5 s (slowloris), from one client
  address, then spread over 101 addresses (10 each: under the per-client cap, over the connection limit);
- grammar bombs: constraints that ask the grammar compiler or matcher for too much.

Meanwhile a probe asks /health every 50 ms from another client address (the floods come from 127.0.0.2, as
a load balancer's probe comes from its own address), and the server's resident memory (with its worker
processes) is sampled every 100 ms. Everything stays on 127.0.0.1: the script starts the server itself, or
targets one given by --url (loopback only; --pid for its memory).

    python scripts/abuse.py --out abuse.json
"""

from __future__ import annotations

import argparse
import json
import selectors
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import httpx
import psutil
from soak import start_server  # scripts/soak.py: `llmctl serve` on 127.0.0.1, once ready

FLOOD_SOURCE = "127.0.0.2"
ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
          "/tokenize"]


def big_body(route: str, size: int) -> bytes:
    text = ("hello world " * (size // 12 + 1))[:size]
    messages = [{"role": "user", "content": text}]
    body = {"/v1/chat/completions": {"messages": messages, "max_tokens": 2},
            "/v1/completions": {"prompt": text, "max_tokens": 2},
            "/v1/responses": {"input": text, "max_output_tokens": 16, "store": False},
            "/v1/messages": {"messages": messages, "max_tokens": 2},
            "/v1/messages/count_tokens": {"messages": messages},
            "/tokenize": {"prompt": text}}[route]
    return json.dumps(body).encode()


def grammar_bombs() -> dict[str, tuple[str, dict]]:
    user = [{"role": "user", "content": "Give me JSON."}]
    huge_array = {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000}
    self_ref = {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]}
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"xs": huge_array}, "required": ["xs"]}}}

    def chat(**extra) -> tuple[str, dict]:
        return "/v1/chat/completions", {"messages": user, "max_tokens": 8, **extra}

    def schema(s: dict) -> dict:
        return {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}}

    return {
        "minItems 1e9 (response_format)": chat(**schema(huge_array)),
        "maxItems 1e9 (response_format)": chat(**schema({**huge_array, "minItems": 0, "maxItems": 1_000_000_000})),
        "regex a{1000}{1000} (structured_outputs)": chat(structured_outputs={"regex": "a{1000}{1000}"}),
        "1 MB regex": chat(structured_outputs={"regex": "a" * 1_000_000}),
        "choice of 10,000": chat(structured_outputs={"choice": [f"c{i}" for i in range(10_000)]}),
        "required $ref '#'": chat(**schema(self_ref)),
        "tool minItems 1e9 (tool_choice)": chat(tools=[tool], tool_choice="required"),
        "text.format minItems 1e9 (responses)": ("/v1/responses", {
            "input": "Give me JSON.", "max_output_tokens": 8, "store": False,
            "text": {"format": {"type": "json_schema", "name": "x", "schema": huge_array}}}),
    }


class Watch:
    """/health every 50 ms from 127.0.0.1, and the server's memory every 100 ms, until stopped."""

    def __init__(self, url: str, pid: int | None) -> None:
        self.url, self.pid = url, pid
        self.health: list[float] = []
        self.health_failures = 0
        self.rss_peak = 0
        self.rss_start = self._rss()
        self.phase = "start"
        self.phase_peaks: dict[str, dict[str, float]] = {}  # per flood: the server's peak RSS, and with workers
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._probe), threading.Thread(target=self._memory)]

    def _rss(self, tree: bool = True) -> int:
        if self.pid is None:
            return 0
        try:
            proc = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [proc, *(proc.children(recursive=True) if tree else [])])
        except psutil.Error:
            return 0

    def _probe(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.stop.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(self.url + "/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.health.append(time.monotonic() - started)
                self.health_failures += not ok
                self.stop.wait(0.05)

    def _memory(self) -> None:
        while not self.stop.is_set():
            server, tree = self._rss(tree=False), self._rss()
            self.rss_peak = max(self.rss_peak, tree)
            peaks = self.phase_peaks.setdefault(self.phase, {"server_mib": 0.0, "with_workers_mib": 0.0})
            peaks["server_mib"] = max(peaks["server_mib"], round(server / 2**20, 1))
            peaks["with_workers_mib"] = max(peaks["with_workers_mib"], round(tree / 2**20, 1))
            self.stop.wait(0.1)

    def __enter__(self) -> Watch:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def flood_big_prompts(url: str, clients: int, size: int) -> dict[str, Counter]:
    results: dict[str, Counter] = {}
    transport = httpx.HTTPTransport(local_address=FLOOD_SOURCE)
    with httpx.Client(transport=transport, timeout=120, limits=httpx.Limits(max_connections=clients)) as client, \
            ThreadPoolExecutor(clients) as pool:
        for route in ROUTES:
            body = big_body(route, size)

            def send(_: int, route: str = route, body: bytes = body) -> str:
                try:
                    r = client.post(url + route, content=body, headers={"Content-Type": "application/json"})
                    return f"{r.status_code} {_code(r)}".strip()
                except httpx.HTTPError as exc:
                    return type(exc).__name__
            results[route] = Counter(pool.map(send, range(clients)))
            print(f"  {route}: {dict(results[route])}", flush=True)
    return results


def _code(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return ""
    error = body.get("error") if isinstance(body, dict) else None
    return (error.get("code") or error.get("type") or "") if isinstance(error, dict) else ""


def flood_slow_headers(url: str, connections: int, interval: float, duration: float, sources: int = 1) -> Counter:
    """Connections that send one header line every ``interval`` s, from ``sources`` client addresses (127.0.0.2
    alone, or 127.0.0.10 and up); what each got back within ``duration``."""
    parsed = urlparse(url)
    sel = selectors.DefaultSelector()
    outcome: Counter = Counter()
    socks = []
    for i in range(connections):
        sock = socket.socket()
        sock.bind((FLOOD_SOURCE if sources == 1 else f"127.0.0.{10 + i % sources}", 0))
        sock.settimeout(5)
        try:
            sock.connect((parsed.hostname, parsed.port))
        except OSError as exc:
            outcome[f"connect failed: {type(exc).__name__}"] += 1
            sock.close()
            continue
        sock.setblocking(False)
        socks.append(sock)
        sel.register(sock, selectors.EVENT_READ, bytearray())
    lines = iter([b"POST /v1/chat/completions HTTP/1.1\r\n"] + [f"X-Slow-{i}: 1\r\n".encode() for i in range(10_000)])
    started = time.monotonic()
    next_line = started
    while sel.get_map() and time.monotonic() - started < duration:
        if time.monotonic() >= next_line:
            line = next(lines)
            for key in list(sel.get_map().values()):
                try:
                    key.fileobj.send(line)
                except OSError:
                    pass
            next_line += interval
        for key, _ in sel.select(timeout=0.1):
            data = key.data
            try:
                chunk = key.fileobj.recv(65536)
            except OSError:
                chunk = b""
            if chunk:
                data += chunk
                continue
            sel.unregister(key.fileobj)
            key.fileobj.close()
            status = data.split(b" ", 2)[1].decode() if data.startswith(b"HTTP/1.1 ") else "closed, no answer"
            outcome[status] += 1
    for key in list(sel.get_map().values()):
        outcome[f"still open after {duration:g} s"] += 1
        key.fileobj.close()
    return outcome


def flood_grammar_bombs(url: str, repeats: int) -> dict[str, Counter]:
    results: dict[str, Counter] = {}
    transport = httpx.HTTPTransport(local_address=FLOOD_SOURCE)
    with httpx.Client(transport=transport, timeout=120) as client:
        for name, (route, body) in grammar_bombs().items():
            tally: Counter = Counter()
            for _ in range(repeats):
                try:
                    r = client.post(url + route, json=body)
                    tally[f"{r.status_code} {_code(r)}".strip()] += 1
                except httpx.HTTPError as exc:
                    tally[type(exc).__name__] += 1
            results[name] = tally
            print(f"  {name}: {dict(tally)}", flush=True)
    return results


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else (values or [0])[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="a running server on 127.0.0.1 (default: start `llmctl serve`)")
    ap.add_argument("--pid", type=int, help="with --url: the server's process id, for its memory")
    ap.add_argument("--model-path", help="the model `llmctl serve` loads (default: the embedded SmolLM2)")
    ap.add_argument("--serve-arg", action="append", default=[], help="one more argument for `llmctl serve`")
    ap.add_argument("--big-clients", type=int, default=120, help="concurrent big prompts per route")
    ap.add_argument("--big-bytes", type=int, default=1_000_000, help="size of each big prompt")
    ap.add_argument("--slow-connections", type=int, default=1010)
    ap.add_argument("--slow-interval", type=float, default=5.0, help="seconds between header lines")
    ap.add_argument("--slow-duration", type=float, default=30.0, help="how long slow connections are kept")
    ap.add_argument("--slow-sources", type=int, default=101, help="client addresses of the spread slow flood")
    ap.add_argument("--bomb-repeats", type=int, default=2)
    ap.add_argument("--rss-bound-mib", type=float, default=2048, help="peak RSS (server and workers) must stay under")
    ap.add_argument("--out", help="write the report as JSON here")
    args = ap.parse_args()
    if args.big_clients > 200 or args.slow_connections > 2000 or args.slow_duration > 120 or args.bomb_repeats > 10 \
            or not 1 < args.slow_sources <= 240:
        raise SystemExit("bounded by design: at most 200 big clients, 2000 slow connections, 120 s, 10 repeats, "
                         "2-240 slow sources")

    proc = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
            raise SystemExit("--url must be a server on this machine (127.0.0.1)")
        url, pid = args.url.rstrip("/"), args.pid
    else:
        proc, url = start_server(args.model_path, args.serve_arg)
        pid = proc.pid
    started = time.monotonic()
    report: dict = {"url": url}
    with Watch(url, pid) as watch:
        print("big prompts:", flush=True)
        watch.phase = "big prompts"
        flooded = flood_big_prompts(url, args.big_clients, args.big_bytes)
        report["big_prompts"] = {k: dict(v) for k, v in flooded.items()}
        print("slow headers:", flush=True)
        watch.phase = "slow headers"
        for sources in (1, args.slow_sources):
            slow = flood_slow_headers(url, args.slow_connections, args.slow_interval, args.slow_duration, sources)
            report[f"slow_headers_{sources}_clients"] = dict(slow)
            print(f"  from {sources} client address(es): {dict(slow)}", flush=True)
        print("grammar bombs:", flush=True)
        watch.phase = "grammar bombs"
        report["grammar_bombs"] = {k: dict(v) for k, v in flood_grammar_bombs(url, args.bomb_repeats).items()}
    alive = proc is None or proc.poll() is None
    try:
        final_health = httpx.get(url + "/health", timeout=5).status_code
    except httpx.HTTPError:
        final_health = None
    exit_code = None
    if proc is not None and alive:
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(60)
    statuses = Counter()
    for part in (report["big_prompts"], report["grammar_bombs"]):
        for tally in part.values():
            for key, n in tally.items():
                statuses[key.split()[0]] += n
    for name in (k for k in report if k.startswith("slow_headers")):
        for key, n in report[name].items():
            statuses[key.split()[0] if key[:1].isdigit() else key] += n
    health = watch.health
    server_errors = sum(n for key, n in statuses.items() if key[:1] == "5")
    report.update({
        "duration_s": round(time.monotonic() - started, 1),
        "statuses": dict(statuses),
        "health": {"probes": len(health), "failures": watch.health_failures,
                   "p50_s": round(percentile(health, 50), 3), "p99_s": round(percentile(health, 99), 3),
                   "max_s": round(max(health, default=0), 3)},
        "rss_mib": {"start": round(watch.rss_start / 2**20, 1), "peak": round(watch.rss_peak / 2**20, 1),
                    "bound": args.rss_bound_mib, "peaks_by_flood": watch.phase_peaks},
        "server_alive_after": alive, "health_after": final_health, "server_exit_code": exit_code,
    })
    checks = {
        f"peak RSS < {args.rss_bound_mib:g} MiB": pid is not None and watch.rss_peak / 2**20 < args.rss_bound_mib,
        "/health p99 < 1 s": report["health"]["p99_s"] < 1.0 and not watch.health_failures,
        "0 x 5xx": server_errors == 0,
        "0 crashes": alive and final_health == 200 and exit_code in (None, 0),
    }
    report["checks"] = checks
    print(json.dumps({k: report[k] for k in ("duration_s", "statuses", "health", "rss_mib", "server_alive_after",
                                             "health_after", "server_exit_code")}, indent=2))
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
    raise SystemExit(0 if all(checks.values()) else 1)


if __name__ == "__main__":
    main()
