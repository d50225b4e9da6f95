"""`llmctl health`: is the service ready? A table for people, JSON and exit codes for scripts."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from llmctl import envvars
from llmctl.cli.options import ConfigOpt, JsonOpt, UrlOpt
from llmctl.cli.output import console, err_console
from llmctl.client.config import load_settings
from llmctl.client.probe import Health, get_health, wait_for_health

EXIT_READY = 0
EXIT_NOT_READY = 1
EXIT_UNREACHABLE = 2
STATUS_STYLE = {"ready": "bold green", "loading": "bold yellow", "shutting_down": "bold yellow"}
FIELDS = {
    "status": "Status", "model": "Model", "device": "Device", "dtype": "Dtype",
    "quantization": "Quantization",
    "context_length": "Context length", "running": "Running requests", "waiting": "Waiting requests",
    "cuda_available": "CUDA available", "cuda_device_count": "CUDA devices",
    "memory_allocated_gb": "GPU memory allocated", "memory_reserved_gb": "GPU memory reserved",
    "version": "Version", "error": "Error",
}


def health(
    url: UrlOpt = None,
    json_output: JsonOpt = False,
    wait: Annotated[float | None, typer.Option(
        "--wait", min=0, metavar="SECONDS", show_default=False,
        help="Poll until the service is ready or SECONDS have passed (for scripts and CI).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Show the service's health: status, model, device, memory, queue.

    Exit codes: 0 ready; 1 loading, failed to load or shutting down; 2 unreachable.
    """
    settings = load_settings(config, self_hosted_url=url)
    url = settings.self_hosted_url
    timeout = min(settings.timeout_seconds, 10.0)
    if wait:
        with err_console.status(f"Waiting for {escape(url)}…") as spinner:
            report = wait_for_health(url, wait, timeout=timeout, on_poll=lambda h, left: spinner.update(
                f"Waiting for {escape(url)}: {escape(h.status)}, {left:.0f} s left…"))
    else:
        report = get_health(url, timeout=timeout)
    if json_output:
        body = report.body or {"status": report.status, "url": url, "error": report.error}
        typer.echo(json.dumps(body, indent=2, ensure_ascii=False))
    else:
        console.print(render(report))
    raise typer.Exit(exit_code(report))


def exit_code(report: Health) -> int:
    if report.ready:
        return EXIT_READY
    return EXIT_UNREACHABLE if not report.reachable else EXIT_NOT_READY


def render(report: Health) -> Table:
    table = Table(show_header=False)
    table.add_column("Field", style="bold", no_wrap=True)
    table.add_column("Value")
    table.add_row("URL", escape(report.url))
    body = report.body or {"status": report.status, "error": report.error}
    for key, value in body.items():
        table.add_row(escape(FIELDS.get(key, str(key))), _value(key, value))
    if not report.reachable:
        table.add_row("Hint", "Start it with `llmctl serve`, or point --url at it.")
    elif report.http_status == 401:
        # llmctl keeps /health open, so this is another kind of server; chat and metrics send a key.
        table.add_row("Hint", f"It asks for an API key. `llmctl chat` and `llmctl metrics` send "
                              f"{envvars.API_KEY} (or the first key in {envvars.API_KEY_FILE}); "
                              "llmctl's own /health needs none.")
    return table


def _value(key: str, value: Any) -> str:
    if key == "status":
        return f"[{STATUS_STYLE.get(str(value), 'bold red')}]{escape(str(value))}[/]"
    if value is None:
        return "[dim]-[/]" if key != "quantization" else "none"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if key.endswith("_gb") and isinstance(value, int | float):
        return f"{value:.2f} GiB"
    if key == "context_length" and isinstance(value, int):
        return f"{value:,} tokens"
    return escape(str(value))
