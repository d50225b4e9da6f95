"""The OpenAI-compatible API on vLLM's engine (its CPU build, for real), through llmctl's own front.

One service per module: vLLM's engine is built once (``--enforce-eager``, so it does not compile)
and every test talks to it over HTTP on 127.0.0.1. Tests that need a request to be still running
when they act slow vLLM's real `step` down with a short sleep (`slow_steps`); the step itself runs.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
from contextlib import contextmanager

import httpx
import jsonschema
import pytest

from llmctl.engine import EngineConfig
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.server.service import Service
from llmctl.server.testing import serve_in_thread
from llmctl.server.tools import PARSERS
from tests.conftest import make_service
from tests.engine.test_engine import wait_for
from tests.server.test_structured_outputs import SCHEMAS, TOOLS
from tests.server.test_tool_parsers_apis import FAMILIES, SET_UNIT, forced_text_comes_back_as_calls

pytestmark = pytest.mark.vllm
USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def vllm_service(vllm_model):
    service = make_service(vllm_model, engine=EngineConfig(max_num_seqs=4, max_waiting=4, kv_cache_tokens=8192),
                           engine_options=VllmOptions(enforce_eager=True))
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def base_url(vllm_service):
    """The vLLM service on 127.0.0.1 (tests/conftest.py's `client` fixture talks to it)."""
    with serve_in_thread(vllm_service) as url:
        yield url


def chat(client, **body):
    body.setdefault("messages", USER)
    return client.post("/v1/chat/completions", json=body)


def content(response) -> str:
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["message"]["content"]


def stream_events(client, **body) -> list:
    body.setdefault("messages", USER)
    events = []
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@contextmanager
def slow_steps(service: Service, seconds: float):
    """Each of vLLM's engine steps takes ``seconds`` longer (the real step still runs)."""
    llm_engine = service.engine.vllm_engine
    real = llm_engine.step

    def step():
        time.sleep(seconds)
        return real()

    llm_engine.step = step
    try:
        yield
    finally:
        del llm_engine.step


def vllm_idle(service: Service) -> bool:
    """Nothing left inside vLLM: every request finished or was aborted there (its KV blocks freed)."""
    return service.engine.running == 0 and not service.engine.vllm_engine.has_unfinished_requests()


def kv_cache_usage(service: Service) -> float:
    """The share of KV blocks held by requests, read from vLLM's scheduler (its engine core runs in-process)."""
    return service.engine.vllm_engine.engine_core.engine_core.scheduler.kv_cache_manager.usage


def test_health_reports_the_vllm_engine(client, vllm_service):
    body = client.get("/health").json()
    assert body["status"] == "ready" and body["model"] == "tiny-llama"
    assert body["running"] == 0 and body["waiting"] == 0
    assert vllm_service.engine.kv_capacity_tokens >= 8192


def test_plain_and_streamed_answers_agree(client):
    r = chat(client, max_tokens=12, temperature=0, ignore_eos=True)
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 12
    events = stream_events(client, max_tokens=12, temperature=0, ignore_eos=True,
                           stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    pieces = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"][0]["delta"].get("content")]
    assert len(pieces) >= 6, "tokens must stream as they come, not as one blob"
    assert "".join(pieces) == body["choices"][0]["message"]["content"]
    assert events[-2]["usage"]["completion_tokens"] == 12


def test_end_of_sequence_ends_the_answer(client, vllm_service):
    """Without ignore_eos an answer may end early with 'stop'; then it counts the end token, as builtin does."""
    eos = next(iter(vllm_service.loaded.eos_token_ids))
    r = chat(client, max_tokens=20, temperature=0, logit_bias={str(eos): 100})
    body = r.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["choices"][0]["message"]["content"] == ""
    assert body["usage"]["completion_tokens"] == 1


def test_stop_string_is_not_included(client):
    base = content(chat(client, max_tokens=30, temperature=0, ignore_eos=True))
    assert len(base) > 6
    stop = base[3:6]
    expected = base[: base.index(stop)]
    r = chat(client, max_tokens=30, temperature=0, ignore_eos=True, stop=[stop])
    assert content(r) == expected and r.json()["choices"][0]["finish_reason"] == "stop"
    events = stream_events(client, max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == expected


def test_seed_makes_sampling_reproducible(client):
    first = content(chat(client, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    again = content(chat(client, max_tokens=20, temperature=1.0, seed=7, ignore_eos=True))
    other = content(chat(client, max_tokens=20, temperature=1.0, seed=8, ignore_eos=True))
    assert first == again
    assert other != first


def test_logit_bias_forces_a_token(client, vllm_service):
    tokenizer = vllm_service.loaded.tokenizer
    token = tokenizer.convert_tokens_to_ids(tokenizer.tokenize(" Paris"))[0]
    r = chat(client, max_tokens=5, temperature=0, ignore_eos=True, logit_bias={str(token): 100})
    assert content(r) == tokenizer.decode([token] * 5)


def test_logprobs_come_from_vllm(client):
    r = chat(client, max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3)
    entries = r.json()["choices"][0]["logprobs"]["content"]
    assert len(entries) == 6
    for entry in entries:
        tops = [t["logprob"] for t in entry["top_logprobs"]]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry["token"] == entry["top_logprobs"][0]["token"]
        assert entry["logprob"] == pytest.approx(tops[0], abs=1e-4)


def test_penalties_are_applied(client):
    plain = content(chat(client, max_tokens=40, temperature=0, ignore_eos=True))
    penalized = content(chat(client, max_tokens=40, temperature=0, ignore_eos=True, frequency_penalty=2.0,
                             presence_penalty=2.0))
    assert penalized != plain


def test_concurrent_requests_are_batched_and_all_answered(client, base_url, vllm_service):
    expected = content(chat(client, max_tokens=10, temperature=0, ignore_eos=True))

    def one(_):
        with httpx.Client(base_url=base_url, timeout=120) as c:
            return content(chat(c, max_tokens=10, temperature=0, ignore_eos=True))

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, range(8)))
    assert results == [expected] * 8
    assert vllm_service.engine.stats.max_batch_size >= 2, "vLLM never ran two requests in one step"


def test_timeout_answers_408_and_aborts_in_vllm(client, vllm_service):
    stats = vllm_service.engine.stats
    with slow_steps(vllm_service, 0.05):
        before = stats.tokens_generated
        r = chat(client, max_tokens=500, ignore_eos=True, timeout=0.5)
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        assert wait_for(lambda: vllm_idle(vllm_service), 60), "the request stayed in vLLM after its timeout"
        assert stats.tokens_generated - before < 100
        assert kv_cache_usage(vllm_service) == 0.0, "vLLM still holds KV blocks of the aborted request"


def test_client_disconnect_aborts_in_vllm(base_url, vllm_service):
    with slow_steps(vllm_service, 0.05):
        with httpx.stream("POST", base_url + "/v1/chat/completions", timeout=60, json={
                "messages": USER, "max_tokens": 500, "ignore_eos": True, "stream": True}) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 6:
                    break
        assert wait_for(lambda: vllm_idle(vllm_service), 60), "the sequence stayed in vLLM after the client left"
        assert kv_cache_usage(vllm_service) == 0.0


def test_full_queue_answers_429_at_once(base_url, vllm_service):
    """4 run and 4 wait; what arrives while the queue is full is turned away at once, with Retry-After."""
    def send(_):
        started = time.monotonic()
        r = httpx.post(base_url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 60, "ignore_eos": True},
                       timeout=120)
        return r.status_code, r.headers.get("Retry-After"), time.monotonic() - started

    with slow_steps(vllm_service, 0.02), concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(16)))
    accepted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(accepted) >= 8 and refused and len(accepted) + len(refused) == 16, results
    assert all(retry == "1" for _, retry, _ in refused), refused
    # At once: every refusal came before any accepted request could finish (60 steps of at least 0.02 s each).
    assert max(elapsed for *_, elapsed in refused) < min(elapsed for *_, elapsed in accepted), results


