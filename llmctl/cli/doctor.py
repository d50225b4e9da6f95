"""`llmctl doctor`: diagnose the machine, the model and the service in one command."""

from __future__ import annotations

import json
import logging
from typing import Annotated, Literal

import typer
from rich import box
from rich.table import Table
from rich.text import Text

from llmctl import envvars
from llmctl.cli.options import ConfigOpt, JsonOpt, ModelPathOpt
from llmctl.cli.output import console, err_console
from llmctl.client.config import configured_model_path
from llmctl.doctor.checks import DoctorOptions, Report, run_doctor
from llmctl.doctor.fit import SERVE_KV_CACHE_TOKENS, FitPrediction, fmt_bytes
from llmctl.doctor.vllmcheck import VllmPlan

STATUS = {"ok": "[green]ok[/green]", "warning": "[yellow]warning[/yellow]", "failure": "[red]FAILURE[/red]"}


def doctor(
    model_path: ModelPathOpt = None,
    context_length: Annotated[int | None, typer.Option(
        "--context-length", min=16, show_default=False,
        help="Tokens per sequence for the KV-cache estimate (serve's --max-model-len). Default: the "
        "model's context length.")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Sequences generated at once, for the KV-cache estimate (at most serve's "
        "--max-num-seqs).")] = 1,
    kv_cache_tokens: Annotated[int, typer.Option(
        "--kv-cache-tokens", envvar=envvars.KV_CACHE_TOKENS, min=16,
        help="serve's KV cache budget over all sequences: the estimate counts context x batch tokens, at "
        "most this many.")] = SERVE_KV_CACHE_TOKENS,
    port: Annotated[int, typer.Option(
        envvar=envvars.PORT, min=1, max=65535,
        help="The port `llmctl serve` will listen on: checked to be free.")] = 8080,
    url: Annotated[str | None, typer.Option(
        "--url", show_default=False,
        help="Check a running service at this URL (its root, its /v1 URL, or host:port) instead of the "
        "port.")] = None,
    engine: Annotated[Literal["builtin", "vllm"], typer.Option(
        "--engine", envvar=envvars.ENGINE,
        help="The engine `llmctl serve` will run; vllm adds its checks (package, hardware, memory, Ray).")] = "builtin",
    tensor_parallel_size: Annotated[int, typer.Option(envvar=envvars.TENSOR_PARALLEL_SIZE, min=1)] = 1,
    pipeline_parallel_size: Annotated[int, typer.Option(envvar=envvars.PIPELINE_PARALLEL_SIZE, min=1)] = 1,
    distributed_executor_backend: Annotated[Literal["auto", "mp", "ray"], typer.Option(
        envvar=envvars.DISTRIBUTED_EXECUTOR_BACKEND, help="--engine vllm: ray also checks the Ray cluster.")] = "auto",
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", envvar=envvars.LORA, show_default=False,
        help="A LoRA adapter folder serve will get (NAME=PATH or PATH; repeatable): its files, rank and layers "
        "checked against the model.")] = None,
    config: ConfigOpt = None,
    json_output: JsonOpt = False,
) -> None:
    """Check the machine, the model and the service, and say what to fix, without loading any weights.

    Checks Python and package versions, CUDA (or the CPU), bitsandbytes, the model files, whether the
    model fits in memory (and which flag makes it fit), disk space, and the port or a running service.
    Exit code 0 when no check failed (warnings do not fail), 1 when one did.
    """
    model_path = configured_model_path(config, model_path)
    options = DoctorOptions(model_path=model_path, context_length=context_length, batch_size=batch_size,
                            port=port, url=url, kv_cache_tokens=kv_cache_tokens,
                            vllm=VllmPlan(tensor_parallel_size, pipeline_parallel_size,
                                          None if distributed_executor_backend == "auto"
                                          else distributed_executor_backend,
                                          kv_cache_tokens=kv_cache_tokens) if engine == "vllm" else None,
                            loras=tuple(lora or ()))
    # bitsandbytes logs its own import warnings; this command reports on it in its own words.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    if json_output:
        report = run_doctor(options)
        typer.echo(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
    else:
        with err_console.status("Checking the machine and the model..."):
            report = run_doctor(options)
        render(report)
    raise typer.Exit(report.exit_code)


def render(report: Report) -> None:
    """The report as two tables (checks, then memory per precision) and a summary line."""
    table = Table(title=f"llmctl doctor: {report.model or 'no model'}", title_justify="left",
                  box=box.SIMPLE_HEAD, show_lines=True)
    table.add_column("Status", no_wrap=True)
    table.add_column("Check", no_wrap=True, style="bold")
    table.add_column("Finding and fix", overflow="fold")
    for check in report.checks:
        text = Text(check.finding)
        if check.fix:
            label = "Tip: " if check.status == "ok" else "Fix: "
            text.append("\n" + label, style="bold cyan").append(check.fix, style="cyan")
        table.add_row(STATUS[check.status], check.name, text)
    console.print(table, highlight=False)
    if report.fit is not None:
        console.print(fit_table(report.fit), highlight=False)
    failures, warnings = report.count("failure"), report.count("warning")
    if failures:
        console.print(f"[red]{failures} failure(s)[/red], {warnings} warning(s): fix the failures above "
                      "(exit code 1).", highlight=False)
    else:
        console.print(f"[green]No failures[/green], {warnings} warning(s).", highlight=False)


def fit_table(fit: FitPrediction) -> Table:
    """Memory needed per precision; the arrow marks what `llmctl serve` should use."""
    memory = "free GPU memory" if fit.device == "cuda" else "available RAM"
    capped = "capped at" if fit.kv_tokens < fit.batch_size * fit.context_length else "within"
    per_gpu = f" x {fit.devices} GPUs" if fit.devices > 1 else ""
    table = Table(title=f"Memory needed: weights + KV cache for {fit.kv_tokens:,} tokens ({fit.batch_size} x "
                  f"{fit.context_length:,}, {capped} --kv-cache-tokens {fit.kv_cache_tokens:,}) + runtime "
                  f"(0.5 GiB{per_gpu} + 5% of weights), against {fmt_bytes(fit.available_bytes)} {memory}",
                  title_justify="left",
                  box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
    table.add_column("Precision", no_wrap=True)
    table.add_column("Flag", no_wrap=True)
    for column in ("Weights", "KV cache", "Total"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("Fits", min_width=4)
    for row in fit.rows:
        fits = "[green]yes[/green]" if fit.fits(row) else "[red]no[/red]"
        fits += "" if row.usable else f" ({row.note})"
        table.add_row(row.label + (" <-" if row is fit.choice else ""), row.flag or "(default)",
                      fmt_bytes(row.weights_bytes), fmt_bytes(row.kv_bytes), fmt_bytes(row.total_bytes), fits)
    return table
