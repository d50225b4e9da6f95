"""Structured outputs through the HTTP API on the tiny random model.

Under a grammar even random weights must produce valid output: every answer here is sampled
(temperature 1, many seeds) from the tiny model's real forward passes and must parse and validate.
"""

from __future__ import annotations

import json
import re

import httpx
import jsonschema
import pytest

from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service

USER = [{"role": "user", "content": "Describe a city"}]
SCHEMAS = {
    "nested": {
        "type": "object",
        "properties": {
            "city": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                      "country": {"enum": ["FR", "IT", "DE"]}},
                     "required": ["name", "country"], "additionalProperties": False},
            "open": {"type": "boolean"},
        },
        "required": ["city", "open"], "additionalProperties": False,
    },
    "arrays_and_numbers": {
        "type": "object",
        "properties": {
            "scores": {"type": "array", "items": {"type": "integer", "minimum": -50, "maximum": 50},
                       "minItems": 1, "maxItems": 4},
            "ratio": {"type": "number", "minimum": 0, "maximum": 1},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        },
        "required": ["scores", "ratio", "tags"], "additionalProperties": False,
    },
    "patterns": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                       "note": {"type": ["string", "null"], "maxLength": 8}},
        "required": ["code", "zip"], "additionalProperties": False,
    },
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 10},
                                         "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 999},
                                         "b": {"type": "integer", "minimum": 0, "maximum": 999}},
        "required": ["a", "b"], "additionalProperties": False}}},
]
SEEDS = range(8)


def _ask(client: httpx.Client, **fields) -> dict:
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 200, **fields}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _stream(client: httpx.Client, **fields) -> tuple[str, str]:
    body = {"messages": USER, "temperature": 1.0, "max_tokens": 200, "stream": True, **fields}
    text, finish = "", None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    return text, finish


@pytest.mark.parametrize("seed", SEEDS)
def test_json_object_answers_are_json_objects(client, seed):
    choice = _ask(client, seed=seed, response_format={"type": "json_object"})
    assert choice["finish_reason"] == "stop"
    assert isinstance(json.loads(choice["message"]["content"]), dict)
    text, finish = _stream(client, seed=seed, response_format={"type": "json_object"})
    assert finish == "stop" and text == choice["message"]["content"]


@pytest.mark.parametrize("name", SCHEMAS)
@pytest.mark.parametrize("seed", SEEDS)
def test_json_schema_answers_validate_plain_and_streamed(client, name, seed):
    schema = SCHEMAS[name]
    response_format = {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}
    choice = _ask(client, seed=seed, response_format=response_format)
    assert choice["finish_reason"] == "stop"
    jsonschema.validate(json.loads(choice["message"]["content"]), schema)
    text, finish = _stream(client, seed=seed, response_format=response_format)
    assert finish == "stop"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.parametrize("seed", SEEDS)
def test_regex_and_choice_extensions(client, seed):
    choice = _ask(client, seed=seed, structured_outputs={"regex": r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)"})
    assert re.fullmatch(r"[a-z]{2,5}@[a-z]{2,5}\.(com|org)", choice["message"]["content"])
    assert choice["finish_reason"] == "stop"
    options = ["yes", "no", "it \"depends\" 🤷"]
    text, finish = _stream(client, seed=seed, structured_outputs={"choice": options})
    assert text in options and finish == "stop"


def test_json_and_grammar_extensions_and_the_openai_sdk_extra_body(base_url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    schema = SCHEMAS["patterns"]
    r = sdk.chat.completions.create(model="tiny-llama", messages=USER, seed=3, max_tokens=200,
                                    extra_body={"structured_outputs": {"json": schema}})
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    grammar = 'start: "x=" NUMBER ";"\nNUMBER: /[1-9][0-9]{0,3}/'
    r = sdk.chat.completions.create(model="tiny-llama", messages=USER, seed=3, max_tokens=50,
                                    extra_body={"structured_outputs": {"grammar": grammar}})
    assert re.fullmatch(r"x=[1-9][0-9]{0,3};", r.choices[0].message.content)


@pytest.mark.parametrize("seed", SEEDS)
def test_objects_that_list_their_properties_get_no_other_keys(client, seed):
    # No "additionalProperties" anywhere: JSON Schema would allow any key, and a model then invents keys
    # until max_tokens; the server closes such objects as vLLM's default backend does.
    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"type": "object", "properties": {"c": {"type": "boolean"}}}}}
    choice = _ask(client, seed=seed, response_format={"type": "json_schema",
                                                      "json_schema": {"name": "closed", "schema": schema}})
    answer = json.loads(choice["message"]["content"])
    assert set(answer) <= {"a", "b"} and set(answer.get("b", {})) <= {"c"}
    jsonschema.validate(answer, schema)


