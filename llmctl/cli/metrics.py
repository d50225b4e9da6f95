"""`llmctl metrics`: the service's counters and latencies in human units, once or as a live view."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from llmctl.cli.health import EXIT_NOT_READY, EXIT_READY, EXIT_UNREACHABLE
from llmctl.cli.options import ConfigOpt, JsonOpt, UrlOpt
from llmctl.cli.output import console, err_console
from llmctl.client.config import LLMSettings, load_settings
from llmctl.client.probe import get_metrics
from llmctl.client.providers import ProviderError

LATENCIES = {"latency_s": "Request latency", "time_to_first_token_s": "Time to first token",
             "inter_token_latency_s": "Inter-token latency"}


def metrics(
    url: UrlOpt = None,
    json_output: JsonOpt = False,
    watch: Annotated[float | None, typer.Option(
        "--watch", min=0.1, metavar="SECONDS", show_default=False,
        help="Refresh every SECONDS until Ctrl-C: a live view, or one JSON object per line "
        "with --json.")] = None,
    count: Annotated[int | None, typer.Option(
        "--count", min=1, show_default=False, help="With --watch: stop after this many updates.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Show the service's metrics: requests, tokens, latency percentiles, throughput, memory.

    Exit codes: 0 shown; 1 the service answered with an error; 2 unreachable.
    With --json, failures are JSON too: {"status": "unreachable" or "error", "url": ..., "error": ...}.
    """
    if count is not None and watch is None:
        raise typer.BadParameter("--count needs --watch (it counts the updates of the live view).",
                                 param_hint="--count")
    settings = load_settings(config, self_hosted_url=url)
    if watch is None:
        data, error, code = fetch(settings)
        report(data, error, settings.self_hosted_url, json_output, indent=2, code=code)
        raise typer.Exit(code)
    raise typer.Exit(watch_loop(settings, watch, count, json_output))


def watch_loop(settings: LLMSettings, interval: float, count: int | None, json_output: bool) -> int:
    """Refresh until Ctrl-C or ``count`` updates; returns the exit code of the last update."""
    url = settings.self_hosted_url
    # A live view redraws in place; on a pipe or in a log, each update is printed after the last.
    live = Live(console=console, auto_refresh=False) if console.is_terminal and not json_output else None
    code, updates = EXIT_READY, 0
    try:
        if live is not None:
            live.start()
        while True:
            data, error, code = fetch(settings)
            if live is not None:
                live.update(render(data, error, url, interval), refresh=True)
            else:
                report(data, error, url, json_output, interval=interval, code=code)
            updates += 1
            if count is not None and updates >= count:
                break
            time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if live is not None:
            live.stop()
    return code


def fetch(settings: LLMSettings) -> tuple[dict | None, str | None, int]:
    """The metrics, or the error, and the exit code that goes with them."""
    key = settings.self_hosted_api_key.get_secret_value() if settings.self_hosted_api_key else None
    try:
        data = get_metrics(settings.self_hosted_url, timeout=min(settings.timeout_seconds, 10.0), api_key=key)
    except ProviderError as exc:
        # Only a failed connection is "unreachable" (the one retryable error without a status); an answer
        # that is not JSON came from something listening there: a protocol error, exit 1.
        unreachable = exc.status is None and exc.retryable
        return None, exc.message, EXIT_UNREACHABLE if unreachable else EXIT_NOT_READY
    if not isinstance(data, dict):
        return None, f"{settings.self_hosted_url}/metrics answered JSON that is not an object; is this an " \
                     "llmctl service?", EXIT_NOT_READY
    return data, None, EXIT_READY


def report(data: dict | None, error: str | None, url: str, json_output: bool, *, indent: int | None = None,
           interval: float | None = None, code: int = EXIT_READY) -> None:
    if error is not None:
        err_console.print(f"[red]Error:[/red] {escape(error)}", highlight=False)
        if json_output:
            # Scripts parse stdout: a failure is an object there too, shaped like `health --json`'s.
            status = "unreachable" if code == EXIT_UNREACHABLE else "error"
            typer.echo(json.dumps({"status": status, "url": url, "error": error}, indent=indent,
                                  ensure_ascii=False))
    elif json_output:
        typer.echo(json.dumps(data, indent=indent, ensure_ascii=False))
    else:
        console.print(render(data, None, url, interval))


def render(data: dict | None, error: str | None, url: str, interval: float | None = None) -> Group:
    """The metrics as two tables: a summary by topic, and the latency percentiles."""
    title = f"[bold]llmctl metrics[/] at {escape(url)}"
    if interval is not None:
        title += f" [dim]{time.strftime('%H:%M:%S')}, every {interval:g} s, Ctrl-C stops[/]"
    if error is not None or data is None:
        return Group(title, f"[red]{escape(error or 'no data')}[/]")
    return Group(title, summary_table(data), latency_table(data))


