"""Enforced tool_choice on /v1/responses and /v1/messages, calls cut by max_tokens, and agent SDKs on top.

The server here has no --tool-call-parser: an enforced call needs none. The tiny model's weights are
random; the grammar of the forced call makes its answer a valid call whatever they are, so each
answer is sampled (temperature 1, a few times) and must validate. Where a test fixes the answer
(`nudged`), the model's real logits get the next token of a script raised before the grammar's mask.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import anthropic
import httpx
import jsonschema
import openai
import pytest
from pydantic import Field

from llmctl.server.api import anthropic as anthropic_api
from llmctl.server.api import responses_models
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service
from tests.server.test_structured_outputs import Nudge

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
        "additionalProperties": False}
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": WEATHER},
                   {"type": "function", "name": "get_time", "parameters": TIME}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "input_schema": WEATHER}, {"name": "get_time", "input_schema": TIME}]
CHAT_TOOLS = [{"type": "function", "function": {"name": t["name"], "parameters": t["parameters"]}}
              for t in RESPONSES_TOOLS]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
USER = [{"role": "user", "content": "Weather in Paris?"}]
SAMPLES = 3  # /v1/responses and /v1/messages take no seed: each answer is a new random sample


def _valid(name: str, arguments: dict | str) -> None:
    jsonschema.validate(json.loads(arguments) if isinstance(arguments, str) else arguments, SCHEMAS[name])


@pytest.fixture()
def oai(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def claude(base_url):
    return anthropic.Anthropic(base_url=base_url, api_key="unused", max_retries=0)


# ---- /v1/responses ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "name": "get_time"}])
def test_responses_tool_choice_gives_one_valid_call(oai, tool_choice):
    for _ in range(SAMPLES):
        out = oai.responses.create(model="tiny-llama", input="Weather in Paris?", tools=RESPONSES_TOOLS,
                                   tool_choice=tool_choice, parallel_tool_calls=False, max_output_tokens=120,
                                   temperature=1.0)
        assert out.status == "completed", out
        (call,) = out.output
        assert call.type == "function_call" and call.status == "completed"
        if isinstance(tool_choice, dict):
            assert call.name == "get_time"
        _valid(call.name, call.arguments)
        responses_models.Response.model_validate(out.model_dump(exclude_unset=True))


def test_responses_forced_call_streamed(oai):
    for _ in range(SAMPLES):
        events = list(oai.responses.create(model="tiny-llama", input="Weather?", tools=RESPONSES_TOOLS,
                                           tool_choice={"type": "function", "name": "get_weather"},
                                           max_output_tokens=120, stream=True))
        assert not [e for e in events if e.type == "response.output_text.delta"]
        final = events[-1]
        assert final.type == "response.completed"
        (call,) = final.response.output
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert call.name == "get_weather" and args == call.arguments
        _valid(call.name, args)


# ---- /v1/messages ----------------------------------------------------------------------------------
@pytest.mark.parametrize("tool_choice", [{"type": "any", "disable_parallel_tool_use": True},
                                         {"type": "tool", "name": "get_time"}])
def test_anthropic_tool_choice_gives_one_valid_tool_use(claude, tool_choice):
    for _ in range(SAMPLES):
        out = claude.messages.create(model="tiny-llama", max_tokens=120, messages=USER, tools=ANTHROPIC_TOOLS,
                                     tool_choice=tool_choice)
        assert out.stop_reason == "tool_use", out
        (use,) = out.content
        assert use.type == "tool_use" and use.id.startswith("toolu_")
        if tool_choice["type"] == "tool":
            assert use.name == "get_time"
        _valid(use.name, use.input)
        anthropic_api.AnthropicMessage.model_validate(out.model_dump(exclude_unset=True))


def test_anthropic_forced_tool_use_streamed(claude):
    for _ in range(SAMPLES):
        with claude.messages.stream(model="tiny-llama", max_tokens=120, messages=USER, tools=ANTHROPIC_TOOLS,
                                    tool_choice={"type": "tool", "name": "get_weather"}) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert "text" not in kinds and final.stop_reason == "tool_use"
        (use,) = final.content
        assert use.name == "get_weather"
        _valid(use.name, use.input)


def test_auto_and_none_stay_free_text_without_a_parser(oai, claude):
    out = oai.responses.create(model="tiny-llama", input="Hi", tools=RESPONSES_TOOLS, max_output_tokens=5,
                               temperature=0)
    assert [item.type for item in out.output] == ["message"]
    out = claude.messages.create(model="tiny-llama", max_tokens=5, messages=USER, tools=ANTHROPIC_TOOLS,
                                 tool_choice={"type": "none"}, extra_body={"temperature": 0})
    assert [block.type for block in out.content] == ["text"]


def test_an_unusable_tool_choice_is_a_400_in_each_envelope(base_url):
    r = httpx.post(base_url + "/v1/responses", json={"input": "Hi", "tools": RESPONSES_TOOLS,
                                                     "tool_choice": {"type": "function", "name": "nope"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tool_choice", r.text
    r = httpx.post(base_url + "/v1/messages", json={"max_tokens": 5, "messages": USER, "tool_choice": {"type": "any"}})
    assert r.status_code == 400 and r.json()["type"] == "error", r.text
    assert "no 'tools'" in r.json()["error"]["message"]


# ---- a call cut by max_tokens ------------------------------------------------------------------------
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def nudged(tiny_model):
    service = make_service(tiny_model)
    nudge = Nudge(service.engine.model, service.loaded.tokenizer)
    with serve_in_thread(service) as url:
        yield url, nudge, service.loaded.tokenizer
    service.shutdown()


def _cut_script(nudge: Nudge, tokenizer) -> int:
    """The model writes one whole call and starts a second; the max_tokens that cuts the second."""
    nudge.say(CALL + "\n" + CALL)
    return len(tokenizer(CALL + "\n" + CALL[:40], add_special_tokens=False)["input_ids"])


def test_a_call_cut_by_max_tokens_is_not_a_call_on_chat(nudged):
    url, nudge, tokenizer = nudged
    body = {"messages": USER, "tools": CHAT_TOOLS, "tool_choice": "required", "temperature": 0}
    with httpx.Client(base_url=url, timeout=60) as client:
        body["max_tokens"] = _cut_script(nudge, tokenizer)
        choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        assert choice["finish_reason"] == "length", choice
        assert not choice["message"]["content"]  # no half-written markup
        (call,) = choice["message"]["tool_calls"]  # the whole call before the cut
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "days": 3}
        body["max_tokens"] = _cut_script(nudge, tokenizer)
        content, calls, finish = "", [], None
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    delta = json.loads(line[6:])["choices"][0]
                    content += delta["delta"].get("content") or ""
                    calls += delta["delta"].get("tool_calls") or []
                    finish = delta["finish_reason"] or finish
        assert (content, finish, len(calls)) == ("", "length", 1)


def test_a_call_cut_by_max_tokens_is_not_a_call_on_responses_and_messages(nudged):
    url, nudge, tokenizer = nudged
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = oai.responses.create(model="tiny-llama", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required",
                               max_output_tokens=_cut_script(nudge, tokenizer), temperature=0)
    assert out.status == "incomplete" and out.incomplete_details.reason == "max_output_tokens"
    assert [item.type for item in out.output] == ["function_call"]
    events = list(oai.responses.create(model="tiny-llama", input="Weather?", tools=RESPONSES_TOOLS,
                                       tool_choice="required", max_output_tokens=_cut_script(nudge, tokenizer),
                                       temperature=0, stream=True))
    assert not [e for e in events if e.type == "response.output_text.delta"]
    assert events[-1].type == "response.incomplete"
    assert [item.type for item in events[-1].response.output] == ["function_call"]
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    out = claude.messages.create(model="tiny-llama", messages=USER, tools=ANTHROPIC_TOOLS,
                                 tool_choice={"type": "any"}, max_tokens=_cut_script(nudge, tokenizer),
                                 extra_body={"temperature": 0})
    assert out.stop_reason == "max_tokens" and [b.type for b in out.content] == ["tool_use"]
    with claude.messages.stream(model="tiny-llama", messages=USER, tools=ANTHROPIC_TOOLS, extra_body={"temperature": 0},
                                tool_choice={"type": "any"}, max_tokens=_cut_script(nudge, tokenizer)) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "text" not in kinds and final.stop_reason == "max_tokens"
    assert [b.input for b in final.content] == [{"city": "Paris", "days": 3}]


# ---- agent SDKs with a forced tool ---------------------------------------------------------------------
def test_openai_agents_sdk_runs_a_tool_with_its_default_responses_model(base_url):
    agents = pytest.importorskip("agents")
    from agents.models.openai_provider import OpenAIProvider

    ran = []

    @agents.function_tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        ran.append(city)
        return f"18 C in {city}"

    client = openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(name="weather", instructions="Answer with the tool.", tools=[get_weather],
                         model="tiny-llama", tool_use_behavior="stop_on_first_tool",
                         model_settings=agents.ModelSettings(tool_choice="required", parallel_tool_calls=False,
                                                             max_tokens=120))
    config = agents.RunConfig(model_provider=OpenAIProvider(openai_client=client, use_responses=True),
                              tracing_disabled=True)
    result = agents.Runner.run_sync(agent, "Weather in Paris?", run_config=config)
    assert ran and result.final_output == f"18 C in {ran[0]}"
    assert any(item.type == "tool_call_item" for item in result.new_items)


def test_pydantic_ai_responses_model_runs_a_tool(base_url):
    pydantic_ai = pytest.importorskip("pydantic_ai")
    from pydantic_ai.models.openai import OpenAIResponsesModel
    from pydantic_ai.providers.openai import OpenAIProvider

    ran = []

    def report_weather(city: Literal["Paris", "Rome"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """Report the weather for the next days."""
        ran.append((city, days))
        return f"{city}: sunny for {days} days"

    model = OpenAIResponsesModel("tiny-llama", provider=OpenAIProvider(base_url=base_url + "/v1", api_key="unused"))
    # An output function is a tool the model must call (pydantic-ai sends tool_choice "required").
    agent = pydantic_ai.Agent(model, output_type=report_weather,
                              model_settings={"parallel_tool_calls": False, "max_tokens": 120})
    result = asyncio.run(agent.run("Weather in Paris?"))
    assert ran and result.output == f"{ran[0][0]}: sunny for {ran[0][1]} days"


@pytest.mark.parametrize("tool_choice", ["any", "get_weather"])
def test_langchain_chat_anthropic_bind_tools_runs_a_tool(base_url, tool_choice):
    langchain_anthropic = pytest.importorskip("langchain_anthropic")
    from langchain_core.tools import tool

    @tool
    def get_weather(city: Literal["Paris", "Rome"]) -> str:
        """The weather in a city."""
        return f"18 C in {city}"

    @tool
    def get_time(zone: Literal["UTC", "CET"]) -> str:
        """The time in a zone."""
        return f"noon {zone}"

    llm = langchain_anthropic.ChatAnthropic(model="tiny-llama", base_url=base_url, api_key="unused", max_tokens=120,
                                            max_retries=0)
    message = llm.bind_tools([get_weather, get_time], tool_choice=tool_choice, parallel_tool_calls=False).invoke(
        "Weather in Paris?")
    assert message.response_metadata["stop_reason"] == "tool_use"
    (call,) = message.tool_calls
    if tool_choice == "get_weather":
        assert call["name"] == "get_weather"
    result = {"get_weather": get_weather, "get_time": get_time}[call["name"]].invoke(call)
    assert result.content in ("18 C in Paris", "18 C in Rome", "noon UTC", "noon CET")