def test_closed_objects_keeps_what_a_schema_says():
    from llmctl.server.constraints import closed_objects

    listed = {"type": "object", "properties": {"x": {"type": "string"}}}
    assert closed_objects(listed)["additionalProperties"] is False
    assert "additionalProperties" not in listed  # the caller's schema is not changed
    assert closed_objects({**listed, "additionalProperties": True})["additionalProperties"] is True
    assert "additionalProperties" not in closed_objects({**listed, "patternProperties": {"^y": {}}})
    assert closed_objects({"type": "object"}) == {"type": "object"}  # lists nothing: any object
    nested = closed_objects({"$defs": {"P": listed}, "anyOf": [listed], "items": listed,
                             "properties": {"p": listed}, "allOf": [listed]})
    assert nested["$defs"]["P"]["additionalProperties"] is False
    assert nested["anyOf"][0]["additionalProperties"] is False and nested["items"]["additionalProperties"] is False
    assert nested["properties"]["p"]["additionalProperties"] is False
    assert "additionalProperties" not in nested["allOf"][0]  # closing each part would reject the union


def test_a_cut_answer_ends_with_length(client):
    choice = _ask(client, seed=1, max_tokens=3, response_format={
        "type": "json_schema", "json_schema": {"name": "long", "schema": {
            "type": "object", "properties": {"items": {"type": "array", "items": {"type": "integer"},
                                                       "minItems": 50}}, "required": ["items"]}}})
    assert choice["finish_reason"] == "length"


@pytest.mark.parametrize(("fields", "param", "words"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "no-such-format"}}}}, "response_format.json_schema.schema", "no-such-format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "$ref": "#/$defs/Missing"}}}}, "response_format.json_schema.schema", "Missing"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "name"),
    ({"structured_outputs": {"regex": "([a-z]"}}, "structured_outputs.regex", "regex"),
    ({"structured_outputs": {"grammar": "start: nothing_defined"}}, "structured_outputs.grammar", "nothing_defined"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs",
     "not both"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
    ({"tool_choice": "required"}, "tool_choice", "no 'tools'"),
])
def test_an_unusable_constraint_is_a_400_naming_the_field(client, tiny_service, fields, param, words):
    before = tiny_service.engine.stats.tokens_generated
    r = client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 20, **fields})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert words in error["message"], error["message"]
    assert tiny_service.engine.stats.tokens_generated == before  # refused before any generation


@pytest.mark.parametrize("seed", SEEDS)
def test_enforced_tool_choice_gives_a_valid_call_without_a_tool_call_parser(client, seed):
    named = _ask(client, seed=seed, tools=TOOLS, max_tokens=200,
                 tool_choice={"type": "function", "function": {"name": "add"}})
    assert named["finish_reason"] == "tool_calls", named
    (call,) = named["message"]["tool_calls"]
    assert call["function"]["name"] == "add"
    jsonschema.validate(json.loads(call["function"]["arguments"]), TOOLS[1]["function"]["parameters"])
    required = _ask(client, seed=seed, tools=TOOLS, max_tokens=200, tool_choice="required",
                    parallel_tool_calls=False)
    assert required["finish_reason"] == "tool_calls", required
    (call,) = required["message"]["tool_calls"]
    tool = next(t for t in TOOLS if t["function"]["name"] == call["function"]["name"])
    jsonschema.validate(json.loads(call["function"]["arguments"]), tool["function"]["parameters"])


@pytest.fixture(scope="module")
def hermes_url(tiny_model):
    service = make_service(tiny_model, tool_call_parser="hermes")
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


