"""What one benchmark request measured, and the summary of a concurrency level (vLLM's definitions)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class RequestResult:
    """What one streamed request did. Times are in seconds from the moment the request was sent."""

    success: bool = False
    error: str | None = None
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    latency: float | None = None
    prompt_tokens: int | None = None
    cached_tokens: int | None = None  # usage.prompt_tokens_details.cached_tokens, when the server sends it
    completion_tokens: int = 0
    usage_from_server: bool = False
    finish_reason: str | None = None
    text: str = ""  # the streamed content

    @property
    def counted_by(self) -> str:
        """Where completion_tokens comes from: the server's usage; finish_reason "length", which means
        exactly max_tokens; or, failing both, the content chunks (a chunk may hold several tokens)."""
        return "usage" if self.usage_from_server else "length" if self.finish_reason == "length" else "chunks"

    def stopped_early(self, max_tokens: int) -> bool:
        """Whether the response ended before max_tokens (end-of-sequence), so it is not full length."""
        if self.finish_reason == "stop":
            return True
        return self.finish_reason != "length" and self.completion_tokens < max_tokens


@dataclass(frozen=True)
class Stats:
    """Mean, median, 95th and 99th percentile of one latency metric, in milliseconds (None: no data)."""

    mean: float | None = None
    median: float | None = None
    p95: float | None = None
    p99: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Stats:
        if not seconds:
            return cls()
        ms = sorted(s * 1000.0 for s in seconds)
        return cls(sum(ms) / len(ms), percentile(ms, 50), percentile(ms, 95), percentile(ms, 99))


def percentile(sorted_values: Sequence[float], p: float) -> float:
    """Linear interpolation between closest ranks (numpy's default), on already sorted values."""
    rank = (len(sorted_values) - 1) * p / 100.0
    low = int(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


@dataclass(frozen=True)
class LevelSummary:
    """The summary of one concurrency level against one endpoint."""

    concurrency: int
    requests: int
    completed: int
    failed: int
    cancelled: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    prompt_tokens: int
    prompt_tokens_mean: float | None
    completion_tokens: int
    completion_tokens_min: int | None
    completion_tokens_mean: float | None
    completion_tokens_max: int | None
    max_tokens: int | None
    short_completions: int
    usage_source: str | None
    ttft_ms: Stats
    tpot_ms: Stats
    itl_ms: Stats
    e2e_ms: Stats
    errors: dict[str, int]
    time_limited: bool = False


def summarize(results: Sequence[RequestResult], duration: float, *, concurrency: int = 0,
              max_tokens: int | None = None, cancelled: int = 0, time_limited: bool = False) -> LevelSummary:
    """Summarize one level, with the definitions of vLLM's serving benchmark.

    Only successful requests count towards tokens and latencies; prompt tokens are known only from
    the server's usage. A response stopped early if its finish_reason is "stop", or if it has neither
    finish_reason "length" nor max_tokens tokens. TPOT of a request is
    (latency - TTFT) / (completion tokens - 1), for requests with more than one token; ITL pools
    every gap between content chunks of every request.
    """
    ok = [r for r in results if r.success]
    lengths = [r.completion_tokens for r in ok]
    out_tokens = sum(lengths)
    known_prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    in_tokens = sum(known_prompts)
    per_second = (lambda n: n / duration) if duration > 0 else (lambda n: 0.0)
    tpots = [(r.latency - r.ttft) / (r.completion_tokens - 1) for r in ok
             if r.completion_tokens > 1 and r.ttft is not None and r.latency is not None]
    counted = {r.counted_by for r in ok}
    usage_source = (None if not ok else "server" if counted == {"usage"}
                    else "chunks" if counted == {"chunks"} else "mixed" if "chunks" in counted else "length")
    errors = Counter(r.error or "unknown error" for r in results if not r.success)
    return LevelSummary(
        concurrency=concurrency,
        requests=len(results) + cancelled,
        completed=len(ok),
        failed=len(results) - len(ok),
        cancelled=cancelled,
        duration_s=duration,
        request_throughput=per_second(len(ok)),
        output_throughput=per_second(out_tokens),
        total_token_throughput=per_second(out_tokens + in_tokens),
        prompt_tokens=in_tokens,
        prompt_tokens_mean=in_tokens / len(known_prompts) if known_prompts else None,
        completion_tokens=out_tokens,
        completion_tokens_min=min(lengths) if lengths else None,
        completion_tokens_mean=out_tokens / len(lengths) if lengths else None,
        completion_tokens_max=max(lengths) if lengths else None,
        max_tokens=max_tokens,
        short_completions=sum(r.stopped_early(max_tokens) for r in ok) if max_tokens else 0,
        usage_source=usage_source,
        ttft_ms=Stats.of([r.ttft for r in ok if r.ttft is not None]),
        tpot_ms=Stats.of(tpots),
        itl_ms=Stats.of([gap for r in ok for gap in r.itl]),
        e2e_ms=Stats.of([r.latency for r in ok if r.latency is not None]),
        errors=dict(errors.most_common(5)),
        time_limited=time_limited,
    )
