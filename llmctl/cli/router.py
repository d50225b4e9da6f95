"""`llmctl router`: start vLLM's router (the `cluster` extra) in front of llmctl replicas, with llmctl's defaults."""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated, Literal

import typer

from llmctl import envvars
from llmctl.cli.output import err_console
from llmctl.client.probe import get_health
from llmctl.errors import ConfigError

Policy = Literal["cache_aware", "round_robin", "power_of_two", "consistent_hash", "random"]
ROUTER_BINARY = "vllm-router"


def router_binary() -> str:
    """The installed router's launcher: beside this Python first (the same environment), else on PATH."""
    beside = Path(sys.executable).parent / ROUTER_BINARY
    found = str(beside) if beside.is_file() else shutil.which(ROUTER_BINARY)
    if not found:
        raise ConfigError(f"{ROUTER_BINARY} is not installed: pip install 'llmctl[cluster]' "
                          "(or make install, whose default extras include it).")
    return found


def worker_urls(values: list[str]) -> list[str]:
    """Repeated or comma-separated URLs, each with its scheme and without a trailing slash or /v1."""
    urls = [u.strip().rstrip("/") for value in values for u in value.split(",") if u.strip()]
    if not urls:
        raise ConfigError("Give the replicas' URLs: --worker-url http://host:8080 (repeat it for each).")
    for url in urls:
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"Worker URL {url!r} needs its scheme, e.g. http://{url}.")
    return [url.removesuffix("/v1") for url in urls]


def router_command(urls: list[str], *, host: str, port: int, policy: Policy, api_key: str | None,
                   retries: int, health_interval: int, prometheus_port: int | None,
                   extra: list[str]) -> list[str]:
    """The router's argv: what `llmctl router` runs, and what --dry-run prints."""
    argv = [router_binary(), "--worker-urls", *urls, "--host", host, "--port", str(port), "--policy", policy,
            # A dead replica is taken out after two failed probes, a revived one back after one good probe;
            # the router's own default interval (60 s) would route to a dead replica for minutes.
            "--health-check-interval-secs", str(health_interval), "--health-failure-threshold", "2",
            "--health-success-threshold", "1", "--health-check-endpoint", "/health",
            # Startup: go once one replica is ready, probing every second (llmctl starts in seconds).
            "--worker-startup-check-interval", "1",
            "--retry-max-retries", str(retries), "--retry-initial-backoff-ms", "100",
            # A replica with 2 failed requests (a dead one refuses every connection at once) gets no
            # requests, retries included, until a trial request 5 s later succeeds: without this, a retry
            # could land on the dead replica again before the health probes notice it.
            "--cb-failure-threshold", "2", "--cb-success-threshold", "1", "--cb-timeout-duration-secs", "5"]
    if prometheus_port is not None:
        argv += ["--prometheus-port", str(prometheus_port)]
    if api_key:
        argv += ["--api-key", api_key]
    return argv + extra


def check_workers(urls: list[str]) -> None:
    """Warn about replicas not ready yet; refuse replicas that serve different models."""
    models: dict[str, str] = {}
    for url in urls:
        health = get_health(url, timeout=3.0)
        if not health.ready:
            err_console.print(f"[yellow]Note:[/yellow] {url} is {health.status}"
                              f"{': ' + health.error if health.error else ''}; the router waits for it.",
                              highlight=False, soft_wrap=True)
        elif health.body.get("model"):
            models[url] = health.body["model"]
    if len(set(models.values())) > 1:
        listing = ", ".join(f"{url}: {name}" for url, name in models.items())
        raise ConfigError(f"The replicas serve different models ({listing}); a router spreads one model's "
                          "requests over identical replicas.")


def router(
    ctx: typer.Context,
    worker_url: Annotated[list[str], typer.Option(
        "--worker-url", envvar=envvars.WORKER_URLS, show_default=False,
        help="A replica's base URL (llmctl serve), e.g. http://10.0.0.2:8080; repeat, or comma-separate.")],
    host: Annotated[str, typer.Option(envvar=envvars.ROUTER_HOST, help="Address the router listens on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(envvar=envvars.ROUTER_PORT, min=1, max=65535, help="Router port.")] = 8000,
    policy: Annotated[Policy, typer.Option(
        envvar=envvars.ROUTER_POLICY,
        help="cache_aware: requests that share a prefix (an agent's instructions, a conversation) go to the "
        "replica that has it cached, unless the load is uneven. round_robin, power_of_two (reads /get_load), "
        "consistent_hash, random: vLLM router's other policies.")] = "cache_aware",
    api_key: Annotated[str | None, typer.Option(
        envvar=envvars.API_KEY, show_default=False,
        help="The replicas' API key, for the router's own calls to them. Clients send their key as usual: the "
        "router passes their Authorization header through and the replicas check it.")] = None,
    retries: Annotated[int, typer.Option(
        min=1, max=10, help="Attempts per request: a replica that fails (5xx, 429, gone) is retried on another.")] = 5,
    health_check_interval: Annotated[int, typer.Option(
        min=1, help="Seconds between the router's /health probes of each replica.")] = 5,
    prometheus_port: Annotated[int | None, typer.Option(
        help="Port of the router's own Prometheus metrics (127.0.0.1). Default: the router's (29000).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the router command instead of running it.")] = False,
) -> None:
    """Route requests over several llmctl replicas with vLLM's router (cache-aware by default).

    Arguments after `--` go to vllm-router unchanged (see vllm-router --help); docs/scaling.md shows a deployment.
    """
    urls = worker_urls(worker_url)
    argv = router_command(urls, host=host, port=port, policy=policy, api_key=api_key, retries=retries,
                          health_interval=health_check_interval, prometheus_port=prometheus_port,
                          extra=list(ctx.args))
    if not api_key and host in ("0.0.0.0", "::", ""):
        # The router checks no key itself: only the replicas' --api-key guards the model.
        err_console.print("[yellow]Note:[/yellow] listening on all interfaces without --api-key: unless the "
                          "replicas require a key (llmctl serve --api-key), anyone who reaches this port can use "
                          "the model.", highlight=False, soft_wrap=True)
    if dry_run:
        shown = [a if a != api_key else "***" for a in argv]
        typer.echo(shlex.join(shown))
        return
    check_workers(urls)
    err_console.print(f"Routing {len(urls)} replicas ({policy}) on http://{host}:{port}", highlight=False)
    sys.stdout.flush()
    # The router replaces this process, so signals (Ctrl-C, a container's SIGTERM) reach it directly.
    os.execv(argv[0], argv)
