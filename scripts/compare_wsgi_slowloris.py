"""Which WSGI server keeps /health answering under a slow-header flood: waitress as llmctl ran it before,
waitress guarded as `llmctl serve` runs it now (llmctl/server/transport.py), and cheroot (CherryPy's server).

Each serves the same small WSGI app on 127.0.0.1 with 112 worker threads (`llmctl serve`'s default) while
`scripts/abuse.py`'s slow-header flood holds its connections (from 127.0.0.2) and a probe asks /health
every 50 ms (from 127.0.0.1). Bounded: one flood per server, --duration seconds each.

    python scripts/compare_wsgi_slowloris.py --connections 1010 --duration 30
"""

from __future__ import annotations

import argparse
import json
import threading

from abuse import Watch, flood_slow_headers, percentile

from llmctl.server.testing import free_port
from llmctl.server.transport import TransportLimits, create_guarded_server

THREADS = 112


def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "application/json")])
    return [b'{"status": "ready"}']


def plain_waitress(port: int):
    from waitress import create_server

    server = create_server(app, host="127.0.0.1", port=port, threads=THREADS, channel_request_lookahead=1,
                           asyncore_use_poll=True)
    return server.run, server.close


def guarded_waitress(port: int):
    server = create_guarded_server(app, "127.0.0.1", port, THREADS, TransportLimits(max_client_connections=THREADS),
                                   8 * 1024 * 1024)
    return server.run, server.close


def cheroot(port: int):
    from cheroot import wsgi

    server = wsgi.Server(("127.0.0.1", port), app, numthreads=THREADS)
    return server.safe_start, server.stop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--connections", type=int, default=1010)
    ap.add_argument("--interval", type=float, default=5.0)
    ap.add_argument("--duration", type=float, default=30.0)
    args = ap.parse_args()
    if args.connections > 2000 or args.duration > 120:
        raise SystemExit("bounded by design: at most 2000 connections and 120 s")
    report = {}
    for name, build in (("waitress, as before", plain_waitress), ("waitress, guarded (llmctl serve)", guarded_waitress),
                        ("cheroot", cheroot)):
        port = free_port()
        run, stop = build(port)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        url = f"http://127.0.0.1:{port}"
        with Watch(url, None) as watch:
            outcome = flood_slow_headers(url, args.connections, args.interval, args.duration)
        stop()
        health = watch.health
        report[name] = {"flood": dict(outcome), "health_probes": len(health), "health_failures": watch.health_failures,
                        "health_p50_s": round(percentile(health, 50), 3),
                        "health_p99_s": round(percentile(health, 99), 3), "health_max_s": round(max(health), 3)}
        print(name, json.dumps(report[name]), flush=True)


if __name__ == "__main__":
    main()
