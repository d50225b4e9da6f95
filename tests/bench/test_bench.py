"""`llmctl bench`: the metrics on hand-made timings, and real runs against tiny llmctl services on 127.0.0.1."""

from __future__ import annotations

import csv
import io
import json
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from flask import Flask, Response, request
from typer.testing import CliRunner

from llmctl.bench.loadgen import BenchPlan, Endpoint, Workload, run_benchmark
from llmctl.bench.prompts import BenchError, builtin_prompts, load_prompts
from llmctl.bench.report import CSV_COLUMNS, BenchReport
from llmctl.bench.stats import RequestResult, percentile, summarize
from llmctl.cli.app import app
from llmctl.server.testing import free_port, serve_in_thread
from tests.conftest import make_service

DOCS = Path(__file__).resolve().parents[2] / "docs" / "bench.md"
TOP_KEYS = {"schema_version", "llmctl_version", "created", "interrupted", "config", "runs", "offline", "ratios",
            "workers"}
LEVEL_KEYS = {
    "concurrency", "requests", "completed", "failed", "cancelled", "duration_s", "request_throughput",
    "output_throughput", "total_token_throughput", "prompt_tokens", "prompt_tokens_mean", "completion_tokens",
    "completion_tokens_min", "completion_tokens_mean", "completion_tokens_max", "max_tokens", "short_completions",
    "usage_source", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "errors", "time_limited",
}
STAT_KEYS = {"mean", "median", "p95", "p99"}
OFFLINE_LEVEL_KEYS = {"batch_size", "requests", "batches", "duration_s", "request_throughput", "output_throughput",
                      "total_token_throughput", "prompt_tokens", "completion_tokens", "batch_latency_ms"}
RATIO_KEYS = {"concurrency", "baseline", "candidate", "output_throughput", "request_throughput", "ttft_ms_median",
              "tpot_ms_median", "itl_ms_median", "e2e_ms_median"}

runner = CliRunner()


def bench(*args: str):
    return runner.invoke(app, ["bench", *args])


def small(url: str, *extra: str) -> list[str]:
    return ["--url", url, "--requests", "4", "--max-tokens", "6", "--prompt-tokens", "6", "--warmup", "1", *extra]


# ---- the metrics, on hand-made timings -------------------------------------------------------
def done(ttft: float, gaps: list[float], tokens: int, prompt: int | None = 10, usage: bool = True) -> RequestResult:
    return RequestResult(success=True, ttft=ttft, itl=gaps, latency=ttft + sum(gaps), prompt_tokens=prompt,
                         completion_tokens=tokens, usage_from_server=usage)


def test_summarize_uses_vllm_definitions():
    results = [
        done(0.1, [0.02, 0.02, 0.02], tokens=4, prompt=10),
        done(0.3, [0.05], tokens=2, prompt=None, usage=False),  # counted from chunks, stopped early
        RequestResult(error="HTTP 500: boom"),
    ]
    s = summarize(results, 2.0, concurrency=2, max_tokens=4)
    assert (s.concurrency, s.requests, s.completed, s.failed, s.cancelled) == (2, 3, 2, 1, 0)
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(3.0)  # (4 + 2) tokens / 2 s
    assert s.total_token_throughput == pytest.approx(8.0)  # only the prompt the server reported counts
    assert s.prompt_tokens == 10 and s.prompt_tokens_mean == 10
    assert (s.completion_tokens_min, s.completion_tokens_mean, s.completion_tokens_max) == (2, 3.0, 4)
    assert s.short_completions == 1 and s.usage_source == "mixed"
    assert s.errors == {"HTTP 500: boom": 1}
    assert (s.ttft_ms.mean, s.ttft_ms.median, s.ttft_ms.p95, s.ttft_ms.p99) == pytest.approx((200, 200, 290, 298))
    # TPOT per request: (latency - ttft) / (tokens - 1) = 60 / 3 = 20 ms and 50 / 1 = 50 ms.
    assert (s.tpot_ms.mean, s.tpot_ms.median) == pytest.approx((35, 35))
    # ITL pools every gap of every request: 20, 20, 20, 50 ms.
    assert (s.itl_ms.mean, s.itl_ms.median, s.itl_ms.p95, s.itl_ms.p99) == pytest.approx((27.5, 20, 45.5, 49.1))
    assert (s.e2e_ms.mean, s.e2e_ms.median, s.e2e_ms.p99) == pytest.approx((255, 255, 348.1))


