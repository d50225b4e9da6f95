"""Each family's tool-call parser on text: whole, streamed split at every boundary, and character by character.

The texts are written as each family's documentation and chat templates show them (Meta's prompt
formats for Llama 3.1-4, Mistral's tokenizer versions, Qwen3-Coder's template, OpenAI's harmony).
"""

from __future__ import annotations

import json

import pytest

from llmctl.server.tools import PARSERS, ToolParser, parser_class

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"type": "string"}}}}}]
PARIS = ("get_weather", {"city": "Paris"})
CET = ("get_time", {"zone": "CET"})

# (parser, answer, the content a client sees, the calls)
CASES = [
    ("hermes", ('Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'),
     "Let me check.", [PARIS, CET]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "", [PARIS]),
    ("llama3_json", ('{"name": "get_weather", "parameters": {"city": "Paris"}}; '
                    '{"name": "get_time", "parameters": {"zone": "CET"}}'), "", [PARIS, CET]),
    ("llama3_json", 'Sure. <|python_tag|>{"name": "get_time", "parameters": {"zone": "CET"}}', "Sure.", [CET]),
    ("pythonic", '[get_weather(city="Paris"), get_time(zone=\'CET\')]', "", [PARIS, CET]),
    ("pythonic", '[get_weather(city="Paris", days=3, metric=true)]', "",
     [("get_weather", {"city": "Paris", "days": 3, "metric": True})]),
    ("pythonic", "Sure.<|python_start|>[get_time(zone='CET')]<|python_end|>", "Sure.", [CET]),
    ("mistral", ('Sure. [TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]'), "Sure.", [PARIS, CET]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', "",
     [PARIS, CET]),
    ("qwen3_coder", ("I will look.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
                    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>\n<tool_call>\n<function=get_time>\n"
                    "<parameter=zone>\nCET\n</parameter>\n</function>\n</tool_call>"),
     "I will look.", [("get_weather", {"city": "Paris", "days": 3}), CET]),
    ("openai", ("<|channel|>analysis<|message|>The user wants the weather.<|end|><|start|>assistant<|channel|>"
               'commentary to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}'), "", [PARIS]),
    ("openai", ("<|channel|>analysis<|message|>Two tools.<|end|><|start|>assistant<|channel|>commentary "
               'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|><|start|>assistant '
               'to=functions.get_time<|channel|>commentary json<|message|>{"zone": "CET"}<|call|>'), "", [PARIS, CET]),
    ("openai", ("<|channel|>analysis<|message|>Easy.<|end|><|start|>assistant<|channel|>final<|message|>"
               "It is sunny in Paris."), "It is sunny in Paris.", []),
]
# Answers that are not calls (or are cut off): the text comes back as written.
NOT_CALLS = [
    ("hermes", '<tool_call>\n{"name": "get_weather", "arguments": {"city": '),
    ("llama3_json", '{"answer": 42} is the JSON you asked for.'),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Pa'),
    ("pythonic", "[1] is a citation, not a call."),
    ("pythonic", '[get_weather(city="Par'),
    ("mistral", "Arrays look like [1, 2], and that is all."),
    ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"ci'),
    ("qwen3_coder", "A <function> tag in prose, with no call."),
    ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nPar"),
    ("openai", "A model that writes no harmony at all."),
]


def run(name: str, pieces: list[str]) -> tuple[str, str, list[dict]]:
    parser: ToolParser = PARSERS[name](TOOLS)
    sent = "".join(parser.feed(piece) for piece in pieces)
    rest, calls = parser.finish()
    return sent, rest, calls


def splits(text: str):
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]


def as_pairs(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize(("name", "text", "content", "calls"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_calls_are_parsed_however_the_text_is_split(name, text, content, calls):
    for pieces in splits(text):
        sent, rest, got = run(name, pieces)
        assert as_pairs(got) == calls, pieces
        assert (sent + rest).strip() == content, pieces
        # No markup of a call is ever streamed as content.
        for mark in ("<tool_call>", "<function=", "[TOOL_CALLS]", "<|python_tag|>", "<|python_start|>",
                     "<|channel|>", '"name"', "get_weather("):
            assert mark not in sent + rest
        assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got)


@pytest.mark.parametrize(("name", "text"), NOT_CALLS, ids=[f"{c[0]}-{i}" for i, c in enumerate(NOT_CALLS)])
def test_text_that_is_not_a_call_stays_content(name, text):
    for pieces in splits(text):
        sent, rest, calls = run(name, pieces)
        assert calls == [] and sent + rest == text, pieces


def test_text_before_a_call_streams_before_the_answer_ends():
    parser = PARSERS["mistral"](TOOLS)
    assert parser.feed("The weather: ") == "The weather: "
    assert parser.feed("[TOOL_") == ""  # may be the marker: held
    assert parser.feed("CALLS][") == ""
    harmony = PARSERS["openai"](TOOLS)
    assert harmony.feed("<|channel|>final<|message|>Sun") == "Sun"
    assert harmony.feed("ny<|") == "ny"
    assert harmony.feed("return|>") == ""


def test_a_harmony_call_cut_short_is_no_call():
    for pieces in splits("<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Pa"):
        assert run("openai", pieces) == ("", "", [])


def test_harmony_without_tools_shows_the_final_channel_and_makes_no_call():
    parser = PARSERS["openai"]()  # a request without tools, or with tool_choice "none"
    shown = parser.feed("<|channel|>analysis<|message|>Hmm.<|end|><|start|>assistant<|channel|>commentary "
                        'to=functions.get_weather <|constrain|>json<|message|>{"city": "Paris"}<|call|>'
                        "<|start|>assistant<|channel|>final<|message|>Sunny.")
    assert (shown, parser.finish()) == ("Sunny.", ("", []))


def test_qwen3_coder_types_parameters_by_the_tool_schema():
    parser = PARSERS["qwen3_coder"]([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"code": {"type": "string"}, "n": {"type": "number"},
                                         "tags": {"type": "array"}}}}}])
    parser.feed("<tool_call>\n<function=f>\n<parameter=code>\n42\n</parameter>\n<parameter=n>\n1.5\n</parameter>\n"
                '<parameter=tags>\n["a", "b"]\n</parameter>\n</function>\n</tool_call>')
    _, calls = parser.finish()
    assert json.loads(calls[0]["function"]["arguments"]) == {"code": "42", "n": 1.5, "tags": ["a", "b"]}


def test_vllm_names_and_aliases():
    assert set(PARSERS) >= {"hermes", "llama3_json", "pythonic", "mistral", "qwen3_coder", "openai"}
    assert parser_class("llama4_pythonic") is PARSERS["pythonic"]
    assert parser_class("none") is None