def test_metrics_report_vllm_counts(client, vllm_service):
    chat(client, max_tokens=3)
    body = client.get("/metrics").json()
    assert body["model_loaded"] is True and body["requests_total"] >= 1
    assert body["engine_steps"] >= 3 and body["max_batch_size_seen"] >= 1
    for key in ("running", "waiting", "kv_cache_usage", "prefix_cache"):
        assert key in body, key
    # The same prompt again: vLLM's prefix cache finds its blocks.
    long_prompt = [{"role": "user", "content": "count " * 300}]
    chat(client, messages=long_prompt, max_tokens=2)
    hits = vllm_service.engine.stats.prefix_cache_hits
    chat(client, messages=long_prompt, max_tokens=2)
    assert vllm_service.engine.stats.prefix_cache_hits > hits
    cache = client.get("/metrics").json()["prefix_cache"]
    assert cache["hits_tokens_total"] == vllm_service.engine.stats.prefix_cache_hits > 0
    assert 0 < cache["hit_rate"] <= 1
    text = client.get("/metrics", params={"format": "prometheus"}).text
    assert "llmctl_requests_total" in text and "llmctl_generation_tokens_total" in text


def test_openai_sdk_unchanged(base_url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    name = sdk.models.list().data[0].id
    completion = sdk.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0)
    assert completion.choices[0].message.role == "assistant" and completion.usage.completion_tokens >= 1
    stream = sdk.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == completion.choices[0].message.content
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=name, messages=USER, temperature=5)
    assert info.value.body["param"] == "temperature"


