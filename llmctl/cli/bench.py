"""`llmctl bench`: throughput and latency of OpenAI-compatible servers, and of raw generate, side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from llmctl import envvars
from llmctl.bench.loadgen import BenchPlan, Endpoint, EndpointRun, Workload, run_benchmark
from llmctl.bench.offline import OfflineRun
from llmctl.bench.prompts import BenchError, Messages, builtin_prompts, load_prompts
from llmctl.bench.report import BenchReport, check_plot_available, write_plot
from llmctl.bench.stats import LevelSummary, RequestResult
from llmctl.bench.workers import WorkerCounts, read_counts, worker_shares
from llmctl.cli.options import ConfigOpt, ModelPathOpt
from llmctl.cli.output import console, err_console
from llmctl.client.config import configured_model_path, load_settings
from llmctl.core.loader import Device, Dtype

# Tokens a chat template may add around a prompt (SmolLM2's adds about 30), before a prompt counts as longer
# than --prompt-tokens asked for.
PROMPT_TEMPLATE_ALLOWANCE = 64


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise BenchError(f"--concurrency takes comma-separated integers such as 1,4,16, not {text!r}.") from None
    if not levels or min(levels) < 1:
        raise BenchError("--concurrency needs one or more positive integers, e.g. 1,4,16.")
    return levels


def bench(
    url: Annotated[str | None, typer.Option(envvar=envvars.BENCH_URL, help=(
        f"Server to benchmark (its root or its /v1 URL). Default: ${envvars.SELF_HOSTED_LLM_URL}, else the "
        "config's self_hosted_url, else http://127.0.0.1:8080; none with --offline."))] = None,
    model: Annotated[str | None, typer.Option(
        help="Model name to request. Default: the first of GET /v1/models.")] = None,
    api_key: Annotated[str | None, typer.Option(
        envvar=envvars.BENCH_API_KEY, help="Bearer token, if the server needs one.")] = None,
    compare: Annotated[str | None, typer.Option(help="A second server: run the same workload on both, alternating, "
                                                     "and print the ratios (second / first).")] = None,
    compare_model: Annotated[str | None, typer.Option(help="Model name on the --compare server.")] = None,
    concurrency: Annotated[str, typer.Option(help="Concurrency levels, comma-separated.")] = "1,4,16",
    requests: Annotated[int | None, typer.Option(
        min=1, help="Requests per level. Default: 4 per stream, at least 8.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, help="Output tokens per request.")] = 128,
    prompt_tokens: Annotated[int, typer.Option(
        min=1, help="Length of the built-in prompts, in tokens (words).")] = 64,
    shared_prefix_tokens: Annotated[int, typer.Option(
        min=0, help="Start every built-in prompt with the same system message of this many tokens (words), "
                    "as an agent's instructions do, to measure a server's prefix caching.")] = 0,
    prompts: Annotated[Path | None, typer.Option(
        help='JSONL prompts instead: {"prompt": ...} or {"messages": [...]} a line.')] = None,
    seed: Annotated[int, typer.Option(help="Seed of the built-in prompt set.")] = 0,
    ignore_eos: Annotated[bool, typer.Option(help="Send ignore_eos: true so every response runs to max_tokens "
                                                  "(llmctl and vLLM; --no-ignore-eos for strict servers).")] = True,
    eos_bias: Annotated[bool, typer.Option(help="Also ban end-of-sequence with the standard logit_bias (-100), for "
                                                "servers without ignore_eos; needs --eos-token-id.")] = False,
    eos_token_id: Annotated[list[int] | None, typer.Option(
        help="End-of-sequence token id(s) for --eos-bias; repeatable.")] = None,
    temperature: Annotated[float, typer.Option(min=0, max=2, help="Sampling temperature (0: greedy).")] = 0.0,
    warmup: Annotated[int, typer.Option(min=0, help="Warm-up requests per endpoint, not counted.")] = 2,
    time_limit: Annotated[float | None, typer.Option(min=0.1, help="Stop a level after this many seconds; "
                                                                  "unfinished requests count as cancelled.")] = None,
    request_timeout: Annotated[float, typer.Option(min=1, help="Client timeout per request, in seconds.")] = 300.0,
    offline: Annotated[bool, typer.Option(help="Also measure raw model.generate in this process at batch size = "
                                               "each concurrency level (alone, unless --url is given).")] = False,
    model_path: ModelPathOpt = None,
    dtype: Annotated[Dtype, typer.Option(help="Weight dtype for --offline.")] = "auto",
    device: Annotated[Device, typer.Option(help="Device for --offline.")] = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print the JSON report only.")] = False,
    output: Annotated[Path | None, typer.Option(
        "--output", "-o", help="Also write the JSON report to this file.")] = None,
    csv: Annotated[Path | None, typer.Option(help="Write one CSV row per endpoint and level ('-': stdout).")] = None,
    plot: Annotated[Path | None, typer.Option(
        help="Write a PNG of throughput and latency against concurrency (needs matplotlib).")] = None,
    worker_url: Annotated[list[str] | None, typer.Option(
        "--worker-url", help="With --url a router: an llmctl replica behind it (repeat for each). The report adds "
        "each replica's share of the measured requests and its prefix-cache hit rate, from its /metrics "
        "(read with --api-key).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Benchmark chat completions: TTFT, TPOT, ITL, E2E latency and throughput per concurrency level.

    Works with any OpenAI-compatible server that streams chat completions; --compare runs two side by side,
    --offline measures raw model.generate. Metric definitions and the JSON schema: docs/bench.md.
    """
    levels = parse_levels(concurrency)
    if plot is not None:
        check_plot_available()
    if compare and offline:
        raise BenchError("Use --compare or --offline, not both.")
    if eos_bias and not eos_token_id:
        raise BenchError("--eos-bias needs the end-of-sequence token id: add --eos-token-id ID.")
    if url is None and not offline:
        # The service chat and health talk to: $SELF_HOSTED_LLM_URL, else the config file's, else the default.
        settings = load_settings(config)
        url = settings.self_hosted_url
        if api_key is None and settings.self_hosted_api_key is not None:
            api_key = settings.self_hosted_api_key.get_secret_value()
    elif offline:
        model_path = configured_model_path(config, model_path)
    if compare and url is None:
        raise BenchError("--compare needs --url for the first server.")
    if prompts and shared_prefix_tokens:
        raise BenchError("--shared-prefix-tokens shapes the built-in prompts; with --prompts, put the shared "
                         "system message in the file.")
    if worker_url and (compare or not url):
        raise BenchError("--worker-url names the replicas behind the one --url server; it cannot go with "
                         "--compare or --offline alone.")
    if as_json and csv is not None and str(csv) == "-":
        raise BenchError("--json and --csv - both print to stdout; write the CSV to a file.")
    endpoints = [Endpoint(url, model, api_key, "A")] if url else []
    if compare:
        endpoints.append(Endpoint(compare, compare_model, api_key, "B"))
    plan = BenchPlan(endpoints, Workload([]), levels, requests, warmup, time_limit)
    # One distinct prompt per request of every level, and others for the warm-up, so that no
    # server gains from a prefix cache.
    count = plan.prompt_count()
    messages: Sequence[Messages]
    if prompts:
        messages = load_prompts(prompts)
        # The file's unused tail if it has one, else built-in prompts: never a prompt a level measures.
        spare = messages[count:]
        warmup_messages = spare if len(spare) >= warmup else builtin_prompts(warmup, prompt_tokens, seed,
                                                                             offset=count)
    else:
        messages = builtin_prompts(count, prompt_tokens, seed, shared_prefix_tokens=shared_prefix_tokens)
        # The warm-up sends the shared prefix too: the measured requests see the steady state of an
        # agent whose instructions the server has seen before.
        warmup_messages = builtin_prompts(warmup, prompt_tokens, seed, offset=count,
                                          shared_prefix_tokens=shared_prefix_tokens)
    plan.workload = Workload(messages, max_tokens=max_tokens, temperature=temperature, ignore_eos=ignore_eos,
                             eos_bias_ids=tuple(eos_token_id or ()) if eos_bias else (),
                             request_timeout=request_timeout, warmup_prompts=warmup_messages)
    run_settings = {
        "concurrency": levels, "requests": requests, "max_tokens": max_tokens,
        "prompt_tokens": None if prompts else prompt_tokens, "prompts_file": str(prompts) if prompts else None,
        "shared_prefix_tokens": None if prompts else shared_prefix_tokens,
        "seed": seed, "temperature": temperature, "ignore_eos": ignore_eos,
        "eos_bias_ids": list(plan.workload.eos_bias_ids), "warmup": warmup, "time_limit_s": time_limit,
        "request_timeout_s": request_timeout,
    }

    runs: list[EndpointRun] = []
    interrupted = False
    replicas = [u.rstrip("/") for u in worker_url or []]
    before: list[WorkerCounts] = []
    if replicas:
        read_counts(replicas, api_key)  # unreadable replicas fail before the run, not after it

    def warmed() -> None:
        before.extend(read_counts(replicas, api_key))

    with _progress_bar() as bar:
        if endpoints:
            runs, interrupted = run_benchmark(plan, progress=bar.server_result, warmed=warmed if replicas else None)
        offline_run = None
        if offline and not interrupted:
            offline_run, interrupted = _run_offline(model_path, dtype, device, plan, bar)
    shares = worker_shares(before, read_counts(replicas, api_key)) if before else None
    report = BenchReport(run_settings, runs, offline_run, interrupted, workers=shares)

    _write_outputs(report, output, csv, plot)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        # With --csv -, stdout carries the CSV alone, so `> run.csv` is a valid file; the tables go to stderr.
        render(report, err_console if csv is not None and str(csv) == "-" else console)
    if interrupted:
        err_console.print("[yellow]Interrupted:[/yellow] the tables show what finished.")
        raise typer.Exit(130)
    levels_run = [lv for run in runs for lv in run.levels]
    if any(lv.failed for lv in levels_run) and not any(lv.completed for lv in levels_run):
        first = next(m for lv in levels_run for m in lv.errors)
        raise BenchError(f"Every request failed, for example: {first}")


