"""The one interface every tool-call parser has: stream content, parse calls at the end, write a call's grammar."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar


@dataclass(frozen=True)
class Function:
    """A tool the answer may call, as a grammar needs it: its name and the JSON schema of its arguments."""

    name: str
    schema: dict


def openai_call(name: str, arguments: Any) -> dict:
    """One call in OpenAI's `tool_calls` shape (arguments as JSON text)."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def json_rule(schema: dict | bool) -> str:
    """A Lark rule body (llguidance's dialect) for JSON valid against ``schema``, written as json.dumps writes it."""
    from llmctl.engine.structured import JSON_OPTIONS  # here, not above: `llmctl serve` reads this package
    # before its preflight, and the engine loads torch

    body = schema if isinstance(schema, dict) else {}
    return "%json " + json.dumps({"x-guidance": JSON_OPTIONS, **body}, ensure_ascii=False)


def lit(text: str) -> str:
    """A Lark string literal."""
    return json.dumps(text, ensure_ascii=False)


def marker(text: str, specials: frozenset[str]) -> str:
    """A format's marker in a Lark grammar: a reference to the special token ``text`` where the vocabulary has
    one (llguidance's ``<|name|>`` syntax; a special token is never spelled by text tokens), else a literal."""
    return text if text in specials else lit(text)


def held_prefix(text: str, start: int, marker: str) -> int:
    """How many characters at the end of ``text[start:]`` may be the beginning of ``marker``."""
    for n in range(min(len(marker) - 1, len(text) - start), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


class ToolParser:
    """Splits one streamed answer into content and tool calls, for one model family's format.

    Text before a call streams as content (`feed`); from the first marker of a call on, the answer is
    held back and parsed when it ends (`finish`). A family whose calls are the whole answer (a JSON
    object, a Python list) sets ``at_start``: an answer that begins with one of its markers is held.
    What does not parse as calls comes back as content, as written.
    """

    name: ClassVar[str]
    markers: ClassVar[tuple[str, ...]] = ()  # text that starts the calls, anywhere in the answer
    at_start: ClassVar[tuple[str, ...]] = ()  # text that starts the calls only at the start of the answer
    special_tokens: ClassVar[tuple[str, ...]] = ()  # special tokens of the format, which must stay in the text
    always: ClassVar[bool] = False  # parse answers to requests without tools too (the format has channels)

    def __init__(self, tools: list[dict] | None = None) -> None:
        self.tools = {t["function"]["name"]: t["function"] for t in tools or []
                      if isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)}
        self.text = ""
        self.sent = 0  # characters of text already handed out as content
        self.calling = False

    # ---- streaming ------------------------------------------------------------------------------
    def feed(self, delta: str) -> str:
        """The content that is safe to send now (never the start of a tool call)."""
        self.text += delta
        if self.calling:
            return ""
        if self.sent == 0 and self.at_start:
            head = self.text.lstrip()
            if not head or any(m.startswith(head) or head.startswith(m) for m in self.at_start):
                self.calling = any(head.startswith(m) for m in self.at_start)
                return ""  # whitespace, or what may still become a call: wait for more
        found = [at for m in self.markers if (at := self.text.find(m, self.sent)) >= 0]
        if found:
            self.calling, end = True, min(found)
        else:
            end = len(self.text) - max((held_prefix(self.text, self.sent, m) for m in self.markers), default=0)
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: the content not sent yet, and the tool calls, OpenAI-shaped."""
        rest = self.text[self.sent:]
        self.sent = len(self.text)
        if not self.calling:
            return rest, []
        content, calls = self.parse(rest)
        if not calls:
            return rest, []
        return content.strip(), calls

    def parse(self, text: str) -> tuple[str, list[dict]]:
        """The text from the first call on: the content left over and the calls (none: the text stays content)."""
        raise NotImplementedError

    # ---- enforcement ------------------------------------------------------------------------------
    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str | None:
        """A Lark grammar (llguidance's dialect) for calls to ``functions`` written in this family's format;
        None where this family's calls are not enforced so.

        ``single``: exactly one call, else one or more. ``free_text``: the answer may be text with no
        call; a call it does make must still match. ``specials``: the text of the vocabulary's special
        tokens, which the grammar must name as tokens (`marker`).
        """
        raise NotImplementedError


def argument_sequence(schema: dict, item: str, sep: str = ", ") -> list[str]:
    """Lark alternatives for keyword arguments written in the schema's property order, separated by ``sep``.

    Required properties always appear, optional ones may be left out; ``item`` names the rule of one
    argument as ``item_<i>``. A schema without properties takes no argument (the empty alternative).
    """
    props = list((schema.get("properties") or {}).keys()) if isinstance(schema, dict) else []
    required = set(schema.get("required") or []) if isinstance(schema, dict) else set()
    alternatives = []
    for first in range(len(props)):
        if any(p in required for p in props[:first]):
            break
        parts = [f"{item}_{first}"]
        for j in range(first + 1, len(props)):
            parts.append(f"{lit(sep)} {item}_{j}" if props[j] in required else f"({lit(sep)} {item}_{j})?")
        alternatives.append(" ".join(parts))
    if not required:
        alternatives.append('""')
    return alternatives
