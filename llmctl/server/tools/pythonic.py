"""Pythonic calls: `[get_weather(city="Paris"), ...]` (Llama 3.2 and 4, many fine-tunes; vLLM's `pythonic`)."""

from __future__ import annotations

import ast
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, argument_sequence, json_rule, lit, openai_call

START, END = "<|python_start|>", "<|python_end|>"  # Llama 4 wraps its calls in these
# JSON's literals, so that arguments a grammar writes as JSON read back as the same values.
NAMES = {"true": True, "false": False, "null": None, "True": True, "False": False, "None": None}


def literal(node: ast.expr) -> object:
    """A Python (or JSON) literal's value; anything else raises ValueError."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in NAMES:
        return NAMES[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {literal(k): literal(v) for k, v in zip(node.keys, node.values, strict=False) if k is not None}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = literal(node.operand)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return -value if isinstance(node.op, ast.USub) else value
    raise ValueError("not a literal")


def python_calls(text: str) -> list[dict] | None:
    """The calls of a Python list of calls with keyword arguments; None when the text is not one."""
    try:
        tree = ast.parse(text.strip(), mode="eval").body
    except (SyntaxError, ValueError, RecursionError):
        return None
    if not isinstance(tree, ast.List) or not tree.elts:
        return None
    calls = []
    for node in tree.elts:
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        try:
            arguments = {kw.arg: literal(kw.value) for kw in node.keywords if kw.arg is not None}
        except (ValueError, RecursionError):
            return None
        calls.append(openai_call(node.func.id, arguments))
    return calls


class PythonicParser(ToolParser):
    """The answer is a Python list of calls (inside `<|python_start|>`...`<|python_end|>` on Llama 4)."""

    name = "pythonic"
    markers = (START,)
    at_start = ("[",)
    special_tokens = (START, END)

    def parse(self, text: str) -> tuple[str, list[dict]]:
        head, body = "", text
        if START in text:
            head, _, body = text.partition(START)
            body = body.split(END, 1)[0]
        calls = python_calls(body)
        return (head, calls) if calls else (text, [])

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str:
        lines = ['calls: "[" call "]"' if single else 'calls: "[" call (", " call)* "]"',
                 "call: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
        for i, f in enumerate(functions):
            lines.append(f"call_{i}: {lit(f.name + '(')} ({' | '.join(argument_sequence(f.schema, f'arg_{i}'))}) \")\"")
            for j, (key, schema) in enumerate((f.schema.get("properties") or {}).items()):
                lines.append(f"arg_{i}_{j}: {lit(key + '=')} value_{i}_{j}")
                lines.append(f"value_{i}_{j}: {json_rule(schema)}")
        if free_text:
            return "\n".join(["start: TEXT | calls", r"TEXT: /(?s:.*)/ & ~/(?s:\s*\[.*)/", *lines])
        return "\n".join(["start: calls", *lines])