def test_tpot_skips_single_token_responses():
    s = summarize([done(0.1, [], tokens=1), done(0.1, [0.01, 0.01], tokens=3)], 1.0)
    assert s.tpot_ms.mean == pytest.approx(10) and s.ttft_ms.mean == pytest.approx(100)


def test_summarize_nothing_succeeded():
    s = summarize([RequestResult(error="x"), RequestResult(error="x")], 0.0, cancelled=3)
    assert (s.completed, s.failed, s.cancelled, s.requests) == (0, 2, 3, 5)
    assert s.output_throughput == 0 and s.request_throughput == 0
    assert s.ttft_ms.median is None and s.e2e_ms.p99 is None and s.usage_source is None
    assert s.completion_tokens_min is None and s.errors == {"x": 2}


def test_percentile_matches_numpy():
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    for n in (1, 2, 7, 100):
        values = sorted(rng.random() for _ in range(n))
        for p in (50, 95, 99):
            assert percentile(values, p) == pytest.approx(float(np.percentile(values, p)))


# ---- prompts and request bodies ------------------------------------------------------------------
def test_builtin_prompts_are_seeded_and_distinct():
    a, b = list(builtin_prompts(8, 32, seed=0)), list(builtin_prompts(8, 32, seed=0))
    assert a == b and a != list(builtin_prompts(8, 32, seed=1))
    texts = [p[0]["content"] for p in a]
    assert len(set(texts)) == 8 and all(len(t.split()) == 32 for t in texts)
    # Prompt i does not depend on how many are asked for; the warm-up set continues the sequence.
    huge = builtin_prompts(10**9, 32, seed=0)
    assert huge[3] == a[3] and huge[-1] == huge[10**9 - 1] and builtin_prompts(2, 32, offset=6)[:] == a[6:]
    with pytest.raises(IndexError):
        builtin_prompts(8, 32)[8]


def test_builtin_prompts_with_a_shared_prefix_start_with_the_same_system_message():
    prompts = list(builtin_prompts(4, 8, seed=0, shared_prefix_tokens=50))
    systems = {p[0]["content"] for p in prompts}
    assert len(systems) == 1 and len(systems.pop().split()) == 50 and {p[0]["role"] for p in prompts} == {"system"}
    assert [p[1] for p in prompts] == [p[0] for p in builtin_prompts(4, 8, seed=0)]  # the questions are unchanged
    assert builtin_prompts(2, 8, seed=0, offset=4, shared_prefix_tokens=50)[0][0] == prompts[0][0]


def test_shared_prefix_reaches_the_servers_prefix_cache(base_url):
    """With --shared-prefix-tokens the server finds every measured request's system message cached."""
    import httpx

    before = httpx.get(base_url + "/metrics").json()["prefix_cache"]["hits_tokens_total"]
    result = bench(*small(base_url, "--concurrency", "2", "--shared-prefix-tokens", "20", "--seed", "42", "--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config"]["shared_prefix_tokens"] == 20
    hits = httpx.get(base_url + "/metrics").json()["prefix_cache"]["hits_tokens_total"] - before
    assert hits >= 4 * 16  # a block or more for each of the 4 measured requests (the warm-up computed it)


def test_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "yo"}]}\n')
    assert load_prompts(path) == [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "yo"}]]
    path.write_text('{"prompt": "hi"}\n{"text": 1}\n')
    with pytest.raises(BenchError, match=r"p\.jsonl:2 needs"):
        load_prompts(path)
    path.write_text("not json\n")
    with pytest.raises(BenchError, match=r"p\.jsonl:1 is not valid JSON"):
        load_prompts(path)


