"""Tool calls: the Hermes parser on its own, and `serve --tool-call-parser hermes` end to end.

No model that writes tool calls can be had here (they are billions of parameters, and nothing is
downloaded), so the end-to-end tests script the tiny model: its real forward pass runs, and then the
logits are set so that it writes a given answer token by token. Everything after the logits (the
engine, detokenization, the parser, the HTTP layer and the openai SDK) is the real code.
"""

from __future__ import annotations

import json

import httpx
import pytest

from llmctl.server.api import chat_models
from llmctl.server.tools import HermesToolParser

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}}}}}]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


# ---- the parser ------------------------------------------------------------------------------------
def feed_by_char(text: str) -> tuple[str, str, list[dict]]:
    parser = HermesToolParser()
    sent = "".join(parser.feed(c) for c in text)
    rest, calls = parser.finish()
    return sent, rest, calls


def test_text_before_a_call_streams_and_the_call_is_parsed():
    sent, rest, calls = feed_by_char("Let me look that up. " + CALL)
    assert sent == "Let me look that up. " and rest == ""
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")


def test_several_calls_and_text_that_only_looks_like_a_tag():
    sent, rest, calls = feed_by_char("a < b, <tool> " + CALL + CALL.replace("Paris", "Rome"))
    assert sent == "a < b, <tool> " and rest == ""
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "Rome"]
    assert calls[0]["id"] != calls[1]["id"]


@pytest.mark.parametrize("block", [
    "<tool_call>{not json}</tool_call>",
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "f", "arguments": {"x": ',  # cut off (max_tokens)
])
def test_a_block_that_is_not_a_call_stays_text(block):
    sent, rest, calls = feed_by_char("x " + block)
    assert calls == [] and sent + rest == "x " + block


# ---- end to end (the `scripted` server is in conftest.py) ---------------------------------------------
def test_the_openai_sdk_gets_tool_calls(scripted):
    openai = pytest.importorskip("openai")
    url, say = scripted
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    say(CALL)
    r = sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}


def test_streamed_tool_calls_with_the_openai_sdk(scripted):
    openai = pytest.importorskip("openai")
    url, say = scripted
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    say("Checking. " + CALL)
    content, calls, finish = "", {}, None
    for chunk in sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS, temperature=0,
                                             stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for call in delta.tool_calls or []:
            calls.setdefault(call.index, {"name": "", "arguments": ""})
            calls[call.index]["name"] += call.function.name or ""
            calls[call.index]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert content == "Checking. " and finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and json.loads(calls[0]["arguments"])["city"] == "Paris"


def test_without_tools_or_with_tool_choice_none_the_answer_stays_text(scripted):
    openai = pytest.importorskip("openai")
    url, say = scripted
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused")
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        say(CALL)
        r = sdk.chat.completions.create(model="tiny-llama", messages=USER, temperature=0, **extra)
        assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"


def test_tool_call_answers_match_the_documented_schemas(scripted):
    url, say = scripted
    body = {"messages": USER, "tools": TOOLS, "temperature": 0}
    say(CALL)
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    chat_models.ChatCompletion.model_validate(r.json())
    say("Sure. " + CALL)
    with httpx.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=30) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        chat_models.ChatCompletionChunk.model_validate_json(event)
