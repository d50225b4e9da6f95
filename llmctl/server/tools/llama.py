"""Llama 3.1/3.2/3.3 JSON calls: `{"name": ..., "parameters": {...}}`, the whole answer or after `<|python_tag|>`."""

from __future__ import annotations

import json
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, json_rule, lit
from llmctl.server.tools.hermes import call_schema, object_call

PYTHON_TAG = "<|python_tag|>"
SEPARATOR = "; "  # between calls, as Meta's prompt format and vLLM's llama3_json parser have them


def json_objects(text: str) -> list[object] | None:
    """The JSON values of ``text`` separated by whitespace or ";"; None when anything else is in between."""
    decoder, at = json.JSONDecoder(), 0
    values: list[object] = []
    while True:
        while at < len(text) and text[at] in " \t\r\n;":
            at += 1
        if at == len(text):
            return values
        try:
            value, at = decoder.raw_decode(text, at)
        except (ValueError, RecursionError):
            return None
        values.append(value)


class Llama3JsonParser(ToolParser):
    """The answer is one or more JSON calls; text before `<|python_tag|>` streams as content."""

    name = "llama3_json"
    markers = (PYTHON_TAG,)
    at_start = ("{",)
    special_tokens = (PYTHON_TAG,)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        head, _, body = text.partition(PYTHON_TAG) if PYTHON_TAG in text else ("", "", text)
        values = json_objects(body)
        calls = [object_call(v, ("parameters", "arguments")) for v in values or []]
        found = [call for call in calls if call is not None]
        if not found or len(found) < len(calls):
            return text, []
        return head, found

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        lines = ["calls: call" if single else f"calls: call ({lit(SEPARATOR)} call)*",
                 "call: " + json_rule(call_schema(functions, "parameters"))]
        if free_text:  # text that does not start like a call, or calls
            return "\n".join(["start: TEXT | calls",
                              r"TEXT: /(?s:.*)/ & ~/(?s:\s*\{.*)/ & ~/(?s:.*<\|python_tag\|>.*)/", *lines])
        return "\n".join(["start: calls", *lines])