# ---- structured outputs: vLLM's guidance backend (llguidance, as on the builtin engine) -------------------------
@pytest.mark.parametrize("name", SCHEMAS)
def test_json_schema_answers_validate_plain_and_streamed(client, name):
    schema = SCHEMAS[name]
    fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    for seed in range(3):
        r = chat(client, max_tokens=200, temperature=1.0, seed=seed, response_format=fmt, n=2)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:  # n > 1: each choice follows the schema on its own
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    events = stream_events(client, max_tokens=200, temperature=1.0, seed=5, response_format=fmt)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    jsonschema.validate(json.loads(text), schema)
    # llmctl's JSON layout (json.dumps' separators, no other whitespace) on both engines.
    assert json.dumps(json.loads(text), ensure_ascii=False) == text


def test_regex_choice_and_json_object(client):
    pattern = r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)"
    assert re.fullmatch(pattern, content(chat(client, max_tokens=30, temperature=1.0, seed=1,
                                              structured_outputs={"regex": pattern})))
    options = ["yes", "no", "it depends"]
    assert content(chat(client, max_tokens=10, temperature=1.0, seed=2, structured_outputs={"choice": options})) \
        in options
    assert isinstance(json.loads(content(chat(client, max_tokens=200, temperature=1.0, seed=3,
                                              response_format={"type": "json_object"}))), dict)


def test_enforced_tool_choice_gives_a_valid_call(client):
    r = chat(client, max_tokens=200, temperature=1.0, seed=4, tools=TOOLS,
             tool_choice={"type": "function", "function": {"name": "add"}})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[1]["function"]["parameters"])


def test_an_uncompilable_schema_is_a_400_naming_the_field(client, vllm_service):
    steps = vllm_service.engine.stats.steps
    r = chat(client, max_tokens=5, structured_outputs={"regex": "[a-"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.regex", r.text
    assert vllm_service.engine.stats.steps == steps  # refused before reaching vLLM


def test_the_other_apis_run_on_vllm_with_the_same_text(client, base_url):
    """Legacy completions, the Responses API and Anthropic's messages share the pipeline: on vLLM they
    give the chat route's greedy text for the same prompt."""
    expected = content(chat(client, max_tokens=6, temperature=0, ignore_eos=True))
    r = client.post("/v1/responses", json={"input": USER[0]["content"], "max_output_tokens": 6, "temperature": 0,
                                           "ignore_eos": True})
    assert r.status_code == 200, r.text
    assert r.json()["output"][0]["content"][0]["text"] == expected
    r = client.post("/v1/messages", json={"messages": USER, "max_tokens": 6, "temperature": 0, "ignore_eos": True,
                                          "model": client.get("/v1/models").json()["data"][0]["id"]})
    assert r.status_code == 200, r.text
    assert r.json()["content"][0]["text"] == expected
    r = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "n": 2, "temperature": 0})
    assert r.status_code == 200, r.text
    texts = [c["text"] for c in r.json()["choices"]]
    assert len(texts) == 2 and texts[0] == texts[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_tool_calls_of_every_family_are_parsed_from_vllm_output(family, base_url, vllm_service, monkeypatch):
    forced_text_comes_back_as_calls(base_url, vllm_service, monkeypatch, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_an_enforced_call_on_vllm_is_written_in_the_family_format(family, client, vllm_service, monkeypatch):
    monkeypatch.setattr(vllm_service, "tool_format", PARSERS[family])
    r = chat(client, max_tokens=200, temperature=1.0, seed=4, tools=SET_UNIT, tool_choice="required",
             parallel_tool_calls=False)
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "set_unit"
    jsonschema.validate(json.loads(call["function"]["arguments"]), SET_UNIT[0]["function"]["parameters"])


def test_responses_and_messages_enforce_tool_choice_on_vllm(client):
    """tool_choice on /v1/responses and /v1/messages reaches vLLM as the same grammar as chat's."""
    schema = SET_UNIT[0]["function"]["parameters"]
    r = client.post("/v1/responses", json={"input": "Unit?", "max_output_tokens": 200, "temperature": 1.0,
                                           "tools": [{"type": "function", "name": "set_unit", "parameters": schema}],
                                           "tool_choice": {"type": "function", "name": "set_unit"}})
    assert r.status_code == 200, r.text
    (call,) = r.json()["output"]
    assert call["type"] == "function_call" and call["name"] == "set_unit"
    jsonschema.validate(json.loads(call["arguments"]), schema)
    r = client.post("/v1/messages", json={"messages": USER, "max_tokens": 200, "temperature": 1.0,
                                          "tools": [{"name": "set_unit", "input_schema": schema}],
                                          "tool_choice": {"type": "any", "disable_parallel_tool_use": True}})
    assert r.status_code == 200, r.text
    assert r.json()["stop_reason"] == "tool_use"
    (use,) = r.json()["content"]
    jsonschema.validate(use["input"], schema)


def test_a_call_cut_by_max_tokens_is_not_a_call_on_vllm(client):
    """"required" with parallel calls and a max_tokens too small for a whole call: "length", no markup."""
    r = chat(client, max_tokens=8, temperature=1.0, seed=7, tools=SET_UNIT, tool_choice="required")
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls")
    assert "<tool_call>" not in (choice["message"]["content"] or "")
