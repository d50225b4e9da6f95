"""`llmctl serve` as a user runs it: a subprocess, its flags, start-up checks and graceful shutdown."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

from llmctl.server.testing import build_tiny_model

USER = [{"role": "user", "content": "Hello there"}]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run llmctl; ``timeout`` only bounds a hang (importing torch alone takes a minute on a busy machine)."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "llmctl", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def test_underscore_flags_and_env(server_process, tiny_model):
    server = server_process("--model_path", str(tiny_model), "--dtype", "float32",
                            env={"LLMCTL_SERVED_MODEL_NAME": "my-model"})
    health = server.wait_status("ready")
    assert health["model"] == "my-model"
    r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 3, "model": "my-model"})
    assert r.status_code == 200
    assert server.stop() == 0
    log = server.output()
    assert "Listening on http://127.0.0.1" in log and "ready in" in log


@pytest.mark.parametrize(("args", "message"), [
    (["--load_in_8bit", "--load-in-4bit"], "cannot be used together"),
    (["--model-path", "/nonexistent/model"], "does not exist"),
    # A long path: still one line of stderr (log collectors split records at newlines).
    (["--model-path", "/nonexistent/" + "a-rather-long-folder-name/" * 6 + "model"], "does not exist"),
    (["--device", "cuda"], "no CUDA device"),
    # Builtin-engine flags on vLLM's engine are refused before vLLM is imported (it need not be installed).
    (["--engine", "vllm", "--attention", "grouped"], "--attention applies to the builtin engine"),
    (["--engine", "vllm", "--max-prefill-tokens", "64"], "--max-prefill-tokens applies to the builtin engine"),
    (["--engine", "vllm", "--prefill-wait-ms", "5"], "--prefill-wait-ms applies to the builtin engine"),
    (["--speculative-config", '{"method": "ngram"'], "--speculative-config is not valid JSON"),
    (["--speculative-config", '{"method": "medusa", "num_speculative_tokens": 2}'], "not 'medusa'"),
    (["--speculative-config", '{"model": "/nonexistent/draft", "num_speculative_tokens": 2}'],
     "is not a model folder"),
    (["--engine", "vllm", "--deterministic"], "--deterministic applies to the builtin engine"),
])
def test_bad_start_fails_fast_with_one_line(args, message):
    result = run_cli("serve", "--port", "0", *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_port_in_use_or_out_of_range_is_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), "--model-path", "/nonexistent")
        assert result.returncode == 1, result.stderr
        result = run_cli("serve", "--host", "127.0.0.1", "--port", str(port))
    assert result.returncode == 1
    assert f"Cannot listen on 127.0.0.1:{port}" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("serve", "--port", "83847")
    assert result.returncode == 2 and "--port" in result.stderr


def test_sigterm_drains_in_flight_requests_and_exits_0(server_process, tmp_path):
    # A model big enough that a 300-token answer is still running when the signal arrives; the timeouts are
    # the longest allowed, and the test's own waits come from the pace of the stream, so a slow or busy
    # machine only makes it slower.
    model = build_tiny_model(tmp_path / "slower", context=2048, hidden=256, layers=6)
    tokens = 300
    server = server_process("--model-path", str(model), "--dtype", "float32", "--grace-period", "3600",
                            "--request-timeout", "300")
    server.wait_status("ready")
    arrivals: list[float] = []
    lines: list[str] = []

    def stream():
        with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=None, json={
                "messages": USER, "max_tokens": tokens, "ignore_eos": True, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    arrivals.append(time.monotonic())

    client = threading.Thread(target=stream, daemon=True)
    client.start()
    while len(lines) < 5 and client.is_alive():
        time.sleep(0.01)
    health = httpx.get(server.url + "/health").json()
    assert health["running"] == 1, "the request should be in flight when the signal arrives"
    server.proc.send_signal(signal.SIGTERM)
    # What is left of the answer, at ten times the pace its first tokens came at, plus start-up slack.
    rest = 10 * tokens * (arrivals[4] - arrivals[1]) / 3 + 30
    time.sleep(0.3)
    if server.proc.poll() is None:
        # While draining, new work is refused with a clear 503.
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=rest)
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
    client.join(rest)
    assert server.proc.wait(rest) == 0
    assert lines[-1] == "data: [DONE]"
    final = json.loads(lines[-2][len("data: "):])
    assert final["choices"][0]["finish_reason"] == "length"
    output = server.output()
    assert "Waiting up to 3600 s for 1 request(s) in flight" in output and "Stopped" in output


def test_compute_and_http_threads_are_reported(server_process, tiny_model):
    server = server_process("--model-path", str(tiny_model), "--dtype", "float32", "--cpu-threads", "1",
                            env={"LLMCTL_THREADS": "8"})
    health = server.wait_status("ready")
    assert (health["cpu_threads"], health["cpu_threads_policy"]) == (1, "fixed")
    metrics = httpx.get(server.url + "/metrics").json()
    assert (metrics["cpu_threads"], metrics["cpu_threads_policy"], metrics["cpu_thread_switches"]) == (1, "fixed", 0)
    assert "llmctl_cpu_threads 1.0" in httpx.get(server.url + "/metrics?format=prometheus").text
    log = server.output()
    assert "Compute: 1 torch thread(s), fixed by --cpu-threads" in log and "(8 HTTP threads)" in log
    assert "--threads (LLMCTL_THREADS) is deprecated" in log
    assert server.stop() == 0
    # Adaptive by default, with speculative decoding too (its timings are kept for each thread count).
    adaptive = server_process("--model-path", str(tiny_model), "--dtype", "float32", "--speculative-config",
                              '{"method": "ngram", "num_speculative_tokens": 3}')
    cores = len(os.sched_getaffinity(0))
    health = adaptive.wait_status("ready")
    assert health["cpu_threads_policy"] == "adaptive" and 1 <= health["cpu_threads"] <= cores
    assert health["speculative"]["method"] == "ngram"
    r = httpx.post(adaptive.url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 8}, timeout=600)
    assert r.status_code == 200, r.text
    metrics = httpx.get(adaptive.url + "/metrics").json()
    assert metrics["cpu_threads_policy"] == "adaptive" and metrics["speculative"] is not None
    assert "Compute: adaptive torch threads" in adaptive.output()


def test_preflight_fails_before_torch_is_imported(tmp_path):
    # Every check of the files and the port runs before torch (seconds to import) is loaded.
    code = ("import sys\nfrom llmctl.cli.app import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
            "    print('exit', exc.code, 'torch' in sys.modules, 'transformers' in sys.modules)\n")
    for args, message in ((["--model-path", "/nonexistent/model"], "does not exist"),
                          (["--model-path", str(tmp_path)], "config.json"),
                          (["--tensor-parallel-size", "2"], "--tensor-parallel-size applies to vLLM's engine")):
        result = subprocess.run([sys.executable, "-c", code, "serve", "--port", "0", *args], capture_output=True,
                                text=True, timeout=120)
        assert result.stdout.strip().splitlines()[-1] == "exit 1 False False", result.stdout + result.stderr
        assert message in result.stderr


def test_module_and_script_entry_points():
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("llmctl ")
    result = run_cli("serve", "--help")
    assert "--model_path" in result.stdout and "--load_in_4bit" in result.stdout


def test_serve_takes_model_path_from_the_config_file(server_process, tiny_model, tmp_path):
    config = tmp_path / "llmctl.yaml"
    config.write_text(f"llm:\n  provider: self\n  model_path: {tiny_model}\n")
    server = server_process("--config", str(config), "--dtype", "float32")
    assert server.wait_status("ready")["model"] == "tiny-llama"
    assert server.stop() == 0


def test_vllm_tool_flags_are_accepted_and_the_parser_is_logged(server_process, tiny_model):
    server = server_process("--model-path", str(tiny_model), "--dtype", "float32", "--enable-auto-tool-choice",
                            "--tool-call-parser", "llama3_json")
    server.wait_status("ready")
    assert server.stop() == 0
    assert "Tool calls: llama3_json (--tool-call-parser llama3_json)" in server.output()
    server = server_process("--model-path", str(tiny_model), "--dtype", "float32")  # auto, the default
    server.wait_status("ready")
    assert server.stop() == 0
    assert "Tool calls: not parsed (auto: the chat template does not render tools" in server.output()
    result = run_cli("serve", "--tool-call-parser", "llama5")
    assert result.returncode == 2 and "llama3_json" in result.stderr


def test_a_taken_port_fails_before_the_listening_warning():
    import socket

    from flask import Flask

    from llmctl.server.runner import ServeError, run_server

    app, warned = Flask(__name__), []
    app.config["MAX_CONTENT_LENGTH"] = 1024
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(ServeError, match="Cannot listen"):
            run_server(app, None, "127.0.0.1", taken.getsockname()[1], threads=4, grace_period=0,
                       on_listening=lambda: warned.append(True))
    assert warned == []


def test_the_serve_log_leaves_out_bitsandbytes_optional_kernels_line():
    """bitsandbytes' CPU backend logs a "pip install kernels" warning when imported; serve's log keeps it out."""
    code = ("from llmctl.cli.serve import setup_logging; setup_logging('info');"
            "import logging; import bitsandbytes.backends.cpu.ops; logging.getLogger('llmctl.serve').info('after')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "after" in done.stdout and "pip install kernels" not in done.stdout + done.stderr
