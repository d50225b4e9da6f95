"""Every tool-call parser end to end: the calls a model writes in its family's format come back on all three APIs.

The tiny model is scripted (its real forward pass runs, then its logits are set so that it writes a
family's answer, see conftest.scripted_server); the engine, detokenizer, parser, API layers and the
openai / anthropic SDKs are the real code. An enforced call (tool_choice "required") is left to the
model itself: the grammar writes it in the family's format, and the same parser must read it back.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import anthropic
import openai
import pytest

from llmctl.server.testing import build_tiny_model, serve_in_thread
from llmctl.server.tools import PARSERS, Function
from tests.conftest import make_service, scripted_server
from tests.server.test_tool_parsers import CASES, TOOLS, as_pairs

FAMILIES = ["hermes", "llama3_json", "pythonic", "mistral", "qwen3_coder", "openai"]
# One answer per family: the one with most calls.
ANSWERS = {name: max((c for c in CASES if c[0] == name), key=lambda c: len(c[3]))[1:] for name in FAMILIES}
USER = [{"role": "user", "content": "Weather in Paris, and the time?"}]
MARKUP = ("<tool_call>", "<function=", "[TOOL_CALLS]", "<|python_tag|>", "<|channel|>", "get_weather(")
# A tool whose every call is short (a random model forced into a free string could write until max_tokens).
SET_UNIT = [{"type": "function", "function": {"name": "set_unit", "parameters": {
    "type": "object", "properties": {"unit": {"enum": ["c", "f"]}, "fast": {"type": "boolean"}},
    "required": ["unit", "fast"]}}}]
RESPONSES_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "input_schema": t["function"]["parameters"]} for t in TOOLS]


@pytest.fixture(scope="module")
def roomy_model(tmp_path_factory):
    """The tiny model with room for a few calls in the byte-level tokens of its small vocabulary."""
    return build_tiny_model(tmp_path_factory.mktemp("roomy") / "tiny-llama", context=1024)


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, roomy_model):
    with scripted_server(roomy_model, tool_call_parser=request.param) as (url, say):
        yield request.param, url, say


def clean(text: str | None) -> str:
    assert not any(mark in (text or "") for mark in MARKUP), text
    return (text or "").strip()


def test_chat_tool_calls_plain_and_streamed(family):
    name, url, say = family
    text, content, calls = ANSWERS[name]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(text)
    out = sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert clean(choice.message.content) == content
    assert as_pairs([c.model_dump() for c in choice.message.tool_calls]) == calls
    say(text)
    streamed, got, finish = "", {}, None
    for chunk in sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta
        streamed += delta.content or ""
        for call in delta.tool_calls or []:
            got.setdefault(call.index, {"function": {"name": "", "arguments": ""}})
            got[call.index]["function"]["name"] += call.function.name or ""
            got[call.index]["function"]["arguments"] += call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and clean(streamed) == content
    assert as_pairs([got[i] for i in sorted(got)]) == calls


def test_responses_function_calls_plain_and_streamed(family):
    name, url, say = family
    text, content, calls = ANSWERS[name]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(text)
    out = sdk.responses.create(model="tiny-llama", input=USER[0]["content"], tools=RESPONSES_TOOLS)
    items = [i for i in out.output if i.type == "function_call"]
    assert [(i.name, json.loads(i.arguments)) for i in items] == calls
    assert clean(out.output_text) == content
    say(text)
    events = list(sdk.responses.create(model="tiny-llama", input=USER[0]["content"], tools=RESPONSES_TOOLS,
                                       stream=True))
    streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert clean(streamed) == content
    assert [(i.name, json.loads(i.arguments)) for i in final.output if i.type == "function_call"] == calls


def test_anthropic_tool_use_plain_and_streamed(family):
    name, url, say = family
    text, content, calls = ANSWERS[name]
    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    say(text)
    out = sdk.messages.create(model="tiny-llama", max_tokens=600, messages=USER, tools=ANTHROPIC_TOOLS)
    assert out.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in out.content if b.type == "tool_use"] == calls
    assert clean("".join(b.text for b in out.content if b.type == "text")) == content
    say(text)
    with sdk.messages.stream(model="tiny-llama", max_tokens=600, messages=USER, tools=ANTHROPIC_TOOLS) as stream:
        events = list(stream)
        final = stream.get_final_message()
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert final.stop_reason == "tool_use"
    assert [(b.name, b.input) for b in final.content if b.type == "tool_use"] == calls
    assert partial and all(json.loads(json.dumps(b.input)) for b in final.content if b.type == "tool_use")
    assert clean("".join(b.text for b in final.content if b.type == "text")) == content


def test_mistral_v11_enforced_calls_use_args(roomy_service_url, monkeypatch):
    """A tokenizer with Mistral's [ARGS] token gets enforced calls written as [TOOL_CALLS]name[ARGS]{...}."""
    from llmctl.server.tools import resolve_parser

    service, url = roomy_service_url
    vocab = SimpleNamespace(chat_template="[TOOL_CALLS]", get_vocab=lambda: {"[TOOL_CALLS]": 1, "[ARGS]": 2})
    family, why = resolve_parser("auto", vocab)
    assert why.endswith("[ARGS] calls")
    monkeypatch.setattr(service, "tool_format", family)
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=SET_UNIT, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=120, seed=1)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "set_unit" and json.loads(call.function.arguments)["unit"] in ("c", "f")
    assert family.grammar([Function("f", {"type": "object"})], single=True, free_text=False).startswith(
        'start: "[TOOL_CALLS]" call\ncall: call_0\ncall_0: "f[ARGS]"')


