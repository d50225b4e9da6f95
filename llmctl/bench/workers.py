"""Per-replica share of a benchmark run behind a router, read from each llmctl replica's /metrics."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.bench.prompts import BenchError
from llmctl.client.probe import get_metrics
from llmctl.errors import LLMCtlError

CHAT_ROUTE = "/v1/chat/completions"


@dataclass(frozen=True)
class WorkerCounts:
    """One replica's running totals at one moment."""

    url: str
    requests: int  # chat completions answered, any status
    prefix_queries: int  # prompt tokens looked up in its prefix cache
    prefix_hits: int  # of those, tokens found


def read_counts(urls: list[str], api_key: str | None) -> list[WorkerCounts]:
    """Each replica's totals now; a replica that cannot be read is a BenchError naming it."""
    counts = []
    for url in urls:
        try:
            body = get_metrics(url, api_key=api_key)
            cache = body.get("prefix_cache") or {}
            counts.append(WorkerCounts(url, int(body["requests_by_route"].get(CHAT_ROUTE, 0)),
                                       int(cache.get("queries_tokens_total", 0)),
                                       int(cache.get("hits_tokens_total", 0))))
        except LLMCtlError as exc:
            raise BenchError(f"--worker-url {url}: {exc.message}") from None
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BenchError(f"--worker-url {url}: its /metrics is not an llmctl replica's "
                             "(no requests_by_route).") from None
    return counts


def worker_shares(before: list[WorkerCounts], after: list[WorkerCounts]) -> list[dict]:
    """Per replica: the run's chat requests, their share of all replicas' and its prefix-cache hit rate."""
    deltas = [(b.url, a.requests - b.requests, a.prefix_queries - b.prefix_queries, a.prefix_hits - b.prefix_hits)
              for b, a in zip(before, after, strict=False)]
    total = sum(requests for _, requests, _, _ in deltas)
    return [{"url": url, "requests": requests, "share": requests / total if total else None,
             "prefix_cache_hit_rate": hits / queries if queries else None}
            for url, requests, queries, hits in deltas]
