"""`llmctl serve --engine vllm` as a user runs it: a subprocess, its flags, start-up and graceful shutdown."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import time

import httpx
import pytest

from tests.engine.test_engine import wait_for
from tests.server.test_serve_process import run_cli

pytestmark = pytest.mark.vllm
USER = [{"role": "user", "content": "Hello there"}]


@pytest.mark.parametrize(("args", "message"), [
    (["--tensor-parallel-size", "2"], "--tensor-parallel-size applies to vLLM's engine: add --engine vllm"),
    (["--engine", "vllm", "--load-in-8bit"], "--load-in-8bit is not available on the vllm engine"),
    (["--engine", "vllm", "--load-in-4bit"], "which vLLM runs on CUDA GPUs only"),
    (["--engine", "vllm", "--distributed-executor-backend", "ray"], "CPU build cannot run its workers on Ray"),
    (["--engine", "vllm", "--pipeline-parallel-size", "2"], "fails at the first request"),
    (["--engine", "vllm", "--gpu-memory-utilization", "1.5"], "--gpu-memory-utilization"),
])
def test_bad_vllm_start_fails_fast_with_one_line(args, message):
    result = run_cli("serve", "--port", "0", *args, timeout=120)
    assert result.returncode in (1, 2)
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "vllm" not in result.stdout.lower(), "the check must come before vLLM is imported"


def test_gguf_is_refused_with_the_engine_to_use(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 64)
    result = run_cli("serve", "--port", "0", "--engine", "vllm", "--model-path", str(gguf))
    assert result.returncode == 1
    assert "serve it with --engine builtin" in result.stderr.lower() or "GGUF" in result.stderr, result.stderr


def stream_into(lines: list[str], url: str, max_tokens: int) -> int:
    """Stream one answer, appending its SSE lines to ``lines`` as they come; the HTTP status."""
    body = {"messages": USER, "max_tokens": max_tokens, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=300, json=body) as r:
        lines.extend(line for line in r.iter_lines() if line.startswith("data: "))
    return r.status_code


@pytest.mark.timeout(900)
def test_serves_reports_loading_then_drains_on_sigterm(server_process, vllm_model):
    """/health is 503 'loading' while vLLM builds its engine; SIGTERM lets the stream in flight finish."""
    server = server_process("--model-path", str(vllm_model), "--dtype", "float32", "--enforce-eager",
                            "--kv-cache-tokens", "4096", "--grace-period", "200", "--request-timeout", "300",
                            env={"LLMCTL_ENGINE": "vllm"})
    seen_loading = False
    deadline = time.monotonic() + 60
    while not seen_loading and time.monotonic() < deadline:
        try:
            r = httpx.get(server.url + "/health", timeout=2)
            seen_loading = r.status_code == 503 and r.json()["status"] == "loading"
        except httpx.HTTPError:
            time.sleep(0.1)
    assert seen_loading, "the port must answer 503 'loading' while vLLM's engine is built"
    health = server.wait_status("ready", timeout=600)
    assert health["context_length"] == 1024 and health["dtype"] == "float32"
    lines: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answered = pool.submit(stream_into, lines, server.url, max_tokens=200)
        assert wait_for(lambda: len(lines) >= 5, 60), "no tokens streamed"
        assert httpx.get(server.url + "/health").json()["running"] == 1
        server.proc.send_signal(signal.SIGTERM)
        assert answered.result(300) == 200
    assert server.proc.wait(120) == 0
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["choices"][0]["finish_reason"] == "length"
    output = server.output()
    assert "vLLM engine built in" in output and "Stopped" in output
