"""The OpenAI-compatible endpoints against a real server on 127.0.0.1 running a tiny model."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest

from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service, sse_data

USER = [{"role": "user", "content": "Hello there"}]


def chat(client, **body):
    body.setdefault("messages", USER)
    return client.post("/v1/chat/completions", json=body)


def stream_events(client, **body) -> list:
    body.setdefault("messages", USER)
    return sse_data(client, "/v1/chat/completions", body)


def test_health_ready(client, tiny_service):
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ready"
    assert body["model"] == tiny_service.loaded.name == "tiny-llama"
    for key in ("device", "cuda_available", "cuda_device_count", "memory_allocated_gb", "memory_reserved_gb"):
        assert key in body
    assert body["device"] == "cpu" and body["cuda_available"] is False


def test_answers_match_the_documented_schemas(client):
    """docs/openapi.json describes the answers with these models; unknown fields are forbidden in them."""
    from llmctl.server.api import chat_models, status

    status.Health.model_validate(client.get("/health").json())
    status.ModelList.model_validate(client.get("/v1/models").json())
    status.Model.model_validate(client.get("/v1/models/tiny-llama").json())
    chat_models.ChatCompletion.model_validate(chat(client, max_tokens=3).json())
    events = stream_events(client, max_tokens=3, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chat_models.ChatCompletionChunk.model_validate(event)


def test_models(client):
    body = client.get("/v1/models").json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["tiny-llama"]


def test_plain_completion_shape(client):
    r = chat(client, max_tokens=8, temperature=0)
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tiny-llama" and isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    usage = body["usage"]
    assert usage["prompt_tokens"] > 0 and 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_ignore_eos_runs_to_max_tokens(client):
    body = chat(client, max_tokens=20, temperature=0, ignore_eos=True).json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 20


def test_greedy_is_deterministic_and_max_completion_tokens(client):
    a = chat(client, max_tokens=12, temperature=0).json()
    b = chat(client, max_completion_tokens=12, temperature=0).json()
    assert a["choices"][0]["message"] == b["choices"][0]["message"]


def test_seed_makes_sampling_reproducible(client):
    bodies = [chat(client, max_tokens=16, temperature=1.0, seed=42, ignore_eos=True).json() for _ in range(2)]
    assert bodies[0]["choices"][0]["message"] == bodies[1]["choices"][0]["message"]


def test_unknown_fields_are_ignored(client):
    r = chat(client, max_tokens=4, user="u1", parallel_tool_calls=False, metadata={"x": 1}, store=False,
             some_future_field={"a": [1, 2]}, model="tiny-llama")
    assert r.status_code == 200, r.text


def test_content_parts_and_roles(client):
    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": " there"}]},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": "Again"},
    ]
    assert chat(client, messages=messages, max_tokens=4).status_code == 200


def test_stop_sequence_is_not_included(client):
    base = chat(client, max_tokens=30, temperature=0, ignore_eos=True).json()["choices"][0]["message"]["content"]
    assert len(base) > 6
    stop = base[3:6]
    expected = base[: base.index(stop)]
    plain = chat(client, max_tokens=30, temperature=0, ignore_eos=True, stop=[stop, "\x00never"]).json()
    assert plain["choices"][0]["message"]["content"] == expected
    assert plain["choices"][0]["finish_reason"] == "stop"
    events = stream_events(client, max_tokens=30, temperature=0, ignore_eos=True, stop=stop)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert text == expected
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_streaming_chunks_and_usage(client):
    events = stream_events(client, max_tokens=12, temperature=0, ignore_eos=True,
                           stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("content")]
    assert len(content) >= 6, "tokens must arrive as separate chunks, not one buffered blob"
    final = chunks[-2]
    assert final["choices"][0]["finish_reason"] == "length"
    usage_chunk = chunks[-1]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    plain = chat(client, max_tokens=12, temperature=0, ignore_eos=True).json()
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert streamed == plain["choices"][0]["message"]["content"]


def test_stream_without_usage_has_no_usage_chunk(client):
    events = stream_events(client, max_tokens=4)
    assert events[-1] == "[DONE]"
    assert all("usage" not in e for e in events[:-1])


def test_concurrent_requests_are_all_answered(client, base_url):
    expected = chat(client, max_tokens=10, temperature=0, ignore_eos=True).json()["choices"][0]["message"]

    def one(_):
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return chat(c, max_tokens=10, temperature=0, ignore_eos=True).json()["choices"][0]["message"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(one, range(24)))
    assert all(r == expected for r in results)


def test_metrics_json(client):
    chat(client, max_tokens=3)
    body = client.get("/metrics").json()
    for key in ("service", "model_loaded", "model_name", "device", "gpu_memory_allocated_gb",
                "gpu_memory_reserved_gb", "gpu_name", "requests_total", "completion_tokens_total",
                "latency_s", "time_to_first_token_s", "uptime_s", "process_rss_gb", "engine_tokens_per_second"):
        assert key in body
    assert body["service"] == "llmctl" and body["model_loaded"] is True
    assert body["requests_total"] >= 1 and body["completion_tokens_total"] >= 1


def test_metrics_prometheus(client):
    chat(client, max_tokens=3)
    r = client.get("/metrics", params={"format": "prometheus"})
    assert r.headers["content-type"].startswith("text/plain")
    assert "llmctl_generation_tokens_total" in r.text
    assert "llmctl_time_to_first_token_seconds_bucket" in r.text
    r = client.get("/metrics", headers={"Accept": "text/plain;version=0.0.4;q=0.9,*/*;q=0.1"})
    assert "llmctl_requests_total" in r.text
    assert r.headers["content-type"].count("charset") == 1
    # Prometheus 3 asks for OpenMetrics first: it gets OpenMetrics, ending in '# EOF'.
    r = client.get("/metrics", headers={
        "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


def test_openai_sdk_unchanged(base_url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    models = sdk.models.list()
    name = models.data[0].id
    assert sdk.models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        sdk.models.retrieve("gpt-4o")
    completion = sdk.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0)
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens >= 1
    stream = sdk.chat.completions.create(model=name, messages=USER, max_tokens=8, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == completion.choices[0].message.content
    assert usage.completion_tokens == completion.usage.completion_tokens
    with pytest.raises(openai.NotFoundError):
        sdk.chat.completions.create(model="gpt-4o", messages=USER)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model=name, messages=USER, temperature=5)
    assert info.value.body["param"] == "temperature"


def test_no_chat_template_falls_back(tmp_path, caplog):
    from llmctl.server.testing import build_tiny_model

    folder = build_tiny_model(tmp_path / "plain", chat_template=False)
    service = make_service(folder)
    try:
        assert "has no chat template" in caplog.text
        with serve_in_thread(service) as url, httpx.Client(base_url=url, timeout=30) as c:
            r = chat(c, max_tokens=4)
            assert r.status_code == 200
    finally:
        service.shutdown()


def test_top_p_zero_keeps_only_the_most_likely_token(client):
    """OpenAI accepts top_p 0; some clients send it to mean greedy."""
    greedy = chat(client, max_tokens=12, temperature=0, ignore_eos=True).json()["choices"][0]["message"]
    for seed in (1, 2):
        r = chat(client, max_tokens=12, temperature=1.5, top_p=0, seed=seed, ignore_eos=True)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"] == greedy


def test_an_agents_tool_history_reaches_the_chat_template(tiny_service):
    """Assistant tool calls (arguments as objects, as templates expect them) and tool results with their
    call ids are handed to the model's chat template, not dropped."""
    import copy
    from types import SimpleNamespace

    from llmctl.server.api.chat_models import ChatCompletionRequest
    from llmctl.server.api.prompts import build_prompt
    from llmctl.server.api.validation import parse_body

    tokenizer = copy.deepcopy(tiny_service.loaded.tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}[{{ m.role }}]{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<call {{ c.function.name }} city={{ c.function.arguments.city }}>"
        "{% endfor %}{% if m.tool_call_id %}<result of {{ m.tool_call_id }}>{% endif %}{% endfor %}")
    request = parse_body(ChatCompletionRequest, {"messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ], "tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]})
    ids = build_prompt(SimpleNamespace(tokenizer=tokenizer), request)
    text = tokenizer.decode(ids)
    assert "<call get_weather city=Paris>" in text and "[tool]sunny<result of c1>" in text


def test_tool_history_is_accepted_by_the_server(client):
    r = chat(client, max_tokens=3, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": "not json"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ])
    assert r.status_code == 200, r.text
