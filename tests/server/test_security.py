"""API keys, CORS, request limits, the OpenAPI document, and secrets that must never leak."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import httpx
import pytest

from llmctl.server.openapi import openapi_document
from llmctl.server.security import load_api_keys
from llmctl.server.testing import serve_in_thread

USER = [{"role": "user", "content": "Hello"}]
KEYS = ("sk-first-secret-123", "sk-second-secret-456")


@pytest.fixture(scope="module")
def secured_url(tiny_service):
    with serve_in_thread(tiny_service, api_keys=KEYS, allowed_origins=("https://app.example.com",)) as url:
        yield url


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_v1_needs_a_valid_key(secured_url):
    body = {"messages": USER, "max_tokens": 2}
    r = httpx.post(secured_url + "/v1/chat/completions", json=body)
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(secured_url + "/v1/chat/completions", json=body, headers=bearer("sk-wrong"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(secured_url + "/v1/models", headers={"Authorization": "Basic abc"}).status_code == 401
    for key in KEYS:
        assert httpx.post(secured_url + "/v1/chat/completions", json=body, headers=bearer(key)).status_code == 200
        assert httpx.get(secured_url + "/v1/models", headers=bearer(key)).status_code == 200


def test_health_is_open_and_metrics_needs_a_key(secured_url, tiny_service):
    assert httpx.get(secured_url + "/health").status_code == 200
    assert httpx.get(secured_url + "/metrics").status_code == 401
    assert httpx.get(secured_url + "/metrics", headers=bearer(KEYS[0])).status_code == 200
    with serve_in_thread(tiny_service, api_keys=KEYS, public_metrics=True) as url:
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 401


def test_keys_never_leak(secured_url, caplog):
    caplog.set_level(logging.DEBUG)
    httpx.post(secured_url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2},
               headers=bearer(KEYS[0]))
    wrong = httpx.post(secured_url + "/v1/chat/completions", json={"messages": USER}, headers=bearer(KEYS[1] + "x"))
    texts = [
        wrong.text,
        httpx.get(secured_url + "/health").text,
        httpx.get(secured_url + "/metrics", headers=bearer(KEYS[0])).text,
        httpx.get(secured_url + "/metrics?format=prometheus", headers=bearer(KEYS[0])).text,
        caplog.text,
    ]
    for text in texts:
        for key in KEYS:
            assert key not in text


def test_cors_preflight_and_headers(secured_url, base_url):
    origin = "https://app.example.com"
    r = httpx.options(secured_url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == origin
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    assert "Origin" in r.headers["vary"]
    # The OpenAI JS SDK in a browser sends headers of its own; the preflight must allow them.
    r = httpx.options(secured_url + "/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os,x-stainless-lang"})
    assert "x-stainless-os" in r.headers["access-control-allow-headers"].lower()
    r = httpx.get(secured_url + "/health", headers={"Origin": "https://evil.example.com"})
    assert "access-control-allow-origin" not in r.headers
    # Default: no origins allowed at all.
    r = httpx.get(base_url + "/health", headers={"Origin": origin})
    assert "access-control-allow-origin" not in r.headers


def test_max_tokens_cap(tiny_model):
    from tests.conftest import make_service

    service = make_service(tiny_model, max_tokens_cap=16)
    try:
        with serve_in_thread(service) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 17})
            assert r.status_code == 400 and "16" in r.json()["error"]["message"]
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 16
    finally:
        service.shutdown()


def test_key_file_and_comma_separated_keys(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# team keys\nk1\n\nk2\n")
    assert load_api_keys(["k0,k1", "k3"], path) == ("k0", "k1", "k3", "k2")
    assert load_api_keys([""], None) == ()  # LLMCTL_API_KEY="" means no key


@pytest.mark.parametrize("keys", [[","], [" , "]])
def test_asking_for_keys_and_giving_none_is_an_error(tmp_path, keys):
    from llmctl.errors import ConfigError

    with pytest.raises(ConfigError, match="no API key"):
        load_api_keys(keys, None)
    empty = tmp_path / "keys"
    empty.write_text("# no keys yet\n\n")
    with pytest.raises(ConfigError, match="no API key"):
        load_api_keys([], empty)


def test_default_max_tokens_and_kv_budget_errors(tiny_model):
    from llmctl.engine import EngineConfig
    from tests.conftest import make_service

    service = make_service(tiny_model, default_max_tokens=5,
                           engine=EngineConfig(max_num_seqs=4, max_waiting=8, kv_cache_tokens=64))
    try:
        with serve_in_thread(service) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 5
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_completion_tokens": 100})
            error = r.json()["error"]
            assert r.status_code == 400 and error["param"] == "max_completion_tokens"
            assert "64" in error["message"]
    finally:
        service.shutdown()


def test_warning_when_open_to_the_network_without_key(server_process, tiny_model):
    server = server_process("--model-path", str(tiny_model), "--dtype", "float32", "--host", "0.0.0.0")
    server.wait_status("ready")
    assert server.stop() == 0
    assert "without an API key" in server.output()


def test_openapi_document_is_current(client):
    generated = openapi_document()
    committed = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
    assert committed == generated, "run: python -m llmctl.server.openapi > docs/openapi.json"
    assert client.get("/openapi.json").json() == generated
    props = generated["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    for field in ("messages", "max_tokens", "temperature", "stream", "stop", "timeout", "ignore_eos"):
        assert field in props