def test_fixed_length_fields():
    body = Workload([], max_tokens=5, eos_bias_ids=(2, 7)).body("m", [{"role": "user", "content": "x"}])
    assert body["ignore_eos"] is True and body["logit_bias"] == {"2": -100, "7": -100}
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True} and body["max_tokens"] == 5
    assert "ignore_eos" not in Workload([], ignore_eos=False).body(None, [])


# ---- real runs against llmctl ------------------------------------------------------------------
def test_two_levels_all_fields(base_url, tmp_path):
    out_csv, png, out_json = tmp_path / "b.csv", tmp_path / "b.png", tmp_path / "b.json"
    result = bench(*small(base_url, "--concurrency", "1,2", "--json", "--csv", str(out_csv), "--plot", str(png),
                          "-o", str(out_json)))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == TOP_KEYS and report["schema_version"] == 1 and report["interrupted"] is False
    assert json.loads(out_json.read_text()) == report
    (run,) = report["runs"]
    assert run["model"] == "tiny-llama" and [lv["concurrency"] for lv in run["levels"]] == [1, 2]
    for lv in run["levels"]:
        assert set(lv) == LEVEL_KEYS
        assert (lv["completed"], lv["failed"], lv["cancelled"]) == (4, 0, 0)
        assert lv["completion_tokens_min"] == lv["completion_tokens_max"] == 6  # ignore_eos: fixed length
        assert lv["short_completions"] == 0 and lv["usage_source"] == "server" and lv["prompt_tokens_mean"] > 6
        assert lv["duration_s"] > 0 and lv["output_throughput"] > 0 and lv["total_token_throughput"] > 0
        for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert set(lv[metric]) == STAT_KEYS and all(v > 0 for v in lv[metric].values()), metric
        assert lv["ttft_ms"]["median"] < lv["e2e_ms"]["median"]
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert tuple(rows[0]) == CSV_COLUMNS and [r["concurrency"] for r in rows] == ["1", "2"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_table_output(base_url):
    result = bench(*small(base_url, "--concurrency", "2"))
    assert result.exit_code == 0, result.output
    for text in ("tiny-llama", "throughput", "latency", "TTFT", "TPOT", "ITL", "E2E", "6/6.0/6"):
        assert text in result.stdout


def test_compare_two_services(base_url, tiny_model):
    second = make_service(tiny_model)
    try:
        with serve_in_thread(second) as url2:
            result = bench(*small(base_url, "--concurrency", "1,2", "--compare", url2 + "/v1", "--json"))
            table = bench(*small(base_url, "--concurrency", "1", "--compare", url2))
    finally:
        second.shutdown()
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["label"] for r in report["runs"]] == ["A", "B"] and report["runs"][1]["url"] == url2
    assert all(lv["completed"] == 4 for r in report["runs"] for lv in r["levels"])
    assert [r["concurrency"] for r in report["ratios"]] == [1, 2]
    for row in report["ratios"]:
        assert set(row) == RATIO_KEYS and (row["baseline"], row["candidate"]) == ("A", "B")
        assert all(row[k] > 0 for k in RATIO_KEYS - {"concurrency", "baseline", "candidate"})
    assert table.exit_code == 0 and "ratios B / A" in table.stdout


