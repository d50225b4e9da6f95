"""What the OpenAPI document says about request fields the service checks itself (tools, constraints, pairs of
fields), so that a request valid against the document is one the service accepts.

pydantic types these fields loosely (a dict, a catch-all part) so that the service can answer a precise 400
for each mistake; `documented` puts the rule the handler enforces in the field's JSON schema instead.
"""

from __future__ import annotations

from typing import Any

from pydantic import WithJsonSchema

OBJECT: dict = {"type": "object"}
NULL: dict = {"type": "null"}


def documented(schema: dict) -> WithJsonSchema:
    """The JSON schema a field is documented with (its validation stays as it is)."""
    return WithJsonSchema(schema)


def one_of_keys(keys: dict[str, dict]) -> dict:
    """An object that sets exactly one of ``keys`` (to a value matching its schema); the others absent, null or
    false (which the service reads as not set)."""
    unset = {"enum": [None, False]}
    return {"type": "object", "oneOf": [
        {"required": [key], "properties": {key: schema, **{k: unset for k in keys if k != key}}}
        for key, schema in keys.items()]}


NAME = {"type": "string"}
# A JSON schema llmctl compiles into a grammar: an object or a boolean (which keywords it supports is the grammar
# engine's to say, with a 400 naming the field for one it does not).
JSON_SCHEMA: dict = {"type": ["object", "boolean"]}

# ---- constraints (llmctl.server.constraints) --------------------------------------------------------
STRUCTURED_OUTPUTS = one_of_keys({
    "json": {"anyOf": [OBJECT, {"const": True}], "description": "a JSON schema (its JSON text is accepted too)"},
    "regex": {"type": "string", "minLength": 1},
    "choice": {"type": "array", "items": {"type": "string"}, "minItems": 1},
    "grammar": {"type": "string", "minLength": 1, "description": "a Lark grammar (llguidance's dialect)"},
    "json_object": {"const": True},
})
STRUCTURED_OUTPUTS["description"] = ("vLLM's structured outputs: exactly one of json, regex, choice, grammar, "
                                     "json_object")


def response_format(nested: bool) -> dict:
    """OpenAI's `response_format` (chat: name/schema under `json_schema`) or `text.format` (Responses: beside
    `type`)."""
    spec: dict[str, Any] = {"type": "object", "properties": {"name": NAME, "schema": JSON_SCHEMA,
                                                             "strict": {"type": "boolean"}}}
    json_schema = {"required": ["type", "json_schema"], "properties": {"type": {"const": "json_schema"},
                                                                       "json_schema": spec}} if nested \
        else {"required": ["type", "schema"], "properties": {"type": {"const": "json_schema"}, **spec["properties"]}}
    return {"type": "object", "oneOf": [
        {"required": ["type"], "properties": {"type": {"enum": ["text", "json_object"]}}},
        {**json_schema, "type": "object"},
    ]}


# ---- tools ---------------------------------------------------------------------------------------------
FUNCTION: dict[str, Any] = {"type": "object", "required": ["name"], "properties": {
    "name": NAME, "description": {"type": ["string", "null"]}, "parameters": OBJECT,
    "strict": {"type": ["boolean", "null"]}}}
CHAT_TOOLS = {"type": "array", "items": {"type": "object", "required": ["function"], "properties": {
    "type": {"const": "function"}, "function": FUNCTION}}}
CHAT_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "function"], "properties": {
        "type": {"const": "function"},
        "function": {"type": "object", "required": ["name"], "properties": {"name": NAME}}},
    "description": "names one of the request's tools"}]}
RESPONSES_TOOLS = {"type": "array", "items": {
    **FUNCTION, "required": ["type", "name"], "properties": {"type": {"const": "function"}, **FUNCTION["properties"]}}}
RESPONSES_TOOL_CHOICE = {"anyOf": [{"enum": ["none", "auto", "required"]}, {
    "type": "object", "required": ["type", "name"], "properties": {"type": {"const": "function"}, "name": NAME},
    "description": "names one of the request's tools"}]}
ANTHROPIC_TOOLS = {"type": "array", "items": {"type": "object", "required": ["name"], "properties": {
    "type": {"enum": ["custom", None]}, "name": NAME, "description": {"type": ["string", "null"]},
    "input_schema": OBJECT}}}

# A request whose tool_choice asks for a call must list tools (chat completions).
FORCED_TOOL_NEEDS_TOOLS = {
    "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"anyOf": [{"const": "required"}, OBJECT]}}},
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}

# ---- content ---------------------------------------------------------------------------------------------
TEXT_PART = {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": NAME}}
TEXT_PARTS = {"type": "array", "items": TEXT_PART}


def given(field: str, schema: dict) -> dict:
    """`field` is present and matches ``schema``."""
    return {"required": [field], "properties": {field: schema}}


# ---- rules between fields --------------------------------------------------------------------------------
# A constraint comes from response_format or structured_outputs, not both.
ONE_CONSTRAINT = {"not": {"allOf": [given("response_format", {"type": "object", "properties": {
    "type": {"enum": ["json_object", "json_schema"]}}, "required": ["type"]}), given("structured_outputs", OBJECT)]}}
CHAT_RULES: list[Any] = [
    FORCED_TOOL_NEEDS_TOOLS, ONE_CONSTRAINT,
    {"if": given("top_logprobs", {"type": "integer", "minimum": 1}), "then": given("logprobs", {"const": True})},
]

# /tokenize: a prompt (text) or chat messages, exactly one.
PROMPT_OR_MESSAGES: dict[str, Any] = {"anyOf": [given("prompt", NAME), given("messages", {"type": "array"})],
                      "not": {"required": ["prompt", "messages"]}}
# Legacy completions: echo does not go with logprobs, and suffix is not supported (empty or null only).
COMPLETION_RULES: list[Any] = [{"if": given("echo", {"const": True}), "then": {"properties": {"logprobs": NULL}}}]

# ---- Responses input -------------------------------------------------------------------------------------
INPUT_PARTS = {"type": "array", "items": {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["input_text", "output_text", "text", "refusal"]}, "text": {"type": ["string", "null"]},
    "refusal": {"type": ["string", "null"]}}}}
