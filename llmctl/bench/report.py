"""The outputs of `llmctl bench`: the JSON report (schema in docs/bench.md), CSV rows, ratios and the plot."""

from __future__ import annotations

import csv
import dataclasses
import io
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from llmctl import __version__
from llmctl.bench.loadgen import EndpointRun
from llmctl.bench.offline import OfflineRun
from llmctl.bench.prompts import BenchError
from llmctl.bench.stats import LevelSummary

SCHEMA_VERSION = 1
METRICS = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")
STATS = ("mean", "median", "p95", "p99")
RATIO_KEYS = ("output_throughput", "request_throughput", "ttft_ms_median", "tpot_ms_median", "itl_ms_median",
              "e2e_ms_median")
CSV_COLUMNS = (
    "kind", "label", "url", "model", "concurrency", "requests", "completed", "failed", "cancelled", "duration_s",
    "request_throughput", "output_throughput", "total_token_throughput", "prompt_tokens", "prompt_tokens_mean",
    "completion_tokens", "completion_tokens_min", "completion_tokens_mean", "completion_tokens_max", "max_tokens",
    "short_completions", "usage_source", *(f"{m}_{s}" for m in METRICS for s in STATS), "batch_latency_ms",
    "time_limited",
)


@dataclass
class BenchReport:
    """Everything one `llmctl bench` invocation measured."""

    config: dict
    runs: list[EndpointRun]
    offline: OfflineRun | None = None
    interrupted: bool = False
    workers: list[dict] | None = None  # per replica behind a router (--worker-url): llmctl.bench.workers
    created: str = dataclasses.field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z"))

    def ratios(self) -> list[dict]:
        """Per level, candidate / baseline: B / A with --compare, server / raw generate with --offline."""
        if len(self.runs) >= 2:
            base, cand = flat_levels(self.runs[0]), flat_levels(self.runs[1])
            names = (self.runs[0].label, self.runs[1].label)
        elif self.offline is not None and self.runs:
            base = {lv.batch_size: _flat_offline(lv) for lv in self.offline.levels}
            cand, names = flat_levels(self.runs[0]), ("offline", self.runs[0].label)
        else:
            return []
        rows = []
        for concurrency in sorted(base.keys() & cand.keys()):
            row: dict = {"concurrency": concurrency, "baseline": names[0], "candidate": names[1]}
            for key in RATIO_KEYS:
                row[key] = _ratio(cand[concurrency].get(key), base[concurrency].get(key))
            rows.append(row)
        return rows

    def to_dict(self) -> dict:
        return _rounded({
            "schema_version": SCHEMA_VERSION,
            "llmctl_version": __version__,
            "created": self.created,
            "interrupted": self.interrupted,
            "config": self.config,
            "runs": [{"label": r.label, "url": r.url, "model": r.model,
                      "levels": [dataclasses.asdict(lv) for lv in r.levels]} for r in self.runs],
            "offline": dataclasses.asdict(self.offline) if self.offline else None,
            "ratios": self.ratios(),
            "workers": self.workers,
        })

    def csv_rows(self) -> list[dict]:
        rows = [{"kind": "server", "label": r.label, "url": r.url, "model": r.model, **flat_level(lv)}
                for r in self.runs for lv in r.levels]
        if self.offline is not None:
            rows += [{"kind": "offline", "label": "offline", "url": "", "model": self.offline.model,
                      **_flat_offline(lv)} for lv in self.offline.levels]
        return [_rounded(row) for row in rows]

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(self.csv_rows())
        return buffer.getvalue()


def flat_level(level: LevelSummary) -> dict:
    """A level as one flat dict: ttft_ms becomes ttft_ms_mean, ttft_ms_median, ..."""
    row = {k: v for k, v in dataclasses.asdict(level).items() if k not in METRICS and k != "errors"}
    for metric in METRICS:
        for stat in STATS:
            row[f"{metric}_{stat}"] = getattr(getattr(level, metric), stat)
    return row


def flat_levels(run: EndpointRun) -> dict[int, dict]:
    return {lv.concurrency: flat_level(lv) for lv in run.levels}


def _flat_offline(level) -> dict:
    row = dataclasses.asdict(level)
    row["concurrency"] = row.pop("batch_size")
    return row


def _ratio(candidate: float | None, baseline: float | None) -> float | None:
    if candidate is None or not baseline:
        return None
    return candidate / baseline


def _rounded(value):
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


# ---- plot --------------------------------------------------------------------------------------
def check_plot_available() -> None:
    """Fail before a long run, not after it, when matplotlib is missing."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise BenchError("--plot needs matplotlib: pip install 'llmctl[plot]'.")


def write_plot(report: BenchReport, path: Path) -> None:
    """Output throughput, TTFT and TPOT against concurrency, one line per endpoint (offline dashed)."""
    check_plot_available()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_ttft, ax_tpot) = plt.subplots(1, 3, figsize=(15, 4.5))
    levels: set[int] = set()
    for run in report.runs:
        xs = [lv.concurrency for lv in run.levels]
        levels.update(xs)
        name = f"{run.label}: {run.model or run.url}"
        ax_tp.plot(xs, [lv.output_throughput for lv in run.levels], marker="o", label=name)
        for ax, metric in ((ax_ttft, "ttft_ms"), (ax_tpot, "tpot_ms")):
            line, = ax.plot(xs, [getattr(lv, metric).median for lv in run.levels], marker="o", label=f"{name} p50")
            ax.plot(xs, [getattr(lv, metric).p99 for lv in run.levels], marker=".", linestyle=":",
                    color=line.get_color(), label=f"{name} p99")
    if report.offline is not None:
        xs = [lv.batch_size for lv in report.offline.levels]
        levels.update(xs)
        ax_tp.plot(xs, [lv.output_throughput for lv in report.offline.levels], marker="s", linestyle="--",
                   label=f"raw generate: {report.offline.model}")
    titles = (("Output throughput", "tokens/s"), ("Time to first token", "ms"), ("Time per output token", "ms"))
    for ax, (title, unit) in zip((ax_tp, ax_ttft, ax_tpot), titles, strict=False):
        ax.set_title(title)
        ax.set_xlabel("concurrency (offline: batch size)" if ax is ax_tp else "concurrency")
        ax.set_ylabel(unit)
        if levels:
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
        ax.grid(True, alpha=0.3)
        if ax.get_lines():
            ax.legend(fontsize="small")
    fig.suptitle(f"llmctl bench, max_tokens={report.config.get('max_tokens')}, "
                 f"prompt={report.config.get('prompts_file') or str(report.config.get('prompt_tokens')) + ' tokens'}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
