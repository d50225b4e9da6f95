"""Fuzz every operation of the OpenAPI document with schemathesis (`--checks all`) against a real server.

Without --url it builds a tiny random chat model (llmctl.server.testing), serves it with `python -m llmctl
serve` on 127.0.0.1, runs schemathesis against its /openapi.json and stops it. The run is bounded: at most
--examples cases per operation, generation mode (valid, invalid) and phase. Exit status 0 means no failure: no 5xx,
no schema-valid request rejected (see scripts/fuzz_openapi_hooks.py for the refusals that are right), every
answer matching the document.

    python scripts/fuzz_openapi.py --examples 100 --seed 1
    python scripts/fuzz_openapi.py --url http://127.0.0.1:8080 --api-key KEY
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from llmctl.client.probe import wait_for_health

ROOT = Path(__file__).resolve().parents[1]
HOOKS = "scripts.fuzz_openapi_hooks"
# Bounds the work of each request (the served document says so): thousands of cases run in minutes.
MAX_TOKENS = 8


def schemathesis_command(url: str, *, examples: int, seed: int, workers: int, phases: str,
                         api_key: str | None) -> list[str]:
    """The schemathesis CLI run over every operation of the server at ``url``."""
    command = [sys.executable, "-m", "schemathesis.cli", "run", f"{url}/openapi.json", "--checks", "all",
               "--max-examples", str(examples), "--seed", str(seed), "--workers", str(workers),
               "--phases", phases, "--continue-on-failure", "--no-color",
               "--request-timeout", "60", "--max-response-time", "60", "--suppress-health-check", "all",
               "--warnings", "off"]
    if api_key:
        command += ["--header", f"Authorization: Bearer {api_key}"]
    return command


def environment() -> dict[str, str]:
    """The environment schemathesis runs in: with this project's hooks (fuzz_openapi_hooks)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "SCHEMATHESIS_HOOKS": HOOKS, "PYTHONPATH": path}


def run_schemathesis(url: str, **options) -> int:
    command = schemathesis_command(url, **options)
    print("$ schemathesis", " ".join(command[4:]), flush=True)
    return subprocess.run(command, env=environment(), cwd=ROOT, check=False).returncode


def serve_tiny_model(folder: Path) -> tuple[subprocess.Popen, str]:
    """`llmctl serve` on a tiny random model, on a free loopback port; returns the process and its URL."""
    from llmctl.server.testing import build_tiny_model, free_port

    model = build_tiny_model(folder / "tiny-llama")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "llmctl", "serve", "--model-path", str(model), "--host", "127.0.0.1",
         "--port", str(port), "--device", "cpu", "--dtype", "float32", "--max-tokens-cap", str(MAX_TOKENS)],
        stdout=subprocess.DEVNULL, stderr=open(folder / "server.log", "wb"), cwd=ROOT)  # noqa: SIM115
    url = f"http://127.0.0.1:{port}"

    def alive(_health, _left) -> None:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}; see {folder / 'server.log'}")

    if not wait_for_health(url, 120, interval=0.2, on_poll=alive).ready:
        server.terminate()
        raise SystemExit("the server was not ready within 120 s")
    return server, url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="fuzz this running server instead of starting one")
    parser.add_argument("--api-key", default=os.environ.get("LLMCTL_API_KEY"))
    parser.add_argument("--examples", type=int, default=50, help="cases per operation and phase")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--phases", default="examples,coverage,fuzzing")
    args = parser.parse_args(argv)
    options = {"examples": args.examples, "seed": args.seed, "workers": args.workers,
               "phases": args.phases, "api_key": args.api_key}
    if args.url:
        return run_schemathesis(args.url.rstrip("/"), **options)
    with tempfile.TemporaryDirectory(prefix="llmctl-fuzz-") as tmp:
        server, url = serve_tiny_model(Path(tmp))
        try:
            status = run_schemathesis(url, **options)
        finally:
            server.terminate()
            server.wait(30)
        if server.returncode not in (0, -15):
            print(f"the server exited with {server.returncode}", file=sys.stderr)
            return status or 1
        return status


if __name__ == "__main__":
    sys.exit(main())
