"""Qwen3-Coder's XML calls: `<tool_call><function=name><parameter=key>value</parameter></function></tool_call>`."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, argument_sequence, json_rule, lit, openai_call

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION = re.compile(r"(?:<tool_call>\s*)?<function=([^>\n]+)>(.*?)</function>\s*(?:</tool_call>)?", re.DOTALL)
PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)


def typed(value: str, schema: object) -> object:
    """A parameter's text as the type its schema gives (a string when it says string or cannot be read)."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    if kind == "string":
        return value
    try:
        return json.loads(value)
    except ValueError:
        pass
    try:  # the model wrote a Python literal (True, single quotes)
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, RecursionError, MemoryError):
        return value


def string_value(schema: dict, name: str, lines: list[str]) -> str:
    """The rule of a string parameter's raw text up to `</parameter>`: one of its `enum`, at most `maxLength`
    characters, or any text (a terminal called ``name`` is added to ``lines`` when needed)."""
    choices = schema.get("enum")
    if isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices):
        return "(" + " | ".join(lit(c + "\n</parameter>") for c in choices) + ")"
    most = schema.get("maxLength")
    if not isinstance(most, int) or isinstance(most, bool) or most < 0:
        return "STRING_VALUE"
    lines.append(rf"{name}: /(?s:.{{0,{most}}}\n<\/parameter>)/ & ~/(?s:.*<\/parameter>.+)/")
    return name


class Qwen3CoderParser(ToolParser):
    """`<tool_call>` blocks of `<function=...>` with one `<parameter=...>` per argument, typed by the tool's schema."""

    name = "qwen3_coder"
    markers = (OPEN, "<function=")

    def parse(self, text: str) -> tuple[str, list[dict]]:
        calls, spans = [], []
        for match in FUNCTION.finditer(text):
            name = match.group(1).strip()
            properties = (self.tools.get(name, {}).get("parameters") or {}).get("properties") or {}
            arguments = {key.strip(): typed(value, properties.get(key.strip()))
                         for key, value in PARAMETER.findall(match.group(2))}
            calls.append(openai_call(name, arguments))
            spans.append(match.span())
        rest = text
        for start, end in reversed(spans):
            rest = rest[:start] + rest[end:]
        return rest.replace(OPEN, "").replace(CLOSE, ""), calls

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        lines = [f"call: {' | '.join(f'call_{i}' for i in range(len(functions)))}",
                 r"STRING_VALUE: /(?s:.*\n<\/parameter>)/ & ~/(?s:.*<\/parameter>.+)/"]
        for i, f in enumerate(functions):
            lines.append(f"call_{i}: {lit(f'<function={f.name}>' + chr(10))} "
                         f"({' | '.join(argument_sequence(f.schema, f'arg_{i}', ''))}) {lit('</function>' + chr(10))}")
            for j, (key, schema) in enumerate((f.schema.get("properties") or {}).items()):
                head = lit(f"<parameter={key}>\n")
                if isinstance(schema, dict) and schema.get("type") == "string":  # raw text, as the template shows it
                    lines.append(f"arg_{i}_{j}: {head} {string_value(schema, f'STRING_{i}_{j}', lines)} \"\\n\"")
                else:
                    lines.append(f"arg_{i}_{j}: {head} value_{i}_{j} {lit(chr(10) + '</parameter>' + chr(10))}")
                    lines.append(f"value_{i}_{j}: {json_rule(schema)}")
        block = f"{lit(OPEN + chr(10))} call {lit(CLOSE)}"  # each part on its own line, as the template writes it
        if free_text:
            rest = "" if single else f' ("\\n" {lit(OPEN)} call_rest)*'
            return "\n".join([
                "start: TEXT | PREFIX call_rest" + rest,
                "TEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/",
                "PREFIX: /(?s:.*<tool_call>)/ & ~/(?s:.*<tool_call>.+)/",
                f'call_rest: "\\n" call {lit(CLOSE)}', *lines])
        return "\n".join([f"start: {block}" if single else f'start: {block} ("\\n" {block})*', *lines])
