"""Hermes: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` (Qwen 2/2.5/3, Hermes, SmolLM3, fine-tunes)."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, json_rule, lit, openai_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


def call_schema(functions: Sequence[Function], key: str) -> dict:
    """The JSON schema of one call object, ``{"name": ..., key: {...}}``, to any of ``functions``."""
    variants = [{"type": "object", "properties": {"name": {"const": f.name}, key: f.schema},
                 "required": ["name", key], "additionalProperties": False} for f in functions]
    return variants[0] if len(variants) == 1 else {"anyOf": variants}


def json_call(text: str, keys: tuple[str, ...] = ("arguments", "parameters")) -> dict | None:
    """A call from a JSON object with a "name" and its arguments under one of ``keys``; None if it is not one."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return object_call(value, keys)


def object_call(value: object, keys: tuple[str, ...] = ("arguments", "parameters")) -> dict | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments: object = next((value[k] for k in keys if k in value), {})
    return openai_call(value["name"], arguments)


class HermesParser(ToolParser):
    """`<tool_call>` blocks of JSON; a block that is not valid JSON with a "name" stays content, as written."""

    name = "hermes"
    markers = (OPEN,)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        calls: list[dict] = []

        def take(match: re.Match) -> str:
            call = json_call(match.group(1))
            if call is None:
                return match.group(0)
            calls.append(call)
            return ""

        rest = BLOCK.sub(take, text)
        return rest, calls

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        call = "call: " + json_rule(call_schema(functions, "arguments"))
        close = lit("\n" + CLOSE)
        if not free_text:
            body = f"body: {lit(OPEN + chr(10))} call {close}"
            return "\n".join(["start: body" if single else 'start: body ("\\n" body)*', body, call])
        # Text that holds no call, or text up to the first "<tool_call>" and then calls only.
        rest = "" if single else f' ("\\n" {lit(OPEN)} call_rest)*'
        return "\n".join([
            "start: TEXT | PREFIX call_rest" + rest,
            "TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/",
            "PREFIX: /(?s:.*<tool_call>)/ & ~/(?s:.*<tool_call>.+)/",
            f'call_rest: "\\n" call {close}',
            call,
        ])
