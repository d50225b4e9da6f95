"""Mistral: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`, or `[TOOL_CALLS]name[ARGS]{...}` (tokenizer v11)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, json_rule, lit, openai_call
from llmctl.server.tools.hermes import call_schema, object_call
from llmctl.server.tools.llama import json_objects

TOOL_CALLS, ARGS, CALL_ID = "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"
NAMED = re.compile(r"\s*([A-Za-z0-9_.\-]+)\s*(?:\[CALL_ID\]\s*\S+?\s*)?\[ARGS\]")


def named_calls(body: str) -> list[dict] | None:
    """`name[ARGS]{...}` calls, one after another; None when the text is not such calls."""
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(body):
        if body.startswith(TOOL_CALLS, at) or body[at].isspace():
            at += len(TOOL_CALLS) if body.startswith(TOOL_CALLS, at) else 1
            continue
        match = NAMED.match(body, at)
        if match is None:
            return None
        try:
            arguments, at = decoder.raw_decode(body, match.end())
        except (ValueError, RecursionError):
            return None
        calls.append(openai_call(match.group(1), arguments))
    return calls or None


class MistralParser(ToolParser):
    """Calls after the `[TOOL_CALLS]` token; text before it streams as content."""

    name = "mistral"
    markers = (TOOL_CALLS,)
    special_tokens = (TOOL_CALLS, ARGS, CALL_ID)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        head, _, body = text.partition(TOOL_CALLS)
        if ARGS in body:
            calls = named_calls(body)
        else:  # a JSON list of calls (or one call), possibly split over several [TOOL_CALLS]
            values = json_objects(body.replace(TOOL_CALLS, " "))
            flat = [c for v in values or [] for c in (v if isinstance(v, list) else [v])]
            found = [object_call(v) for v in flat]
            calls = [c for c in found if c is not None]
            if len(calls) < len(found):  # one value that is not a call: the text is not calls
                calls = []
        return (head, calls) if calls else (text, [])

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        lines = ['list: "[" call "]"' if single else 'list: "[" call (", " call)* "]"',
                 "call: " + json_rule(call_schema(functions, "arguments"))]
        if free_text:  # text without the marker, or text up to it and then the calls
            return "\n".join(["start: TEXT | PREFIX list", r"TEXT: /(?s:.*)/ & ~/(?s:.*\[TOOL_CALLS\].*)/",
                              r"PREFIX: /(?s:.*\[TOOL_CALLS\])/ & ~/(?s:.*\[TOOL_CALLS\].+)/", *lines])
        return "\n".join([f"start: {lit(TOOL_CALLS)} list", *lines])


class MistralNamedParser(MistralParser):
    """Mistral, tokenizer v11 on (an `[ARGS]` token): same parsing; enforced calls as `[TOOL_CALLS]name[ARGS]{...}`."""

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        lines = ["call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
        for i, f in enumerate(functions):
            lines.append(f"call_{i}: {lit(f.name + ARGS)} args_{i}")
            lines.append(f"args_{i}: {json_rule(f.schema)}")
        marker = lit(TOOL_CALLS)
        if free_text:
            rest = "" if single else f" ({marker} call)*"
            return "\n".join(["start: TEXT | PREFIX call" + rest, r"TEXT: /(?s:.*)/ & ~/(?s:.*\[TOOL_CALLS\].*)/",
                              r"PREFIX: /(?s:.*\[TOOL_CALLS\])/ & ~/(?s:.*\[TOOL_CALLS\].+)/", *lines])
        return "\n".join([f"start: {marker} call" + ("" if single else f" ({marker} call)*"), *lines])
