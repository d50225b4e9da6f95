"""POST /v1/responses against a real server on 127.0.0.1, with the openai SDK, and its input mapping."""

from __future__ import annotations

import json

import openai
import pytest

from llmctl.errors import InvalidRequest
from llmctl.server.api import responses_models
from llmctl.server.api.prompts import responses_messages
from llmctl.server.api.responses_api import function_tools, structured_format
from llmctl.server.api.responses_models import ResponsesRequest
from llmctl.server.api.validation import parse_body


@pytest.fixture()
def sdk(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def events_of(client, **body) -> list[tuple[str, dict]]:
    out, name = [], None
    with client.stream("POST", "/v1/responses", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                assert data["type"] == name
                out.append((name, data))
    return out


# ---- mapping ---------------------------------------------------------------------------------
def test_input_items_become_chat_messages():
    req = parse_body(ResponsesRequest, {"instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_time", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "18 C"},
        {"type": "function_call_output", "call_id": "c2", "output": [{"type": "input_text", "text": "noon"}]},
        {"type": "reasoning", "summary": []},
    ]})
    messages = [m.for_template() for m in responses_messages(req)]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool", "tool"]
    assert messages[0]["content"] == "Be brief."
    assert messages[2]["content"] == "Checking."
    assert [c["function"]["name"] for c in messages[2]["tool_calls"]] == ["get_weather", "get_time"]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[3] == {"role": "tool", "content": "18 C", "tool_call_id": "c1"}
    assert messages[4]["content"] == "noon"


def test_a_call_without_text_before_it_opens_an_assistant_turn():
    req = parse_body(ResponsesRequest, {"input": [
        {"role": "user", "content": "Hi"},
        {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}]})
    messages = [m.for_template() for m in responses_messages(req)]
    assert messages[1]["role"] == "assistant" and messages[1]["content"] == ""
    assert messages[1]["tool_calls"][0]["id"] == "c1"


def _tools(**body) -> tuple:
    return function_tools(parse_body(ResponsesRequest, {"input": "hi", **body}))


def test_function_tools_map_and_built_in_tools_are_refused():
    tools, choice = _tools(tools=[{"type": "function", "name": "f", "description": "d",
                                   "parameters": {"type": "object"}, "strict": True}], tool_choice="auto")
    assert tools == [{"type": "function", "function": {"name": "f", "description": "d",
                                                       "parameters": {"type": "object"}}}]
    assert choice.mode == "auto" and choice.functions[0].strict
    with pytest.raises(InvalidRequest, match="built-in"):
        _tools(tools=[{"type": "web_search"}])
    with pytest.raises(InvalidRequest, match="built-in"):
        _tools(tool_choice={"type": "file_search"})


@pytest.mark.parametrize(("tool_choice", "mode", "name", "allowed"), [
    ("required", "required", None, ["f", "g"]),
    ({"type": "function", "name": "g"}, "required", "g", ["f", "g"]),
    ({"type": "allowed_tools", "mode": "required", "tools": [{"type": "function", "name": "g"}]},
     "required", None, ["g"]),
    ("none", "none", None, ["f", "g"]),
])
def test_tool_choice_maps_onto_the_shared_tool_use(tool_choice, mode, name, allowed):
    tools = [{"type": "function", "name": n, "parameters": {"type": "object"}} for n in ("f", "g")]
    _, choice = _tools(tools=tools, tool_choice=tool_choice, parallel_tool_calls=False)
    assert (choice.mode, choice.name, choice.parallel) == (mode, name, False)
    assert [f.name for f in choice.functions] == allowed


@pytest.mark.parametrize(("body", "words"), [
    ({"tool_choice": "required"}, "no 'tools'"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}}, "'g'"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function"}}, "tool_choice must be"),
    ({"tools": [{"type": "function", "name": "f", "parameters": "x"}]}, r"tools\[0\].parameters"),
    ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "allowed_tools", "mode": "required",
                                                                    "tools": [{"type": "function", "name": "g"}]}},
     r"\['g'\], which are not in 'tools'"),
])
def test_unusable_tool_choice_is_a_400(body, words):
    with pytest.raises(InvalidRequest, match=words) as info:
        _tools(**body)
    assert info.value.status == 400


def test_text_format_hook():
    assert structured_format(None) is None and structured_format({"format": {"type": "text"}}) is None
    # The Responses API's flat shape: name/schema next to "type".
    constraint = structured_format({"format": {"type": "json_schema", "name": "x", "schema": {"type": "integer"}}})
    assert constraint.kind == "json" and json.loads(constraint.spec) == {"type": "integer"}
    with pytest.raises(InvalidRequest, match="xml") as info:
        structured_format({"format": {"type": "xml"}})
    assert info.value.param == "text.format.type"


# ---- the route -------------------------------------------------------------------------------
def test_sdk_plain_response(sdk, client):
    out = sdk.responses.create(model="tiny-llama", input="Hello there", max_output_tokens=6, temperature=0)
    assert out.object == "response" and out.status in ("completed", "incomplete")
    assert out.output[0].type == "message" and isinstance(out.output_text, str)
    assert out.usage.input_tokens > 0 and 1 <= out.usage.output_tokens <= 6
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    body = client.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 3, "temperature": 0,
                                              "ignore_eos": True, "instructions": "Be brief."}).json()
    responses_models.Response.model_validate(body)
    assert body["instructions"] == "Be brief."


def test_max_output_tokens_makes_it_incomplete(client):
    body = client.post("/v1/responses", json={"input": "Hello", "max_output_tokens": 2, "ignore_eos": True}).json()
    assert body["status"] == "incomplete" and body["usage"]["output_tokens"] == 2
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert body["output"][0]["status"] == "incomplete"


def test_sdk_stream_event_sequence(sdk, client):
    plain = sdk.responses.create(model="tiny-llama", input="Count to five", max_output_tokens=8, temperature=0)
    events = list(sdk.responses.create(model="tiny-llama", input="Count to five", max_output_tokens=8,
                                       temperature=0, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    order = ["response.output_item.added", "response.content_part.added", "response.output_text.delta",
             "response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert [k for k in dict.fromkeys(kinds) if k in order] == order
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == plain.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == plain.usage.output_tokens
    raw = events_of(client, input="Hi", max_output_tokens=3)
    responses_models.Response.model_validate(raw[-1][1]["response"])
    responses_models.Response.model_validate(raw[0][1]["response"])


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "store": True}, "store"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "tools": [{"type": "web_search_preview"}]}, "tools[0]"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "x", "schema": 3}}}, "text.format"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "name": "f"}]}, "input"),
    ({"input": []}, "input"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"instructions": "x"}, "input"),
])
def test_bad_fields_are_400_in_openai_envelope(client, body, param):
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param or error["param"].startswith((param + ".", param + "[")), error


def test_a_stateless_server_says_why_it_finds_no_response(client):
    for r in (client.get("/v1/responses/resp_1"), client.post("/v1/conversations", json={})):
        assert r.status_code == 404 and "--responses-store none" in r.json()["error"]["message"]


def test_sdk_raises_bad_request_for_stateful_use(sdk):
    with pytest.raises(openai.BadRequestError, match="keeps no responses"):
        sdk.responses.create(model="tiny-llama", input="x", previous_response_id="resp_123")