def test_offline_baseline_against_server(base_url, tiny_model):
    result = bench(*small(base_url, "--concurrency", "1,2", "--json", "--offline", "--model-path", str(tiny_model),
                          "--dtype", "float32", "--device", "cpu"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    offline = report["offline"]
    assert offline["model"] == "tiny-llama" and [lv["batch_size"] for lv in offline["levels"]] == [1, 2]
    for lv in offline["levels"]:
        assert set(lv) == OFFLINE_LEVEL_KEYS
        assert lv["completion_tokens"] == lv["requests"] * 6 and lv["output_throughput"] > 0
    assert [(r["baseline"], r["candidate"]) for r in report["ratios"]] == [("offline", "A")] * 2
    assert all(r["output_throughput"] > 0 and r["ttft_ms_median"] is None for r in report["ratios"])


def test_failed_requests_are_counted_with_their_error(base_url):
    # The tiny model's context is 256 tokens, so max_tokens 1000 is refused with a 400.
    result = bench("--url", base_url, "--concurrency", "2", "--requests", "3", "--max-tokens", "1000",
                   "--warmup", "0", "--json")
    assert result.exit_code == 1
    (lv,) = json.loads(result.stdout)["runs"][0]["levels"]
    assert (lv["completed"], lv["failed"]) == (0, 3)
    assert sum(lv["errors"].values()) == 3
    assert all(m.startswith("HTTP 400: This model's maximum context length") for m in lv["errors"])
    assert "Every request failed" in result.stderr


def test_warmup_failure_is_one_clean_error(base_url):
    result = bench("--url", base_url, "--model", "no-such-model", "--concurrency", "1")
    assert result.exit_code == 1
    assert "warm-up" in result.stderr and "no-such-model" in result.stderr and "Traceback" not in result.output


def test_unreachable_server():
    result = bench("--url", f"http://127.0.0.1:{free_port()}", "--concurrency", "1")
    assert result.exit_code == 1 and "Cannot reach" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["--concurrency", "1,x"], "--concurrency takes"),
    (["--concurrency", "0"], "positive integers"),
    (["--eos-bias"], "--eos-token-id"),
    (["--compare", "http://127.0.0.1:1", "--offline"], "not both"),
    (["--prompts", "p.jsonl", "--shared-prefix-tokens", "8"], "--shared-prefix-tokens shapes"),
])
def test_bad_flags(args, message):
    result = bench("--url", "http://127.0.0.1:1", *args)
    assert result.exit_code == 1 and message in result.stderr


def test_time_limit_cuts_a_level(base_url):
    result = bench("--url", base_url, "--concurrency", "2", "--requests", "400", "--max-tokens", "32",
                   "--prompt-tokens", "6", "--warmup", "0", "--time-limit", "0.3", "--json")
    assert result.exit_code == 0, result.output
    (lv,) = json.loads(result.stdout)["runs"][0]["levels"]
    assert lv["time_limited"] is True and lv["cancelled"] > 0 and lv["completed"] + lv["cancelled"] == 400
    assert lv["duration_s"] < 5


def test_interrupt_keeps_what_finished(base_url):
    seen = []

    def progress(label, concurrency, total, result):
        seen.append(result)
        if len(seen) == 3:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C in the middle of a level

    plan = BenchPlan([Endpoint(base_url)], Workload(builtin_prompts(8, 6), max_tokens=6), [2, 4], requests=50,
                     warmup=0)
    runs, interrupted = run_benchmark(plan, progress)
    assert interrupted
    (lv,) = runs[0].levels
    # The other stream may finish in the same event-loop turn as the signal; nothing in flight is a failure.
    assert lv.concurrency == 2 and lv.completed in (3, 4) and lv.failed == 0
    assert lv.completed + lv.cancelled == 50 and lv.duration_s > 0


