"""What the API modules share: server-sent events, the model check, and tool calls per choice."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING

from llmctl.errors import ModelNotFound
from llmctl.server.tools import ToolParser

if TYPE_CHECKING:
    from llmctl.server.pipeline import Delta, Run


def sse(body: dict) -> str:
    """One `data:` event (OpenAI's chat and legacy completions)."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_event(name: str, body: dict) -> str:
    """One named event (`event:` then `data:`), as the Responses and Anthropic streams send them."""
    return f"event: {name}\n{sse(body)}"


def check_model(asked: str | None, served: str) -> None:
    if asked and asked != served:
        raise ModelNotFound(f"The model '{asked}' does not exist; this server serves '{served}'.", param="model")


def json_arguments(text: str) -> dict:
    """A tool call's arguments as an object (Anthropic's `input`); text that is not a JSON object is kept
    under one key rather than lost."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


class ChoiceText:
    """One choice's text as it streams, with tool calls split out when the server parses them."""

    def __init__(self, parser: ToolParser | None) -> None:
        self.tools = parser
        self.text = ""

    def feed(self, delta: str) -> str:
        """The text that is safe to show now."""
        shown = self.tools.feed(delta) if self.tools is not None else delta
        self.text += shown
        return shown

    def answer(self, calls: list[dict]) -> str:
        """The whole text as a plain (not streamed) answer gives it: trimmed when tool calls follow it."""
        return self.text.strip() if calls else self.text

    def finish(self, cut: bool = False) -> tuple[str, list[dict]]:
        """At the end: the text not shown yet, and the tool calls (OpenAI-shaped).

        When max_tokens ``cut`` the answer, what the parser still holds back is a call (or the start of
        one) that was never finished: it is dropped, so its markup never reaches the content.
        """
        if self.tools is None:
            return "", []
        rest, calls = self.tools.finish()
        if cut:
            rest = ""
        self.text += rest
        return rest, calls


class TextPieces:
    """One choice's text to show as it streams (tool calls held back), the rest at the end.

    After the iteration ``calls`` holds the tool calls, or stays None when the client went away.
    """

    def __init__(self, run: Run, deltas: Iterator[Delta], text: ChoiceText) -> None:
        self.run, self.deltas, self.text = run, deltas, text
        self.calls: list[dict] | None = None

    def __iter__(self) -> Iterator[str]:
        for delta in self.deltas:
            shown = self.text.feed(delta.text)
            if shown:
                yield shown
        if self.run.cancelled:
            return
        rest, self.calls = self.text.finish(cut=self.run.gens[0].finish_reason == "length")
        if rest:
            yield rest
