"""What every API shares through the one pipeline: n choices, timeouts (408), a full queue (429), batching
across routes, metrics by route, and /tokenize, /detokenize. Real server on 127.0.0.1, tiny model."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import httpx
import pytest

from llmctl.engine import EngineConfig
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service, slow_down, slow_serving, wait_for

USER = [{"role": "user", "content": "Hello there"}]
# One request per route, each asking for about `tokens` tokens.
ROUTES = {
    "/v1/chat/completions": lambda tokens, **kw: {"messages": USER, "max_tokens": tokens, **kw},
    "/v1/completions": lambda tokens, **kw: {"prompt": "Hello there", "max_tokens": tokens, **kw},
    "/v1/responses": lambda tokens, **kw: {"input": "Hello there", "max_output_tokens": tokens, **kw},
    "/v1/messages": lambda tokens, **kw: {"messages": USER, "max_tokens": tokens, **kw},
}


@pytest.fixture()
def slow_server(tiny_model):
    with slow_serving(tiny_model, 0.02, EngineConfig(max_num_seqs=8, max_waiting=2, kv_cache_tokens=8192)) as server:
        yield server


# ---- n choices -------------------------------------------------------------------------------
def test_n_choices_are_prefilled_once_and_sampled_apart(client, tiny_service):
    stats = tiny_service.engine.stats
    prefills, prompt_tokens = stats.prefills, stats.prompt_tokens
    body = client.post("/v1/chat/completions", json={"messages": USER, "n": 4, "max_tokens": 12, "seed": 7,
                                                     "ignore_eos": True, "temperature": 1.0}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert stats.prefills == prefills + 1, "the prompt was prefilled more than once"
    assert stats.prompt_tokens - prompt_tokens == body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 48
    texts = [c["message"]["content"] for c in body["choices"]]
    assert len(set(texts)) > 1, "choices were not sampled independently"
    again = client.post("/v1/chat/completions", json={"messages": USER, "n": 4, "max_tokens": 12, "seed": 7,
                                                      "ignore_eos": True, "temperature": 1.0}).json()
    assert [c["message"]["content"] for c in again["choices"]] == texts, "seeded choices are not reproducible"
    single = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 12, "seed": 7,
                                                       "ignore_eos": True, "temperature": 1.0}).json()
    assert single["choices"][0]["message"]["content"] == texts[0], "choice 0 of n uses the seed itself"


def test_n_greedy_choices_are_identical(client):
    body = client.post("/v1/completions", json={"prompt": "Hello", "n": 3, "max_tokens": 6, "temperature": 0}).json()
    assert len({c["text"] for c in body["choices"]}) == 1


def test_n_streamed_chunks_carry_their_index(client):
    chunks = []
    with client.stream("POST", "/v1/chat/completions", json={
            "messages": USER, "n": 3, "max_tokens": 6, "seed": 1, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    texts, finished = ["", "", ""], {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            texts[choice["index"]] += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finished[choice["index"]] = choice["finish_reason"]
    assert finished == {0: "length", 1: "length", 2: "length"}
    assert chunks[-1]["usage"]["completion_tokens"] == 18
    plain = client.post("/v1/chat/completions", json={"messages": USER, "n": 3, "max_tokens": 6, "seed": 1,
                                                      "ignore_eos": True}).json()
    assert texts == [c["message"]["content"] for c in plain["choices"]]


def test_n_above_the_batch_is_a_400(client, tiny_service):
    slots = tiny_service.engine.config.max_num_seqs
    r = client.post("/v1/chat/completions", json={"messages": USER, "n": slots + 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


# ---- limits shared by every route ------------------------------------------------------------
@pytest.mark.parametrize("route", list(ROUTES))
def test_timeout_is_408_on_every_route(slow_server, route):
    service, url = slow_server
    body = ROUTES[route](200, timeout=0.5, ignore_eos=True)
    r = httpx.post(url + route, json=body, timeout=30)
    assert r.status_code == 408, r.text
    assert r.json()["error"]["type"] == "timeout_error"
    assert r.headers["x-should-retry"] == "false", "the SDKs would run the request twice more"
    if route == "/v1/messages":
        assert r.json()["type"] == "error"
    assert wait_for(lambda: service.engine.running == 0)


@pytest.mark.parametrize("route", list(ROUTES))
def test_full_queue_is_429_on_every_route(slow_server, route):
    service, url = slow_server
    body = ROUTES[route](60, timeout=30, ignore_eos=True)

    def send(_):
        return httpx.post(url + route, json=body, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(16)))
    statuses = [r.status_code for r in results]
    assert 429 in statuses and 200 in statuses and set(statuses) == {200, 429}, statuses
    refused = next(r for r in results if r.status_code == 429)
    assert refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error"


def test_routes_share_decode_steps(tiny_model):
    """Requests on different routes run in the same batch: the engine saw them all at once."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, max_waiting=16, kv_cache_tokens=8192))
    slow_down(service, 0.02)
    barrier = threading.Barrier(len(ROUTES))

    def send(route):
        barrier.wait()
        return httpx.post(url + route, json=ROUTES[route](40, timeout=30, ignore_eos=True), timeout=60).status_code

    try:
        with serve_in_thread(service) as url, concurrent.futures.ThreadPoolExecutor(len(ROUTES)) as pool:
            statuses = list(pool.map(send, ROUTES))
    finally:
        service.shutdown()
    assert statuses == [200] * len(ROUTES)
    assert service.engine.stats.max_batch_size == len(ROUTES), service.engine.stats.max_batch_size


def test_metrics_count_requests_by_route(client):
    before = client.get("/metrics").json()["requests_by_route"]
    for route, make in ROUTES.items():
        client.post(route, json=make(2))
    client.post("/v1/completions", json={"prompt": "x", "suffix": "y"})
    after = client.get("/metrics").json()["requests_by_route"]
    for route in ROUTES:
        assert after[route] - before.get(route, 0) == (2 if route == "/v1/completions" else 1), route
    text = client.get("/metrics", params={"format": "prometheus"}).text
    assert 'llmctl_requests_total{route="/v1/messages",status="200"}' in text




# ---- tokenize ---------------------------------------------------------------------------------
def test_tokenize_and_detokenize(client, tiny_service):
    prompt = client.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True}).json()
    assert prompt["count"] == len(prompt["tokens"]) == len(prompt["token_strs"]) > 0
    assert prompt["max_model_len"] == tiny_service.loaded.context_length
    assert "".join(prompt["token_strs"]) == "Hello there"
    assert client.post("/detokenize", json={"tokens": prompt["tokens"]}).json() == {"prompt": "Hello there"}
    chat = client.post("/tokenize", json={"messages": USER}).json()
    usage = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 1}).json()["usage"]
    assert chat["count"] == usage["prompt_tokens"] and chat["token_strs"] is None


@pytest.mark.parametrize("path, body", [
    ("/tokenize", {}),
    ("/tokenize", {"prompt": "x", "messages": USER}),
    ("/tokenize", {"messages": [{"role": "nobody", "content": "x"}]}),
    ("/detokenize", {"tokens": [10**9]}),
    ("/detokenize", {"tokens": ["a"]}),
    ("/detokenize", {}),
])
def test_tokenize_bad_input_is_400(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
