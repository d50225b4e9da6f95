"""`llmctl health` and `llmctl metrics` against real services on 127.0.0.1: ready, loading, failed, absent."""

from __future__ import annotations

import json
import threading
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

from llmctl import envvars
from llmctl.cli.app import app
from llmctl.cli.metrics import duration, gib, latency_table
from llmctl.client.config import ENV_VARS
from llmctl.core.loader import LoadOptions
from llmctl.errors import ModelLoadError
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import free_port, serve_in_thread
from tests.client.test_client import stand_in  # noqa: F401 - the fixture


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in [*ENV_VARS.values(), envvars.CONFIG, envvars.API_KEY_FILE]:
        monkeypatch.delenv(var, raising=False)


def unloaded_service(tiny_model, loader=None) -> Service:
    load = LoadOptions(model_path=tiny_model, dtype="float32", device="cpu")
    if loader is None:
        return Service(ServiceSettings(load=load))
    return Service(ServiceSettings(load=load), loader=loader)


@pytest.fixture()
def loading(tiny_model):
    """A service still loading its model (load() is not called until a test does it)."""
    service = unloaded_service(tiny_model)
    with serve_in_thread(service) as url:
        yield url, service
    service.shutdown()


@pytest.fixture()
def failed_url(tiny_model):
    def broken(options):
        raise ModelLoadError("No config.json in /models/nothing-here.")

    service = unloaded_service(tiny_model, broken)
    service.load()
    with serve_in_thread(service) as url:
        yield url


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def flat(text: str) -> str:
    return " ".join(text.split())


# ---- health -----------------------------------------------------------------------------------
def test_health_ready_table(base_url):
    result = invoke("health", "--url", base_url)
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    for words in ("Status │ ready", "Model │ tiny-llama", "Device │ cpu", "CUDA available │ no",
                  "Context length │", "tokens", "GPU memory allocated │ 0.00 GiB"):
        assert words in out