def test_streamed_required_tool_calls_and_strict_tools_under_auto(hermes_url):
    with httpx.Client(base_url=hermes_url, timeout=60) as client:
        for seed in SEEDS:
            body = {"messages": USER, "temperature": 1.0, "max_tokens": 200, "seed": seed, "stream": True,
                    "tools": TOOLS, "tool_choice": "required"}
            calls, finish, content = {}, None, ""
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                for line in r.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        choice = json.loads(line[6:])["choices"][0]
                        for call in choice["delta"].get("tool_calls") or []:
                            calls[call["index"]] = call["function"]
                        content += choice["delta"].get("content") or ""
                        finish = choice["finish_reason"] or finish
            # Parallel calls are allowed: a random model may keep calling until max_tokens cuts a call,
            # which is then dropped (finish "length"); the calls before it are whole.
            assert (finish == "tool_calls" and calls) or finish == "length", (finish, calls)
            assert "<tool_call>" not in content
            for function in calls.values():
                tool = next(t for t in TOOLS if t["function"]["name"] == function["name"])
                jsonschema.validate(json.loads(function["arguments"]), tool["function"]["parameters"])
        strict = [{**TOOLS[1], "function": {**TOOLS[1]["function"], "strict": True}}]
        for seed in SEEDS:
            choice = _ask(client, seed=seed, tools=strict, max_tokens=200)
            # Free to answer in text, but a call it starts must be valid.
            for call in choice["message"].get("tool_calls") or []:
                jsonschema.validate(json.loads(call["function"]["arguments"]), strict[0]["function"]["parameters"])
            assert "<tool_call>" not in (choice["message"]["content"] or "") or choice["finish_reason"] == "length"


class Nudge:
    """Wraps a model's forward pass: the logit of the next token of ``say(text)`` is raised by 1000
    before the grammar's mask, so the model writes the text where the grammar allows it and its own
    best allowed token where not."""

    def __init__(self, model, tokenizer) -> None:
        self.forward, self.tokenizer, self.ids, self.step = model.forward, tokenizer, [], 0
        model.forward = self

    def say(self, text: str) -> None:
        self.ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        self.step = 0

    def __call__(self, *args, **kwargs):
        out = self.forward(*args, **kwargs)
        if self.step < len(self.ids):
            out.logits[:, -1, self.ids[self.step]] += 1000.0
        self.step += 1
        return out


@pytest.fixture(scope="module")
def nudged(tiny_model):
    service = make_service(tiny_model, tool_call_parser="hermes")
    nudge = Nudge(service.engine.model, service.loaded.tokenizer)
    with serve_in_thread(service) as url:
        yield url, nudge.say
    service.shutdown()


def test_a_strict_tool_under_auto_gets_valid_arguments_and_text_stays_free(nudged):
    url, say = nudged
    bad_call = 'Sure. <tool_call>\n{"name": "add", "arguments": {"a": "seven", "b": 2}}\n</tool_call>'
    body = {"messages": USER, "temperature": 0, "max_tokens": 120, "tools": TOOLS}
    say(bad_call)  # a non-strict tool: nothing enforced, the bad arguments come through
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]
    assert json.loads(r["message"]["tool_calls"][0]["function"]["arguments"])["a"] == "seven"
    strict = [TOOLS[0], {**TOOLS[1], "function": {**TOOLS[1]["function"], "strict": True}}]
    say(bad_call)
    r = httpx.post(url + "/v1/chat/completions", json={**body, "tools": strict}, timeout=60).json()["choices"][0]
    assert r["message"]["content"] == "Sure."  # the text before the call was not constrained
    assert r["finish_reason"] == "tool_calls", r
    (call,) = r["message"]["tool_calls"]
    arguments = json.loads(call["function"]["arguments"])
    jsonschema.validate(arguments, TOOLS[1]["function"]["parameters"])
    say("Just text, no call.")
    r = httpx.post(url + "/v1/chat/completions", json={**body, "tools": strict}, timeout=60).json()["choices"][0]
    assert r["message"]["content"] == "Just text, no call." and r["finish_reason"] == "stop"
