"""LoRA adapters served as models of their own, through the real SDKs on every API: each adapter's answers equal
those of a server of the adapter merged into the model (float32, greedy), alone and in one batch with the base
model's and the other adapter's requests."""

from __future__ import annotations

import threading

import anthropic
import httpx
import openai
import pytest

from llmctl.core.adapters import AdapterSpec
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service, sse_data

MESSAGES = [{"role": "user", "content": "Hello! How can I help?"}]
TOKENS = 10


@pytest.fixture(scope="module")
def lora_server(tiny_model, adapter_one, adapter_two):
    service = make_service(tiny_model, loras=(AdapterSpec("one", adapter_one), AdapterSpec("two", adapter_two)))
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


@pytest.fixture(scope="module")
def references(base_url, merged_one, merged_two):
    """Servers of the adapters merged into the model: what each adapter's answers must be."""
    services = {"one": make_service(merged_one), "two": make_service(merged_two)}
    with serve_in_thread(services["one"]) as one, serve_in_thread(services["two"]) as two:
        yield {None: (base_url, "tiny-llama"), "one": (one, "merged-one"), "two": (two, "merged-two")}
    for service in services.values():
        service.shutdown()


def ask(url: str, api: str, model: str | None) -> tuple[str, str | None]:
    """One greedy request on ``api`` through its SDK: the answer's text and the model it names."""
    name = model or "tiny-llama"
    return ask_named(url, api, name)


def reference(references: dict, api: str, model: str | None) -> str:
    """The merged model's answer (the base model's for None)."""
    url, name = references[model]
    return ask_named(url, api, name)[0]


def ask_named(url: str, api: str, name: str) -> tuple[str, str | None]:
    """One greedy request for model ``name`` on ``api`` through its SDK: the answer's text and the model it
    names."""
    if api == "messages":
        sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
        msg = sdk.messages.create(model=name, max_tokens=TOKENS, messages=MESSAGES, extra_body={"temperature": 0})
        return "".join(b.text for b in msg.content if b.type == "text"), msg.model
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    if api == "chat":
        out = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=TOKENS, temperature=0)
        return out.choices[0].message.content or "", out.model
    if api == "completions":
        text = client.completions.create(model=name, prompt="The capital of France", max_tokens=TOKENS,
                                         temperature=0)
        return text.choices[0].text, text.model
    resp = client.responses.create(model=name, input="Count to five", max_output_tokens=TOKENS, temperature=0,
                                   store=False)
    return resp.output_text, resp.model


APIS = ("chat", "completions", "responses", "messages")


def test_models_lists_the_adapters(lora_server, adapter_one):
    _, url = lora_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-llama", "one", "two"}
    assert models["one"].parent == "tiny-llama" and models["one"].root == str(adapter_one)
    assert getattr(models["tiny-llama"], "parent", None) is None
    assert client.models.retrieve("two").parent == "tiny-llama"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("three")


@pytest.mark.parametrize("api", APIS)
def test_each_api_answers_as_the_merged_model(lora_server, references, api):
    _, url = lora_server
    for model in ("one", "two", None):
        text, named = ask(url, api, model)
        assert named == (model or "tiny-llama")
        assert text == reference(references, api, model), (api, model)
    assert ask(url, api, "one")[0] != ask(url, api, "two")[0]  # the adapters change the answer


def test_mixed_requests_at_once(lora_server, references):
    """Every API, both adapters and the base model at the same time: one batch, each row its own model."""
    service, url = lora_server
    want = {(api, model): reference(references, api, model) for api in APIS for model in ("one", "two", None)}
    got: dict = {}
    barrier = threading.Barrier(len(want))

    def run(api: str, model: str | None) -> None:
        barrier.wait()
        got[(api, model)] = ask(url, api, model)[0]

    threads = [threading.Thread(target=run, args=key) for key in want]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == want
    assert service.engine.stats.max_batch_size > 1


def test_streamed_chunks_name_the_adapter(lora_server, references):
    _, url = lora_server
    with httpx.Client(base_url=url, timeout=60) as client:
        events = sse_data(client, "/v1/chat/completions", {"model": "two", "messages": MESSAGES,
                                                           "max_tokens": TOKENS, "temperature": 0})
    chunks = [e for e in events if e != "[DONE]"]
    assert {c["model"] for c in chunks} == {"two"}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == reference(references, "chat", "two")


def test_unknown_model_is_a_404_naming_what_is_served(lora_server):
    _, url = lora_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="three", messages=MESSAGES, max_tokens=2)
    body = err.value.body
    assert body["param"] == "model" and "tiny-llama, one, two" in body["message"]
    r = httpx.post(url + "/tokenize", json={"model": "three", "prompt": "hi"})
    assert r.status_code == 404
    assert httpx.post(url + "/tokenize", json={"model": "one", "prompt": "hi"}).status_code == 200


def test_metrics_count_each_served_model(lora_server):
    _, url = lora_server
    before = httpx.get(url + "/metrics").json()["models"]
    ask(url, "chat", "one")
    ask(url, "completions", "one")
    ask(url, "chat", None)
    metrics = httpx.get(url + "/metrics").json()
    after = metrics["models"]
    assert after["one"]["requests"] == before.get("one", {}).get("requests", 0) + 2
    assert after["one"]["completion_tokens"] > before.get("one", {}).get("completion_tokens", 0)
    assert after["tiny-llama"]["requests"] == before.get("tiny-llama", {}).get("requests", 0) + 1
    assert metrics["lora_adapters"]["loaded"] == ["one", "two"] and metrics["lora_adapters"]["memory_bytes"] > 0
    text = httpx.get(url + "/metrics", params={"format": "prometheus"}).text
    assert 'llmctl_model_requests_total{model="one"}' in text
    assert 'llmctl_model_generation_tokens_total{model="two"}' in text or "two" not in after
    assert "llmctl_lora_adapters 2.0" in text
    health = httpx.get(url + "/health").json()
    assert health["lora_adapters"]["loaded"] == ["one", "two"]