def _run_offline(model_path: Path | None, dtype: Dtype, device: Device, plan: BenchPlan,
                 bar: _ProgressBar) -> tuple[OfflineRun | None, bool]:
    from llmctl.bench.offline import load_offline_model, run_offline

    err_console.print(f"Loading {model_path or 'the embedded model'} for the offline baseline...")
    try:
        loaded = load_offline_model(model_path, dtype, device)
    except KeyboardInterrupt:
        return None, True
    levels: list = []
    interrupted = False
    try:
        run_offline(loaded, plan.workload.prompts, plan.concurrency, plan.workload.max_tokens, plan.requests_for,
                    first_prompts=plan.prompt_starts(), progress=bar.offline_batch, done=levels)
    except KeyboardInterrupt:
        interrupted = True
    return OfflineRun(loaded.name, loaded.dtype, loaded.device, levels), interrupted


def _write_outputs(report: BenchReport, output: Path | None, csv: Path | None, plot: Path | None) -> None:
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    if csv is not None:
        if str(csv) == "-":
            typer.echo(report.to_csv(), nl=False)
        else:
            csv.parent.mkdir(parents=True, exist_ok=True)
            csv.write_text(report.to_csv(), encoding="utf-8")
    if plot is not None:
        write_plot(report, plot)
    for path in (output, None if csv and str(csv) == "-" else csv, plot):
        if path is not None:
            err_console.print(f"Wrote {path}", highlight=False)


