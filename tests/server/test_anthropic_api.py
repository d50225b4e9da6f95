"""POST /v1/messages and /v1/messages/count_tokens against a real server on 127.0.0.1, with the anthropic SDK."""

from __future__ import annotations

import anthropic
import httpx
import pytest

from llmctl.errors import InvalidRequest
from llmctl.server.api.anthropic import chat_tools
from llmctl.server.api.anthropic_models import AnthropicError, AnthropicMessage, MessagesRequest
from llmctl.server.api.prompts import anthropic_messages
from llmctl.server.api.validation import parse_body
from llmctl.server.testing import serve_in_thread

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture()
def sdk(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)


# ---- mapping ---------------------------------------------------------------------------------
def test_blocks_become_chat_messages():
    req = parse_body(MessagesRequest, {"max_tokens": 5, "system": [{"type": "text", "text": "Be brief."}],
                                               "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                          {"type": "text", "text": "Checking."},
                                          {"type": "tool_use", "id": "t1", "name": "get_weather",
                                           "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                      "content": [{"type": "text", "text": "18 C"}]},
                                     {"type": "text", "text": "And tomorrow?"}]},
    ]})
    messages = anthropic_messages(req)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "user"]
    assert messages[0]["content"] == "Be brief."
    assert messages[2]["content"] == "Checking."
    assert messages[2]["tool_calls"] == [{"id": "t1", "type": "function", "function": {
        "name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[3] == {"role": "tool", "content": "18 C", "tool_call_id": "t1"}
    assert messages[4]["content"] == "And tomorrow?"


def _tools(**body) -> tuple:
    return chat_tools(parse_body(MessagesRequest, {"max_tokens": 5, "messages": USER, **body}))


def test_tools_map_and_server_tools_are_refused():
    tools, choice = _tools(tools=[{"name": "f", "description": "d", "input_schema": {"type": "object"}}])
    assert tools == [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"}}]
    assert (choice.mode, choice.forced, choice.parallel) == ("auto", False, True)
    with pytest.raises(InvalidRequest, match="server tools"):
        _tools(tools=[{"type": "web_search_20250305", "name": "web_search"}])


@pytest.mark.parametrize(("tool_choice", "mode", "name", "parallel"), [
    ({"type": "any"}, "required", None, True),
    ({"type": "tool", "name": "g", "disable_parallel_tool_use": True}, "required", "g", False),
    ({"type": "auto", "disable_parallel_tool_use": True}, "auto", None, False),
    ({"type": "none"}, "none", None, True),
])
def test_tool_choice_maps_onto_the_shared_tool_use(tool_choice, mode, name, parallel):
    tools = [{"name": n, "input_schema": {"type": "object"}} for n in ("f", "g")]
    _, choice = _tools(tools=tools, tool_choice=tool_choice)
    assert (choice.mode, choice.name, choice.parallel) == (mode, name, parallel)


@pytest.mark.parametrize(("body", "words"), [
    ({"tool_choice": {"type": "any"}}, "no 'tools'"),
    ({"tools": [{"name": "f"}], "tool_choice": {"type": "tool", "name": "g"}}, "'g'"),
    ({"tools": [{"name": "f"}], "tool_choice": {"type": "sometimes"}}, "tool_choice must be"),
    ({"tools": [{"name": "f", "input_schema": [1]}]}, r"tools\[0\].input_schema"),
])
def test_unusable_tool_choice_is_a_400(body, words):
    with pytest.raises(InvalidRequest, match=words) as info:
        _tools(**body)
    assert info.value.status == 400


# ---- the routes ------------------------------------------------------------------------------
def test_sdk_plain_message(sdk, client):
    out = sdk.messages.create(model="tiny-llama", max_tokens=6, messages=USER, extra_body={"temperature": 0})
    assert out.type == "message" and out.role == "assistant" and out.id.startswith("msg_")
    assert out.content[0].type == "text" and isinstance(out.content[0].text, str)
    assert out.stop_reason in ("end_turn", "max_tokens")
    assert out.usage.input_tokens > 0 and 1 <= out.usage.output_tokens <= 6
    body = client.post("/v1/messages", json={"max_tokens": 3, "messages": USER, "system": "Be brief.",
                                             "top_k": 5}).json()
    AnthropicMessage.model_validate(body)


def test_sdk_count_tokens_matches_usage(sdk):
    counted = sdk.messages.count_tokens(model="tiny-llama", messages=USER, system="Be brief.")
    out = sdk.messages.create(model="tiny-llama", max_tokens=2, messages=USER, system="Be brief.")
    assert counted.input_tokens == out.usage.input_tokens > 0


def test_stop_sequence_is_reported(client):
    """The stop sequence is the text the greedy answer would have continued with."""
    body = {"max_tokens": 12, "messages": USER, "temperature": 0}
    full = client.post("/v1/messages", json=body).json()["content"][0]["text"]
    stop = full[2:4]
    if len(stop) < 2 or not stop.strip():
        pytest.skip(f"the tiny model's answer {full!r} has no usable stop string")
    out = client.post("/v1/messages", json={**body, "stop_sequences": [stop]}).json()
    assert out["stop_reason"] == "stop_sequence" and out["stop_sequence"] == stop
    assert out["content"][0]["text"] == full[:full.index(stop)]


def test_sdk_stream_event_sequence(sdk):
    plain = sdk.messages.create(model="tiny-llama", max_tokens=8, messages=USER, extra_body={"temperature": 0})
    with sdk.messages.stream(model="tiny-llama", max_tokens=8, messages=USER,
                             extra_body={"temperature": 0}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    raw = [k for k in kinds if k in ("content_block_start", "content_block_delta", "content_block_stop",
                                     "message_delta")]
    assert raw[0] == "content_block_start" and raw[-2:] == ["content_block_stop", "message_delta"]
    assert final.content[0].text == plain.content[0].text
    assert final.stop_reason == plain.stop_reason and final.usage.output_tokens == plain.usage.output_tokens


@pytest.mark.parametrize("body, kind", [
    ({"messages": USER}, "invalid_request_error"),  # max_tokens is required
    ({"max_tokens": 5, "messages": USER, "temperature": 1.5}, "invalid_request_error"),
    ({"max_tokens": 5, "messages": []}, "invalid_request_error"),
    ({"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "invalid_request_error"),
    ({"max_tokens": 5, "messages": USER, "tools": [{"type": "bash_20250124", "name": "bash"}]},
     "invalid_request_error"),
    ({"max_tokens": 5, "messages": USER, "model": "claude-nope"}, "not_found_error"),
])
def test_errors_use_anthropics_envelope(client, body, kind):
    r = client.post("/v1/messages", json=body)
    assert r.status_code == (404 if kind == "not_found_error" else 400), r.text
    AnthropicError.model_validate(r.json())
    assert r.json()["error"]["type"] == kind
    assert "traceback" not in r.text.lower()


def test_transport_errors_use_anthropics_envelope(client):
    r = client.post("/v1/messages", content=b"{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["type"] == "error"
    r = client.get("/v1/messages")
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/messages/nope", json={})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_sdk_raises_typed_errors(sdk):
    with pytest.raises(anthropic.BadRequestError):
        sdk.messages.create(model="tiny-llama", max_tokens=5, messages=USER, extra_body={"temperature": 3})
    with pytest.raises(anthropic.NotFoundError):
        sdk.messages.create(model="claude-nope", max_tokens=5, messages=USER)


def test_x_api_key_is_accepted_like_bearer(tiny_service):
    with serve_in_thread(tiny_service, api_keys=("sekret",)) as url:
        out = anthropic.Anthropic(base_url=url, api_key="sekret", max_retries=0).messages.create(
            model="tiny-llama", max_tokens=2, messages=USER)
        assert out.type == "message"
        with pytest.raises(anthropic.AuthenticationError):
            anthropic.Anthropic(base_url=url, api_key="wrong", max_retries=0).messages.create(
                model="tiny-llama", max_tokens=2, messages=USER)
        r = httpx.post(url + "/v1/messages", json={"max_tokens": 2, "messages": USER})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        r = httpx.post(url + "/v1/chat/completions", headers={"x-api-key": "sekret"},
                       json={"max_tokens": 2, "messages": USER})
        assert r.status_code == 200