def summary_table(d: dict) -> Table:
    table = Table(show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    table.add_column(justify="right")
    device = d.get("device") or "-"
    if d.get("gpu_name"):
        device += f" ({d['gpu_name']})"
    by_status = ", ".join(f"{status}: {n:,}" for status, n in (d.get("requests_by_status") or {}).items())
    endings = ", ".join(f"{reason}: {n:,}" for reason, n in (d.get("finish_reasons") or {}).items())
    groups: dict[str, list[tuple[str, str]]] = {
        "Service": [("Status", str(d.get("status", "-"))), ("Model", str(d.get("model_name") or "-")),
                    ("Device", device), ("Version", str(d.get("version", "-"))),
                    ("Uptime", duration(d.get("uptime_s")))],
        "Requests": [("Total", number(d.get("requests_total"))), ("Failed", number(d.get("requests_failed"))),
                     ("By status", by_status or "-"), ("Generations ended by", endings or "-"),
                     ("Running", number(d.get("running"))),
                     ("Waiting", number(d.get("waiting"))),
                     ("Batch size (now / max)",
                      f"{number(d.get('batch_size'))} / {number(d.get('max_batch_size_seen'))}"),
                     ("Engine steps", number(d.get("engine_steps"))),
                     ("Out-of-memory events", number(d.get("oom_events"))),
                     ("Preemptions (KV budget full)", number(d.get("preemptions")))],
        "Tokens": [("Prompt", number(d.get("prompt_tokens_total"))),
                   ("Completion", number(d.get("completion_tokens_total"))),
                   ("Engine throughput", rate(d.get("engine_tokens_per_second")))],
        "KV cache": kv_cache_rows(d),
        "Memory": [("GPU allocated", gib(d.get("gpu_memory_allocated_gb"))),
                   ("GPU reserved", gib(d.get("gpu_memory_reserved_gb"))),
                   ("Process resident", gib(d.get("process_rss_gb")))],
    }
    for group, rows in groups.items():
        for i, (name, value) in enumerate(rows):
            table.add_row(group if i == 0 else "", name, escape(value))
        table.add_section()
    return table


def kv_cache_rows(d: dict) -> list[tuple[str, str]]:
    """KV-cache use and the prefix cache's size and hits (servers that do not report them show '-')."""
    prefix = d.get("prefix_cache") or {}
    usage = d.get("kv_cache_usage")
    hit_rate = prefix.get("hit_rate")
    size, capacity = prefix.get("size_tokens"), prefix.get("capacity_tokens")
    return [("In use by running requests", "-" if usage is None else f"{usage:.1%}"),
            ("Prefix cache (tokens held / bound)", f"{number(size)} / {number(capacity)}" if prefix else "-"),
            ("Prefix cache hits (prompt tokens)", f"{number(prefix.get('hits_tokens_total'))} of "
             f"{number(prefix.get('queries_tokens_total'))}" + (f" ({hit_rate:.1%})" if hit_rate is not None else "")
             if prefix else "-")]


def latency_table(d: dict) -> Table:
    table = Table(title="Per request", title_justify="left")
    table.add_column("", no_wrap=True)
    for heading in ("count", "mean", "p50", "p95", "p99"):
        table.add_column(heading, justify="right", no_wrap=True)
    rows: list[tuple[str, dict, Callable[[Any], str]]] = [(label, d.get(key) or {}, duration)
                                                          for key, label in LATENCIES.items()]
    # The unit is in the row's name: "1,234.5 tok/s" in each cell wraps at 80 columns.
    rows.append(("Tokens/s", d.get("tokens_per_second_per_request") or {}, per_second))
    for label, summary, unit in rows:
        table.add_row(label, number(summary.get("count")),
                      *(unit(summary.get(q)) for q in ("mean", "p50", "p95", "p99")))
    return table


def number(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "-"


def rate(value: Any) -> str:
    return f"{value:,.1f} tok/s" if isinstance(value, int | float) else "-"


def per_second(value: Any) -> str:
    return f"{value:,.1f}" if isinstance(value, int | float) else "-"


def gib(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return f"{value * 1024:,.0f} MiB" if value < 1 else f"{value:,.2f} GiB"


def duration(seconds: Any) -> str:
    """0.0123 -> '12.3 ms'; 3725 -> '1h 02m 05s'."""
    if not isinstance(seconds, int | float):
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.1f} ms"
    if seconds < 60:
        return f"{seconds:.2f} s"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours:02d}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    return f"{minutes}m {secs:02d}s"
