"""LoRA adapters loaded and unloaded while the server runs (vLLM's routes, behind the API key): a bad adapter is
a 400 naming the field and the server keeps serving; an unloaded adapter's running requests all finish."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from llmctl.server.testing import build_tiny_model, serve_in_thread
from tests.conftest import make_service, slow_down, wait_for
from tests.lora.adapters import make_adapter, merged_greedy
from tests.lora.test_lora_engine import PROMPT, TOKENS, submit, tokens

KEY = {"Authorization": "Bearer sesame"}


@pytest.fixture()
def server(tiny_model):
    service = make_service(tiny_model, enable_lora=True, max_loras=2, max_lora_rank=4)
    with serve_in_thread(service, api_keys=("sesame",)) as url, httpx.Client(base_url=url, headers=KEY,
                                                                              timeout=60) as client:
        yield service, client
    service.shutdown()


def load(client: httpx.Client, name: str, path) -> httpx.Response:
    return client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})


def models(client: httpx.Client) -> list[str]:
    return [m["id"] for m in client.get("/v1/models").json()["data"]]


def test_load_serve_unload(server, tiny_model, adapter_one):
    service, client = server
    assert models(client) == ["tiny-llama"]
    assert httpx.post(str(client.base_url) + "/v1/load_lora_adapter",
                      json={"lora_name": "one", "lora_path": str(adapter_one)}).status_code == 401
    r = load(client, "one", adapter_one)
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "one" and r.json()["parent"] == "tiny-llama"
    assert models(client) == ["tiny-llama", "one"]
    # What the adapter merged into the model generates, token for token.
    assert tokens(submit(service, PROMPT, "one")) == merged_greedy(tiny_model, adapter_one, PROMPT, TOKENS)
    assert client.get("/health").json()["lora_adapters"]["memory_bytes"] > 0
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "one"})
    assert r.status_code == 200 and r.json()["running_requests"] == 0
    assert models(client) == ["tiny-llama"]
    assert service.loras.host.nbytes == 0
    sdk = openai.OpenAI(base_url=str(client.base_url) + "/v1", api_key="sesame", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="one", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert load(client, "one", adapter_one).status_code == 200  # the name can be loaded again


def test_bad_adapters_are_400s_naming_the_field(server, tmp_path, adapter_one, adapter_two):
    service, client = server
    other = build_tiny_model(tmp_path / "other", hidden=32)
    cases = [
        ({"lora_name": "x", "lora_path": str(tmp_path / "missing")}, "lora_path", "does not exist"),
        ({"lora_name": "x"}, "lora_path", None),
        ({"lora_name": "", "lora_path": str(adapter_one)}, "lora_name", None),
        ({"lora_name": "tiny-llama", "lora_path": str(adapter_one)}, "lora_name", "base model's name"),
        ({"lora_name": "x", "lora_path": str(make_adapter(other, tmp_path / "small"))}, "lora_path",
         "another model size"),
        ({"lora_name": "x", "lora_path": str(adapter_two)}, "lora_path", "--max-lora-rank 4"),
        ({"lora_name": "x", "lora_path": str(tmp_path)}, "lora_path", "adapter_config.json is missing"),
    ]
    for body, param, says in cases:
        r = client.post("/v1/load_lora_adapter", json=body)
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert error["param"] == param, (body, error)
        assert says is None or says in error["message"], error
    assert load(client, "one", adapter_one).status_code == 200
    r = load(client, "one", adapter_one)
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert load(client, "one-b", adapter_one).status_code == 200
    r = load(client, "one-c", adapter_one)
    assert r.status_code == 400 and "--max-loras" in r.json()["error"]["message"]
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "nope"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    # Still serving, the good adapters included.
    r = client.post("/v1/chat/completions", json={"model": "one-b", "messages": [{"role": "user", "content": "hi"}],
                                                  "max_tokens": 3})
    assert r.status_code == 200 and r.json()["model"] == "one-b"
    assert models(client) == ["tiny-llama", "one", "one-b"]


def test_unload_under_load_loses_no_request(server, adapter_one):
    service, client = server
    assert load(client, "one", adapter_one).status_code == 200
    body = {"model": "one", "prompt": "The capital", "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    want = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    assert want != client.post("/v1/completions", json={**body, "model": "tiny-llama"}).json()["choices"][0]["text"]
    slow_down(service, 0.02)
    results: list = []

    def stream() -> None:
        r = client.post("/v1/completions", json=body)
        results.append((r.status_code, r.json()))

    threads = [threading.Thread(target=stream) for _ in range(4)]
    for thread in threads:
        thread.start()
    assert wait_for(lambda: service.engine.running == 4, timeout=120)
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "one"})
    assert r.status_code == 200 and r.json()["running_requests"] == 4
    # New requests may no longer name it, while its running ones go on with its weights.
    late = client.post("/v1/completions", json={"model": "one", "prompt": "x", "max_tokens": 2})
    assert late.status_code == 404
    assert service.loras.host.nbytes > 0
    for thread in threads:
        thread.join()
    assert [code for code, _ in results] == [200] * 4
    assert all(out["usage"]["completion_tokens"] == 24 and out["choices"][0]["finish_reason"] == "length"
               for _, out in results)
    assert [out["choices"][0]["text"] for _, out in results] == [want] * 4  # with the adapter to the end
    assert service.loras.host.nbytes == 0
    assert models(client) == ["tiny-llama"]


def test_lora_routes_without_adapters(tiny_model, base_url, adapter_one):
    r = httpx.post(base_url + "/v1/load_lora_adapter", json={"lora_name": "one", "lora_path": str(adapter_one)})
    assert r.status_code == 400 and r.json()["error"]["code"] == "lora_disabled"
