"""Service metrics, recorded once and shown two ways: the documented JSON and Prometheus text.

Prometheus names carry the `llmctl_` prefix and their unit, as Prometheus' conventions ask.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from llmctl.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.5, 1.0, 2.5)
TOKEN_BUCKETS = (1, 8, 32, 128, 512, 1024, 2048, 4096, 8192, 16384)
API_ROUTES = ("/tokenize", "/detokenize")  # API routes outside /v1/


def _summary(values: deque) -> dict:
    data = sorted(values)
    if not data:
        return {"count": 0, "mean": None, "p50": None, "p95": None, "p99": None}
    pick = lambda q: data[min(len(data) - 1, int(q * len(data)))]  # noqa: E731
    return {"count": len(data), "mean": statistics.fmean(data), "p50": pick(0.5), "p95": pick(0.95),
            "p99": pick(0.99)}


class ServiceMetrics:
    """Counters and latency samples of one service instance."""

    def __init__(self, window: int = 1000) -> None:
        self.started = time.time()
        self._lock = threading.Lock()
        self.requests: dict[str, int] = {}  # API requests (/v1/..., /tokenize, /detokenize) by HTTP status
        self.routes: dict[str, int] = {}  # the same requests by route
        self.finished: dict[str, int] = {}  # generations by how they ended
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.latency: deque[float] = deque(maxlen=window)
        self.ttft: deque[float] = deque(maxlen=window)
        self.itl: deque[float] = deque(maxlen=window)
        self.tps: deque[float] = deque(maxlen=window)
        self.registry = CollectorRegistry()
        r = self.registry
        self.p_requests = Counter("llmctl_requests", "HTTP requests by route and status.", ["route", "status"],
                                  registry=r)
        self.p_finished = Counter("llmctl_request_finished", "Generations by how they ended: stop, length, "
                                  "timeout, cancelled (client gone) or error.", ["reason"], registry=r)
        self.p_prompt = Counter("llmctl_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.p_generation = Counter("llmctl_generation_tokens", "Tokens generated.", registry=r)
        self.p_e2e = Histogram("llmctl_e2e_request_latency_seconds", "Request latency, arrival to last token.",
                               buckets=LATENCY_BUCKETS, registry=r)
        self.p_ttft = Histogram("llmctl_time_to_first_token_seconds", "Arrival to first token.",
                                buckets=LATENCY_BUCKETS, registry=r)
        self.p_itl = Histogram("llmctl_inter_token_latency_seconds", "Mean gap between tokens of a request.",
                               buckets=ITL_BUCKETS, registry=r)
        self.p_queue = Histogram("llmctl_queue_time_seconds", "Arrival to admission into the running batch.",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.p_prompt_hist = Histogram("llmctl_request_prompt_tokens", "Prompt tokens per request.",
                                       buckets=TOKEN_BUCKETS, registry=r)
        self.p_gen_hist = Histogram("llmctl_request_generation_tokens", "Generated tokens per request.",
                                    buckets=TOKEN_BUCKETS, registry=r)
        self.g_running = Gauge("llmctl_num_requests_running", "Sequences in the running batch.", registry=r)
        self.g_waiting = Gauge("llmctl_num_requests_waiting", "Sequences waiting for a batch slot.", registry=r)
        self.g_gpu_alloc = Gauge("llmctl_gpu_memory_allocated_bytes", "GPU memory allocated by PyTorch.",
                                 registry=r)
        self.g_gpu_reserved = Gauge("llmctl_gpu_memory_reserved_bytes", "GPU memory reserved by PyTorch.",
                                    registry=r)
        self.g_cpu_threads = Gauge("llmctl_cpu_threads", "Torch's intra-op compute threads (--cpu-threads).",
                                   registry=r)
        self.g_rss = Gauge("llmctl_process_resident_memory_bytes", "Resident memory of the service.", registry=r)
        self.g_kv_usage = Gauge("llmctl_kv_cache_usage_ratio", "Share of the KV cache in use (0..1), where the "
                                "engine reports it.", registry=r)
        self.p_prefix_queries = Counter("llmctl_prefix_cache_queries", "Prompt tokens looked up in the prefix "
                                        "cache.", registry=r)
        self.p_prefix_hits = Counter("llmctl_prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                                     registry=r)
        self._prefix_seen = (0, 0)

    def observe_prefix_cache(self, queries: int, hits: int) -> None:
        """Advance the Prometheus counters to the engine's running totals."""
        with self._lock:
            seen_queries, seen_hits = self._prefix_seen
            self._prefix_seen = (max(queries, seen_queries), max(hits, seen_hits))
        self.p_prefix_queries.inc(max(0, queries - seen_queries))
        self.p_prefix_hits.inc(max(0, hits - seen_hits))

    def watch_engine(self, engine: Callable[[], Engine | None]) -> None:
        """Export the engine's own counters (``engine()``'s stats, read at each scrape) with the rest."""
        self.registry.register(_EngineCollector(engine))

    def count_request(self, route: str, status: int) -> None:
        """Count a request; the JSON counters keep to the API, Prometheus labels every route."""
        key = str(status)
        if route.startswith("/v1/") or route in API_ROUTES:
            with self._lock:
                self.requests[key] = self.requests.get(key, 0) + 1
                self.routes[route] = self.routes.get(route, 0) + 1
        self.p_requests.labels(route, key).inc()

    def record_generation(self, prompt_tokens: int, completion_tokens: int, latency: float,
                          ttft: float | None, itl: float | None, queue_time: float | None,
                          finish_reason: str = "stop") -> None:
        """One generation that ended, however it ended (a stream answered 200 may still time out or fail)."""
        with self._lock:
            self.finished[finish_reason] = self.finished.get(finish_reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            self.latency.append(latency)
            if ttft is not None:
                self.ttft.append(ttft)
            if itl is not None:
                self.itl.append(itl)
            if completion_tokens and latency > 0:
                self.tps.append(completion_tokens / latency)
        self.p_finished.labels(finish_reason).inc()
        self.p_prompt.inc(prompt_tokens)
        self.p_generation.inc(completion_tokens)
        self.p_prompt_hist.observe(prompt_tokens)
        self.p_gen_hist.observe(completion_tokens)
        self.p_e2e.observe(latency)
        if ttft is not None:
            self.p_ttft.observe(ttft)
        if itl is not None:
            self.p_itl.observe(itl)
        if queue_time is not None:
            self.p_queue.observe(queue_time)

    def snapshot(self) -> dict:
        with self._lock:
            total = sum(self.requests.values())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests_total": total,
                "requests_by_status": dict(sorted(self.requests.items())),
                "requests_by_route": dict(sorted(self.routes.items())),
                "requests_failed": sum(n for s, n in self.requests.items() if not s.startswith("2")),
                "finish_reasons": dict(sorted(self.finished.items())),
                "prompt_tokens_total": self.prompt_tokens,
                "completion_tokens_total": self.completion_tokens,
                "latency_s": _summary(self.latency),
                "time_to_first_token_s": _summary(self.ttft),
                "inter_token_latency_s": _summary(self.itl),
                "tokens_per_second_per_request": _summary(self.tps),
            }


def prefix_cache_json(engine: Engine | None) -> dict:
    """/metrics' ``prefix_cache`` object, from any engine's stats (all zero for an engine without one)."""
    stats = engine.stats if engine else None
    queries, hits = (stats.prefix_cache_queries, stats.prefix_cache_hits) if stats else (0, 0)
    return {
        "capacity_tokens": engine.config.prefix_cache_tokens if engine else 0,
        "size_tokens": stats.prefix_cache_tokens if stats else 0,
        "queries_tokens_total": queries,
        "hits_tokens_total": hits,
        "hit_rate": round(hits / queries, 4) if queries else None,
    }


class _EngineCollector(Collector):
    """The engine's counters as Prometheus metrics, read from its stats when /metrics is scraped."""

    def __init__(self, engine: Callable[[], Engine | None]) -> None:
        self.engine = engine

    def collect(self) -> Iterator:
        engine = self.engine()
        stats = engine.stats if engine else None
        yield GaugeMetricFamily("llmctl_prefix_cache_tokens", "Tokens the prefix cache holds.",
                                value=stats.prefix_cache_tokens if stats else 0)
