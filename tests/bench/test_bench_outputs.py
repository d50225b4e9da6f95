"""`llmctl bench` against servers that chunk differently, its CSV on stdout, warm-up prompts and --config.

The stub server is a real Flask app on 127.0.0.1 that streams like other OpenAI-compatible servers:
several tokens per chunk, no usage, a chosen finish_reason.
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading

import pytest
from flask import Flask, Response, request
from typer.testing import CliRunner

from llmctl.bench.report import CSV_COLUMNS
from llmctl.bench.stats import RequestResult, summarize
from llmctl.cli.app import app

runner = CliRunner()


def bench(*args: str, env: dict | None = None):
    return runner.invoke(app, ["bench", *args], env=env)


@pytest.fixture()
def stub_server():
    """Start a stub server: ``tokens_per_chunk`` words a chunk up to max_tokens, then ``finish``; no usage."""
    servers = []

    def start(tokens_per_chunk: int = 2, finish: str = "length") -> tuple[str, list[dict]]:
        flask_app = Flask("stub")
        bodies: list[dict] = []

        @flask_app.get("/v1/models")
        def models():
            return {"object": "list", "data": [{"id": "stub-model", "object": "model"}]}

        @flask_app.post("/v1/chat/completions")
        def chat():
            body = request.get_json()
            bodies.append({**body, "authorization": request.headers.get("Authorization")})

            def stream():
                left = body["max_tokens"]
                while left > 0:
                    n = min(tokens_per_chunk, left)
                    chunk = {"choices": [{"index": 0, "delta": {"content": " tok" * n}}]}
                    yield "data: " + json.dumps(chunk) + "\n\n"
                    left -= n
                end = {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
                yield "data: " + json.dumps(end) + "\n\n" + "data: [DONE]\n\n"

            return Response(stream(), mimetype="text/event-stream")

        from waitress import create_server

        server = create_server(flask_app, host="127.0.0.1", port=0, threads=8)
        threading.Thread(target=server.run, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.socket.getsockname()[1]}", bodies

    yield start
    for server in servers:
        server.close()


def small(*extra: str) -> list[str]:
    return ["--requests", "4", "--max-tokens", "8", "--prompt-tokens", "6", "--warmup", "1", "--concurrency", "2",
            *extra]


# ---- finish_reason "length" is evidence of a full-length response -----------------------------------

def test_two_tokens_a_chunk_without_usage_is_not_an_early_stop(stub_server):
    url, _ = stub_server(tokens_per_chunk=2, finish="length")
    result = bench("--url", url, *small())
    assert result.exit_code == 0, result.output
    notes = " ".join(result.stderr.split())
    assert "stopped before max_tokens" not in notes and "ignore_eos" not in notes
    assert "counted as stream chunks" not in notes
    (lv,) = json.loads(bench("--url", url, *small("--json")).stdout)["runs"][0]["levels"]
    # 4 chunks of 2 tokens each: the count is max_tokens, not the 4 chunks.
    assert lv["short_completions"] == 0 and lv["completion_tokens"] == 4 * 8 and lv["usage_source"] == "length"
    assert lv["completion_tokens_min"] == lv["completion_tokens_max"] == 8


def test_finish_reason_stop_is_still_an_early_stop(stub_server):
    url, _ = stub_server(tokens_per_chunk=2, finish="stop")
    result = bench("--url", url, *small())
    assert result.exit_code == 0, result.output
    notes = " ".join(result.stderr.split())
    assert "4 of 4 responses stopped before max_tokens" in notes and "counted as stream chunks" in notes


def test_short_completions_rule():
    full = RequestResult(success=True, completion_tokens=4, finish_reason="length", latency=1.0, ttft=0.1)
    stop_at_max = RequestResult(success=True, completion_tokens=8, finish_reason="stop", latency=1.0, ttft=0.1,
                                usage_from_server=True)
    unknown_short = RequestResult(success=True, completion_tokens=3, latency=1.0, ttft=0.1)
    assert summarize([full], 1.0, max_tokens=8).short_completions == 0
    assert summarize([stop_at_max, unknown_short], 1.0, max_tokens=8).short_completions == 2


# ---- CSV on stdout ----------------------------------------------------------------------------------

def test_csv_to_stdout_keeps_stdout_pure_csv(stub_server):
    url, _ = stub_server()
    result = bench("--url", url, *small("--csv", "-"))
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 1 and rows[0]["model"] == "stub-model"
    assert result.stdout.count("\n") == 2  # the header and one row: no table on stdout
    assert "throughput" in result.stderr and "TTFT" in result.stderr  # the tables went to stderr


# ---- warm-up prompts never repeat a measured one -----------------------------------------------------

def test_warmup_skips_the_prompts_of_a_file(stub_server, tmp_path):
    url, bodies = stub_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(6)))
    result = bench("--url", url, "--prompts", str(prompts), *small("--concurrency", "1"))
    assert result.exit_code == 0, result.output
    warm, measured = bodies[0], bodies[1:]
    assert warm["messages"][0]["content"] == "question 4"  # the file's first unused prompt
    assert [b["messages"][0]["content"] for b in measured] == [f"question {i}" for i in range(4)]


def test_warmup_with_a_short_file_uses_builtin_prompts(stub_server, tmp_path):
    url, bodies = stub_server()
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "only question"}) + "\n")
    result = bench("--url", url, "--prompts", str(prompts), *small("--concurrency", "1"))
    assert result.exit_code == 0, result.output
    assert bodies[0]["messages"][0]["content"] != "only question"
    assert all(b["messages"][0]["content"] == "only question" for b in bodies[1:])


# ---- the service from --config or $SELF_HOSTED_LLM_URL -----------------------------------------------

def test_config_file_names_the_server(stub_server, tmp_path):
    url, bodies = stub_server()
    config = tmp_path / "llmctl.yaml"
    config.write_text(f"llm:\n  self_hosted_url: {url}/v1\n")
    result = bench("--config", str(config), *small("--json"))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["url"] == url and len(bodies) == 5


def test_self_hosted_url_env_and_bench_url_precedence(stub_server):
    first, first_bodies = stub_server()
    second, second_bodies = stub_server()
    result = bench(*small("--json"), env={"SELF_HOSTED_LLM_URL": first})
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["runs"][0]["url"] == first and first_bodies
    result = bench(*small("--json"), env={"SELF_HOSTED_LLM_URL": first, "LLMCTL_BENCH_URL": second})
    assert json.loads(result.stdout)["runs"][0]["url"] == second and second_bodies


def test_clients_api_key_goes_to_the_configured_server(stub_server):
    url, bodies = stub_server()
    result = bench(*small("--json"), env={"SELF_HOSTED_LLM_URL": url, "LLMCTL_API_KEY": "sk-client"})
    assert result.exit_code == 0, result.output
    assert {b["authorization"] for b in bodies} == {"Bearer sk-client"}
    result = bench(*small("--json", "--api-key", "sk-flag"), env={"SELF_HOSTED_LLM_URL": url,
                                                                  "LLMCTL_API_KEY": "sk-client"})
    assert bodies[-1]["authorization"] == "Bearer sk-flag"


def test_config_model_path_for_offline(tiny_model, tmp_path):
    config = tmp_path / "llmctl.yaml"
    config.write_text(f"llm:\n  model_path: {tiny_model}\n")
    result = bench("--offline", "--config", str(config), "--concurrency", "1", "--requests", "1", "--max-tokens",
                   "2", "--prompt-tokens", "4", "--device", "cpu", "--dtype", "float32", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["offline"]["model"] == "tiny-llama"


def test_long_prompt_note_uses_the_servers_count(base_url):
    # The tiny test tokenizer (512 entries) splits the built-in words into several tokens each.
    result = bench("--url", base_url, "--requests", "2", "--max-tokens", "2", "--prompt-tokens", "40",
                   "--warmup", "0", "--concurrency", "1")
    assert result.exit_code == 0, result.output
    note = " ".join(result.stderr.split())
    assert re.search(r"prompts average [\d,]+ tokens \(the server's usage\), not about 40", note), note