_CONTENT = {"anyOf": [NAME, INPUT_PARTS]}
_REASONING_PARTS = {"type": "array", "items": {"type": "object", "properties": {"text": NAME}}}
INPUT_ITEMS = {"type": "array", "items": {"anyOf": [
    {"type": "object", "required": ["role", "content"], "properties": {
        "type": {"const": "message"}, "role": {"enum": ["user", "assistant", "system", "developer"]},
        "content": _CONTENT}},
    {"type": "object", "required": ["type", "call_id", "name", "arguments"], "properties": {
        "type": {"const": "function_call"}, "call_id": NAME, "name": NAME, "arguments": NAME}},
    {"type": "object", "required": ["type", "call_id", "output"], "properties": {
        "type": {"const": "function_call_output"}, "call_id": NAME, "output": _CONTENT}},
    {"type": "object", "required": ["type"], "properties": {
        "type": {"const": "reasoning"}, "summary": {"anyOf": [_REASONING_PARTS, NULL]},
        "content": {"anyOf": [_REASONING_PARTS, NULL]}},
     "description": "earlier thinking (content's text, else summary's): the chat template reads it as the "
                    "reasoning_content of the assistant turn that follows"},
]}, "contains": {"anyOf": [{**given("role", {"enum": ["user", "assistant", "developer"]}),
                                       "properties": {"role": {"enum": ["user", "assistant", "developer"]},
                                                      "type": {"const": "message"}}},
                            given("type", {"enum": ["function_call", "function_call_output"]})]},
    "description": "at least one item other than a system message"}

# ---- Anthropic content -----------------------------------------------------------------------------------
ANTHROPIC_TEXT = {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"},
                                                                                 "text": NAME}}
_IGNORED_BLOCK = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["thinking", "redacted_thinking"]}}, "description": "ignored (thinking is read only as a "
                                                                        "message's own block)"}
ANTHROPIC_TEXT_BLOCKS = {"type": "array", "items": {"anyOf": [ANTHROPIC_TEXT, _IGNORED_BLOCK]}}
ANTHROPIC_BLOCKS = {"type": "array", "items": {"anyOf": [
    ANTHROPIC_TEXT,
    {"type": "object", "required": ["type", "thinking"], "properties": {
        "type": {"const": "thinking"}, "thinking": NAME, "signature": {"anyOf": [NAME, NULL]}},
     "description": "earlier thinking: the chat template reads it as the assistant message's reasoning_content"},
    {"type": "object", "required": ["type"], "properties": {"type": {"const": "redacted_thinking"}},
     "description": "accepted and left out: its thinking is encrypted"},
    {"type": "object", "required": ["type", "id", "name", "input"], "properties": {
        "type": {"const": "tool_use"}, "id": NAME, "name": NAME, "input": OBJECT}},
    {"type": "object", "required": ["type", "tool_use_id"], "properties": {
        "type": {"const": "tool_result"}, "tool_use_id": NAME, "is_error": {"type": ["boolean", "null"]},
        "content": {"anyOf": [NAME, NULL, ANTHROPIC_TEXT_BLOCKS]}}},
]}}

# Anthropic's tool_choice; "any" and "tool" ask for a call, so the request must list tools.
_PARALLEL = {"disable_parallel_tool_use": {"type": ["boolean", "null"]}}
ANTHROPIC_TOOL_CHOICE = {"anyOf": [
    {"type": "object", "required": ["type"], "properties": {"type": {"enum": ["auto", "any", "none"]}, **_PARALLEL}},
    {"type": "object", "required": ["type", "name"], "properties": {"type": {"const": "tool"}, "name": NAME,
                                                                    **_PARALLEL},
     "description": "names one of the request's tools"}]}
# list[Any]: json_schema_extra takes JSON values, which mypy does not infer for nested literals.
ANTHROPIC_RULES: list[Any] = [{
    "if": given("tool_choice", {"type": "object", "required": ["type"],
                                "properties": {"type": {"enum": ["any", "tool"]}}}),
    "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}},
}]
# Responses: a tool_choice that asks for a call ("required", a named function) needs tools.
RESPONSES_RULES: list[Any] = [FORCED_TOOL_NEEDS_TOOLS]


def conversation_items(min_items: int, max_items: int) -> dict:
    """A conversation's items: the input items a response reads (messages, calls, their outputs, reasoning)."""
    return {"type": "array", "items": INPUT_ITEMS["items"], "minItems": min_items, "maxItems": max_items}


ANTHROPIC_THINKING = {"type": "object", "required": ["type"], "oneOf": [
    {"properties": {"type": {"const": "enabled"}, "budget_tokens": {"type": "integer", "minimum": 1}},
     "required": ["budget_tokens"]},
    {"properties": {"type": {"enum": ["disabled", "adaptive"]}}}],
    "description": "enabled: thinking on, at most budget_tokens of it (fewer than max_tokens); disabled: "
                   "thinking off (the template's reasoning_effort 'none'); adaptive: the template's default"}