def test_ctrl_c_prints_what_finished(base_url, tiny_service):
    before = tiny_service.metrics.snapshot()["completion_tokens_total"]
    proc = subprocess.Popen([sys.executable, "-m", "llmctl", "bench", "--url", base_url, "--concurrency", "2",
                             "--requests", "100000", "--max-tokens", "4", "--prompt-tokens", "6", "--warmup", "0",
                             "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while tiny_service.metrics.snapshot()["completion_tokens_total"] < before + 5 * 4:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "no request finished within 60 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    report = json.loads(out)
    (lv,) = report["runs"][0]["levels"]
    assert report["interrupted"] is True and lv["completed"] >= 4 and lv["cancelled"] > 0
    assert "Interrupted" in err and "Traceback" not in err


# ---- another OpenAI-compatible server: no usage in streams, stops early, ignores ignore_eos ---------
@pytest.fixture()
def plain_server():
    """A minimal third-party-style server: streams 3 one-token chunks, sends no usage, records bodies."""
    flask_app = Flask("plain")
    bodies: list[dict] = []

    @flask_app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": "plain-model", "object": "model"}]}

    @flask_app.post("/v1/chat/completions")
    def chat():
        bodies.append(request.get_json())

        def stream():
            for piece in ("a", "b", "c"):
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": piece}}]}) + "\n\n"
            yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}) + "\n\n"
            yield "data: [DONE]\n\n"

        return Response(stream(), mimetype="text/event-stream")

    from waitress import create_server

    server = create_server(flask_app, host="127.0.0.1", port=0, threads=8)
    threading.Thread(target=server.run, daemon=True).start()
    yield f"http://127.0.0.1:{server.socket.getsockname()[1]}", bodies
    server.close()


def test_server_without_usage_counts_chunks_and_shows_early_stops(plain_server):
    url, bodies = plain_server
    result = bench(*small(url, "--concurrency", "2", "--max-tokens", "8"))
    assert result.exit_code == 0, result.output
    notes = re.sub(r"\s+", " ", result.stderr)
    assert "counted as stream chunks" in notes and "4 of 4 responses stopped before max_tokens" in notes
    assert "3/3.0/3" in result.stdout  # output length min/mean/max
    data = json.loads(bench(*small(url, "--concurrency", "2", "--max-tokens", "8", "--json")).stdout)
    (lv,) = data["runs"][0]["levels"]
    assert lv["usage_source"] == "chunks" and lv["completion_tokens"] == 12 and lv["short_completions"] == 4
    assert lv["prompt_tokens_mean"] is None and data["runs"][0]["model"] == "plain-model"


def test_eos_bias_sends_standard_logit_bias(plain_server):
    url, bodies = plain_server
    result = bench(*small(url, "--concurrency", "1", "--no-ignore-eos", "--eos-bias", "--eos-token-id", "2",
                          "--eos-token-id", "5", "--model", "m", "--json"))
    assert result.exit_code == 0, result.output
    body = bodies[-1]
    assert body["logit_bias"] == {"2": -100, "5": -100} and "ignore_eos" not in body
    assert body["model"] == "m" and body["max_tokens"] == 6 and body["stream_options"] == {"include_usage": True}



def test_no_prompt_is_sent_twice_across_levels_and_warm_up(plain_server):
    """A server with a prefix cache must not gain at one level from what the warm-up or an earlier level sent."""
    url, bodies = plain_server
    result = bench(*small(url, "--concurrency", "1,2", "--warmup", "2", "--compare", url, "--json"))
    assert result.exit_code == 0, result.output
    prompts = [json.dumps(b["messages"]) for b in bodies]
    assert len(prompts) == 2 * (2 + 4 + 4)  # two servers: warm-up, then 4 requests at each level
    # Each server gets 10 distinct prompts; both servers get the same ones.
    assert len(set(prompts)) == 10 and sorted(prompts[:2]) == sorted(prompts[2:4])


# ---- the documented JSON schema ------------------------------------------------------------------
def test_json_schema_is_documented():
    text = DOCS.read_text(encoding="utf-8")
    report = BenchReport({"concurrency": [1]}, []).to_dict()
    assert set(report) == TOP_KEYS
    flattened = {c for c in CSV_COLUMNS if c.endswith(("_mean", "_median", "_p95", "_p99")) and "_ms_" in c}
    for key in TOP_KEYS | LEVEL_KEYS | OFFLINE_LEVEL_KEYS | RATIO_KEYS | set(CSV_COLUMNS) - flattened:
        assert f"`{key}`" in text, f"docs/bench.md does not document `{key}`"
    assert "`ttft_ms_mean`" in text