# ---- terminal output ---------------------------------------------------------------------------
class _ProgressBar:
    """One rich progress bar per level, on stderr; silent where stderr is not a terminal."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[failed]}"), TimeElapsedColumn(),
                                 console=err_console, transient=True, disable=not err_console.is_terminal)
        self.tasks: dict[tuple[str, int], TaskID] = {}
        self.failed: dict[tuple[str, int], int] = {}

    def __enter__(self) -> _ProgressBar:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def _task(self, key: tuple[str, int], description: str, total: int) -> TaskID:
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, failed="")
        return self.tasks[key]

    def server_result(self, label: str, concurrency: int, total: int, result: RequestResult) -> None:
        key = (label, concurrency)
        task = self._task(key, f"{label} concurrency {concurrency}", total)
        self.failed[key] = self.failed.get(key, 0) + (not result.success)
        failed = f"[red]{self.failed[key]} failed[/red]" if self.failed[key] else ""
        self.progress.update(task, advance=1, failed=failed)

    def offline_batch(self, batch_size: int, done: int, total: int) -> None:
        task = self._task(("offline", batch_size), f"generate batch {batch_size}", total)
        self.progress.update(task, completed=done)


def _progress_bar() -> _ProgressBar:
    return _ProgressBar()


def _num(value: float | int | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"


def render(report: BenchReport, out: Console = console) -> None:
    """Print the throughput and latency tables, the ratios, and the warnings a reader must see."""
    for run in report.runs:
        out.print(_throughput_table(run))
        out.print(_latency_table(run))
        _warn(run, report.config.get("prompt_tokens"))
    if report.offline is not None:
        out.print(_offline_table(report.offline))
    ratios = report.ratios()
    if ratios:
        out.print(_ratio_table(ratios))
    if report.workers:
        out.print(_workers_table(report.workers))


def _throughput_table(run: EndpointRun) -> Table:
    table = Table(title=f"[{run.label}] {run.model} @ {run.url}: throughput", title_justify="left")
    for column in ("conc.", "ok", "failed", "time s", "req/s", "out tok/s", "total tok/s", "in len",
                   "out len min/mean/max"):
        table.add_column(column, justify="right")
    for lv in run.levels:
        lengths = "/".join(_num(n) for n in (lv.completion_tokens_min, lv.completion_tokens_mean,
                                             lv.completion_tokens_max))
        table.add_row(str(lv.concurrency), str(lv.completed), _failed(lv), _num(lv.duration_s, 2),
                      _num(lv.request_throughput, 2), _num(lv.output_throughput), _num(lv.total_token_throughput),
                      _num(lv.prompt_tokens_mean), lengths)
    return table


def _failed(lv: LevelSummary) -> str:
    text = f"[red]{lv.failed}[/red]" if lv.failed else "0"
    if lv.cancelled:
        text += f" (+{lv.cancelled} cancelled)"
    return text


def _latency_table(run: EndpointRun) -> Table:
    table = Table(title=f"[{run.label}] latency, ms", title_justify="left")
    for column in ("conc.", "metric", "mean", "median", "p95", "p99"):
        table.add_column(column, justify="right")
    for lv in run.levels:
        for i, (name, stats) in enumerate((("TTFT", lv.ttft_ms), ("TPOT", lv.tpot_ms), ("ITL", lv.itl_ms),
                                           ("E2E", lv.e2e_ms))):
            table.add_row(str(lv.concurrency) if i == 0 else "", name, _num(stats.mean), _num(stats.median),
                          _num(stats.p95), _num(stats.p99), end_section=i == 3)
    return table


def _offline_table(offline: OfflineRun) -> Table:
    table = Table(title=f"raw model.generate: {offline.model} ({offline.dtype}, {offline.device})",
                  title_justify="left")
    for column in ("batch", "requests", "duration s", "req/s", "output tok/s", "total tok/s", "batch latency ms"):
        table.add_column(column, justify="right")
    for lv in offline.levels:
        table.add_row(str(lv.batch_size), str(lv.requests), _num(lv.duration_s, 2), _num(lv.request_throughput, 2),
                      _num(lv.output_throughput), _num(lv.total_token_throughput), _num(lv.batch_latency_ms))
    return table


def _ratio_table(ratios: list[dict]) -> Table:
    first = ratios[0]
    base = "raw generate" if first["baseline"] == "offline" else first["baseline"]
    table = Table(title=f"ratios {first['candidate']} / {base}: above 1 means more throughput, or more latency",
                  title_justify="left")
    columns = [(name, key) for name, key in (
        ("output tok/s", "output_throughput"), ("req/s", "request_throughput"), ("TTFT p50", "ttft_ms_median"),
        ("TPOT p50", "tpot_ms_median"), ("ITL p50", "itl_ms_median"), ("E2E p50", "e2e_ms_median"),
    ) if any(row[key] is not None for row in ratios)]
    table.add_column("conc.", justify="right")
    for name, _ in columns:
        table.add_column(name, justify="right")
    for row in ratios:
        table.add_row(str(row["concurrency"]), *(_num(row[key], 2) + ("x" if row[key] is not None else "")
                                                 for _, key in columns))
    return table


def _workers_table(workers: list[dict]) -> Table:
    table = Table(title="replicas behind the router: measured requests (warm-up excluded)", title_justify="left")
    for column in ("replica", "requests", "share", "prefix-cache hit rate"):
        table.add_column(column, justify="left" if column == "replica" else "right")
    for w in workers:
        share = "-" if w["share"] is None else f"{w['share']:.0%}"
        rate = "-" if w["prefix_cache_hit_rate"] is None else f"{w['prefix_cache_hit_rate']:.1%}"
        table.add_row(w["url"], str(w["requests"]), share, rate)
    return table


def _warn(run: EndpointRun, prompt_words: int | None = None) -> None:
    for lv in run.levels:
        where = f"[{run.label}] concurrency {lv.concurrency}"
        mean = lv.prompt_tokens_mean
        if prompt_words and mean and mean > 2 * prompt_words + PROMPT_TEMPLATE_ALLOWANCE:
            err_console.print(f"[yellow]Note:[/yellow] {where}: prompts average {mean:,.0f} tokens (the server's "
                              f"usage), not about {prompt_words}: its tokenizer splits the built-in words into "
                              "several tokens each.", highlight=False)
        if lv.usage_source in ("chunks", "mixed"):
            err_console.print(f"[yellow]Note:[/yellow] {where}: the server sent no usage in some streams; their "
                              "completion tokens were counted as stream chunks (several tokens may share a chunk).")
        if lv.short_completions:
            err_console.print(f"[yellow]Note:[/yellow] {where}: {lv.short_completions} of {lv.completed} responses "
                              f"stopped before max_tokens (shortest {lv.completion_tokens_min}); throughput is not "
                              "comparable. The server may not honour ignore_eos: try --eos-bias --eos-token-id ID.")
        for message, count in lv.errors.items():
            err_console.print(f"[red]{where}: {count} failed:[/red] {message}", highlight=False)
        if lv.time_limited:
            err_console.print(f"[yellow]Note:[/yellow] {where} hit --time-limit; {lv.cancelled} requests cancelled.")
