"""`llmctl bench --worker-url`: each replica's share of the measured requests, from its /metrics."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from llmctl.bench.workers import WorkerCounts, worker_shares
from llmctl.cli.app import app

runner = CliRunner()


def bench(*args: str):
    return runner.invoke(app, ["bench", "--requests", "4", "--max-tokens", "4", "--prompt-tokens", "6",
                               "--warmup", "2", "--concurrency", "2", *args])


def test_a_replica_measured_alone_has_every_measured_request(base_url):
    """The warm-up (2 requests) is left out: the replica's share is the 4 measured requests."""
    result = bench("--url", base_url, "--worker-url", base_url + "/", "--json")
    assert result.exit_code == 0, result.output
    (worker,) = json.loads(result.stdout)["workers"]
    assert worker["url"] == base_url and worker["requests"] == 4 and worker["share"] == 1.0
    assert worker["prefix_cache_hit_rate"] is None or 0 <= worker["prefix_cache_hit_rate"] <= 1
    table = bench("--url", base_url, "--worker-url", base_url)
    assert table.exit_code == 0, table.output
    assert "replicas behind the router" in table.stdout and "100%" in table.stdout


def test_shares_are_the_differences_over_the_run():
    before = [WorkerCounts("http://a", 10, 100, 50), WorkerCounts("http://b", 5, 0, 0),
              WorkerCounts("http://c", 0, 0, 0)]
    after = [WorkerCounts("http://a", 13, 200, 140), WorkerCounts("http://b", 6, 50, 0),
             WorkerCounts("http://c", 0, 0, 0)]
    assert worker_shares(before, after) == [
        {"url": "http://a", "requests": 3, "share": 0.75, "prefix_cache_hit_rate": 0.9},
        {"url": "http://b", "requests": 1, "share": 0.25, "prefix_cache_hit_rate": 0.0},
        {"url": "http://c", "requests": 0, "share": 0.0, "prefix_cache_hit_rate": None},
    ]
    idle = [WorkerCounts("http://a", 1, 0, 0)]
    assert worker_shares(idle, idle) == [{"url": "http://a", "requests": 0, "share": None,
                                          "prefix_cache_hit_rate": None}]


def test_unreadable_replicas_and_misuse_are_one_clear_error(base_url):
    gone = bench("--url", base_url, "--worker-url", "http://127.0.0.1:9")
    assert gone.exit_code == 1 and "--worker-url http://127.0.0.1:9" in gone.output
    assert "Traceback" not in gone.output
    both = bench("--url", base_url, "--compare", base_url, "--worker-url", base_url)
    assert both.exit_code == 1 and "--compare" in both.output