def test_an_enforced_call_is_written_in_the_family_format_and_parsed(family):
    _, url, say = family
    say(None)  # the tiny model writes what the grammar of the family's call allows
    tools = SET_UNIT
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=tools, tool_choice="required",
                                      parallel_tool_calls=False, max_tokens=120, seed=1)
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    for call in choice.message.tool_calls:
        args = json.loads(call.function.arguments)
        assert call.function.name == "set_unit" and args["unit"] in ("c", "f") and isinstance(args["fast"], bool)
    assert clean(choice.message.content) == ""


def forced_text_comes_back_as_calls(url: str, service, monkeypatch, family: str) -> None:
    """A constraint forces the family's answer (vLLM's `structured_outputs` choice), whatever the model
    would write; the server's parser reads the calls out of that constrained text, plain and streamed.
    (Shared with tests/engine_vllm: the same check runs on vLLM's engine.)"""
    monkeypatch.setattr(service, "tool_format", PARSERS[family])  # the family `--tool-call-parser` would name
    text, content, calls = ANSWERS[family]
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    body = {"model": service.loaded.name, "messages": [{"role": "user", "content": "Hi"}], "tools": TOOLS,
            "max_tokens": 400, "extra_body": {"structured_outputs": {"choice": [text]}}}
    choice = sdk.chat.completions.create(**body).choices[0]
    assert choice.finish_reason == "tool_calls" and clean(choice.message.content) == content
    assert as_pairs([c.model_dump() for c in choice.message.tool_calls]) == calls
    streamed, names = "", []
    for chunk in sdk.chat.completions.create(**body, stream=True):
        streamed += chunk.choices[0].delta.content or "" if chunk.choices else ""
        names += [c.function.name for c in (chunk.choices[0].delta.tool_calls or [])] if chunk.choices else []
    assert clean(streamed) == content and names == [name for name, _ in calls]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_parser_reads_calls_out_of_constrained_output(name, roomy_service_url, monkeypatch):
    service, url = roomy_service_url
    forced_text_comes_back_as_calls(url, service, monkeypatch, name)


@pytest.fixture(scope="module")
def roomy_service_url(roomy_model):
    service = make_service(roomy_model)
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


def test_responses_and_anthropic_enforce_a_call_in_the_family_format(family):
    """tool_choice on /v1/responses and /v1/messages runs on the same per-family grammar as chat's."""
    _, url, say = family
    say(None)
    schema = {"type": "object", "properties": {"unit": {"enum": ["c", "f"]}}, "required": ["unit"]}
    oai = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = oai.responses.create(model="tiny-llama", input="Unit?", max_output_tokens=120,
                               tools=[{"type": "function", "name": "set_unit", "parameters": schema}],
                               tool_choice={"type": "function", "name": "set_unit"})
    assert out.status == "completed", out.output
    (call,) = out.output
    assert call.type == "function_call" and json.loads(call.arguments)["unit"] in ("c", "f")
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    message = claude.messages.create(model="tiny-llama", max_tokens=120, messages=USER,
                                     tools=[{"name": "set_unit", "input_schema": schema}],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert message.stop_reason == "tool_use", message.content
    (use,) = message.content
    assert use.name == "set_unit" and use.input["unit"] in ("c", "f")


def test_qwen3_coder_enforces_string_enums_and_lengths(roomy_service_url, monkeypatch):
    """Qwen3-Coder writes strings raw between its tags: an enforced call still keeps to `enum` and `maxLength`."""
    service, url = roomy_service_url
    monkeypatch.setattr(service, "tool_format", PARSERS["qwen3_coder"])
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                               "note": {"type": "string", "maxLength": 8}},
              "required": ["city", "note"]}
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for seed in range(3):
        out = sdk.chat.completions.create(
            model="tiny-llama", messages=USER, tool_choice="required", parallel_tool_calls=False, max_tokens=120,
            seed=seed, temperature=1.0, tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
        (call,) = out.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        assert args["city"] in ("Paris", "Rome") and len(str(args["note"])) <= 8, args