def test_health_json(base_url):
    result = invoke("health", "--url", base_url, "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert body["status"] == "ready" and body["model"] == "tiny-llama"
    assert {"device", "cuda_available", "memory_allocated_gb", "running", "waiting", "version"} <= set(body)


def test_health_url_from_the_environment(base_url, monkeypatch):
    monkeypatch.setenv("SELF_HOSTED_LLM_URL", base_url + "/v1")
    assert invoke("health").exit_code == 0


def test_health_unreachable_exits_2():
    url = down_url()
    result = invoke("health", "--url", url)
    assert result.exit_code == 2
    assert "unreachable" in result.stdout and "llmctl serve" in flat(result.stdout)
    result = invoke("health", "--url", url, "--json")
    assert result.exit_code == 2
    body = json.loads(result.stdout)
    assert body["status"] == "unreachable" and body["url"] == url and body["error"]


def test_health_loading_exits_1(loading):
    url, _ = loading
    result = invoke("health", "--url", url)
    assert result.exit_code == 1 and "loading" in result.stdout
    assert json.loads(invoke("health", "--url", url, "--json").stdout)["status"] == "loading"


def test_health_failed_load_exits_1_and_shows_why(failed_url):
    result = invoke("health", "--url", failed_url)
    assert result.exit_code == 1
    assert "error" in result.stdout and "No config.json" in flat(result.stdout)


def test_health_wait_gives_up_after_the_time(loading):
    url, _ = loading
    started = time.monotonic()
    result = invoke("health", "--url", url, "--wait", "0.6", "--json")
    assert result.exit_code == 1 and json.loads(result.stdout)["status"] == "loading"
    # It waited its time (a lower bound holds on any machine); returning at all is giving up, as the model never loads.
    assert time.monotonic() - started >= 0.5


def test_health_wait_returns_once_ready(loading):
    url, service = loading
    threading.Timer(0.3, service.load).start()
    result = invoke("health", "--url", url, "--wait", "30")
    assert result.exit_code == 0, result.output
    assert "ready" in result.stdout


def test_health_wait_on_an_absent_service_exits_2():
    result = invoke("health", "--url", down_url(), "--wait", "0.3")
    assert result.exit_code == 2


# ---- metrics ----------------------------------------------------------------------------------
def test_metrics_table_in_human_units(base_url, client):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    result = invoke("metrics", "--url", base_url)
    assert result.exit_code == 0, result.output
    out = flat(result.stdout)
    for words in ("Service Status ready", "Model tiny-llama", "Requests Total", "By status 200:",
                  "Tokens Prompt", "tok/s", "Process resident", "MiB", "Time to first token", "p95", " ms"):
        assert words in out


def test_metrics_json(base_url, tiny_service):
    result = invoke("metrics", "--url", base_url, "--json")
    assert result.exit_code == 0
    body = json.loads(result.stdout)
    assert set(tiny_service.metrics_json()) == set(body)


def test_metrics_watch_prints_each_update(base_url):
    result = invoke("metrics", "--url", base_url, "--watch", "0.1", "--count", "3")
    assert result.exit_code == 0
    assert result.stdout.count("llmctl metrics at") == 3


def test_metrics_watch_json_lines(base_url):
    result = invoke("metrics", "--url", base_url, "--watch", "0.1", "--count", "2", "--json")
    assert result.exit_code == 0
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2 and all(json.loads(line)["service"] == "llmctl" for line in lines)


def test_metrics_while_loading(loading):
    url, _ = loading
    result = invoke("metrics", "--url", url, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["status"] == "loading"


def test_metrics_unreachable_exits_2():
    result = invoke("metrics", "--url", down_url())
    assert result.exit_code == 2 and "not reachable" in flat(result.stderr)


def test_metrics_sends_the_api_key(tiny_service, monkeypatch):
    with serve_in_thread(tiny_service, api_keys=("secret-key",)) as url:
        result = invoke("metrics", "--url", url)
        assert result.exit_code == 1 and "401" in flat(result.stderr)
        monkeypatch.setenv("LLMCTL_API_KEY", "secret-key")
        assert invoke("metrics", "--url", url).exit_code == 0


@pytest.mark.parametrize("seconds, text", [
    (0.0123, "12.3 ms"), (2.5, "2.50 s"), (125, "2m 05s"), (3725, "1h 02m 05s"), (200000, "2d 07h 33m"),
    (None, "-"),
])
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_gib():
    assert gib(0.5) == "512 MiB" and gib(3.25) == "3.25 GiB" and gib(None) == "-"


# ---- scripts, odd servers, narrow terminals ------------------------------------------------------
def test_metrics_json_when_unreachable_is_still_json():
    url = down_url()
    result = invoke("metrics", "--url", url, "--json")
    assert result.exit_code == 2
    body = json.loads(result.stdout)
    assert body["status"] == "unreachable" and body["url"] == url and "not reachable" in body["error"]


def test_metrics_that_are_not_json_are_a_protocol_error_not_unreachable(stand_in):
    server = stand_in("other", metrics="# HELP something\nsomething 1\n")
    result = invoke("metrics", "--url", server.url, "--json")
    assert result.exit_code == 1, result.output
    assert json.loads(result.stdout)["status"] == "error" and "without JSON" in flat(result.stderr)


def test_metrics_count_needs_watch(base_url):
    result = invoke("metrics", "--url", base_url, "--count", "2")
    assert result.exit_code == 2 and "--count needs --watch" in flat(result.stderr)


def test_metrics_401_says_where_the_key_comes_from(tiny_service):
    with serve_in_thread(tiny_service, api_keys=("secret-key",)) as url:
        result = invoke("metrics", "--url", url, "--json")
    assert result.exit_code == 1 and "set LLMCTL_API_KEY" in flat(result.stderr)
    assert json.loads(result.stdout)["status"] == "error"


def test_latency_rows_fit_in_80_columns():
    big = {"count": 1_234_567, "mean": 1234.5, "p50": 1000.2, "p95": 2000.1, "p99": 12345.6}
    console = Console(width=80, record=True)
    console.print(latency_table({"latency_s": big, "tokens_per_second_per_request": big}))
    lines = console.export_text().splitlines()
    assert any(line.startswith("│ Tokens/s") and "12,345.6" in line and "1,234,567" in line for line in lines)
    assert len(lines) == 9  # title, 3 header lines, 4 rows, bottom border: nothing wrapped


def test_health_shows_a_foreign_servers_fields_literally(stand_in):
    server = stand_in("other", health={"status": "ok", "detail[/x]": "[type=missing] [/foo]"})
    result = invoke("health", "--url", server.url)
    assert result.exit_code == 0 and "Traceback" not in result.output  # llama.cpp's "ok" is ready
    assert "detail[/x]" in result.stdout and "[type=missing] [/foo]" in result.stdout


@pytest.mark.parametrize("health", [{"status": "ok"}, ""], ids=["llama.cpp", "vLLM"])
def test_health_of_other_servers_that_are_up_is_ready(stand_in, health):
    server = stand_in("other", health=health)
    result = invoke("health", "--url", server.url, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["status"] in ("ok", "ready")


def test_health_of_a_web_page_is_not_ready(stand_in):
    """A web server's "It works" page at /health used to count as ready (exit 0): only an empty 200 is."""
    server = stand_in("other", health="<html><body><h1>It works!</h1></body></html>")
    result = CliRunner().invoke(app, ["health", "--url", server.url], env={"COLUMNS": "200"})
    assert result.exit_code == 1, result.output
    out = flat(result.stdout)
    assert "Status │ error" in out
    assert "answers, but /health is not an llmctl/OpenAI-compatible service's" in out
    assert "HTTP 200, text/html" in out
    body = json.loads(invoke("health", "--url", server.url, "--json").stdout)
    assert body["status"] == "error" and "not an llmctl/OpenAI-compatible service's" in body["error"]
