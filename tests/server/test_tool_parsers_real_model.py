"""The real embedded SmolLM2 with tool-call parsers: a forced call is written in the family's format and read back.

SmolLM2's own template writes no tools (so `auto` keeps its answers as text); naming a parser makes
an enforced `tool_choice` come out in that family's format, and the same parser reads it back.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"
WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome", "Berlin"]}}, "required": ["city"]}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_auto_leaves_smollm2_text_alone(real_service):
    service, _ = real_service
    assert service.tool_format is None


@pytest.mark.parametrize("family", ["llama3_json", "pythonic", "qwen3_coder"])
def test_forced_call_in_each_family_format_plain_and_streamed(real_service, family, monkeypatch):
    from llmctl.server.tools import PARSERS

    service, url = real_service
    monkeypatch.setattr(service, "tool_format", PARSERS[family])  # as `--tool-call-parser family` sets it
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}]
    out = sdk.chat.completions.create(model=MODEL, messages=USER, tools=tools, tool_choice="required",
                                      parallel_tool_calls=False, temperature=0, max_tokens=80)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in WEATHER[
        "properties"]["city"]["enum"]
    assert not out.choices[0].message.content
    chunks = list(sdk.chat.completions.create(model=MODEL, messages=USER, tools=tools, temperature=0,
                                              tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                              max_tokens=80, stream=True))
    streamed = [c.function for chunk in chunks for c in (chunk.choices[0].delta.tool_calls or [])]
    assert [f.name for f in streamed] == ["get_weather"]
    assert json.loads(streamed[0].arguments)["city"] in WEATHER["properties"]["city"]["enum"]
    assert not "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
