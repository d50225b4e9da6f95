"""What the API modules share: server-sent events, and thinking and tool calls per choice."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmctl.errors import LLMCtlError
from llmctl.server.reasoning import Piece, ReasoningParser
from llmctl.server.tools import ToolParser

if TYPE_CHECKING:
    from llmctl.server.pipeline import Delta, Run


def sse(body: dict) -> str:
    """One `data:` event (OpenAI's chat and legacy completions)."""
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_event(name: str, body: dict) -> str:
    """One named event (`event:` then `data:`), as the Responses and Anthropic streams send them."""
    return f"event: {name}\n{sse(body)}"


# The x-request-id of the request whose stream is being produced (`with_request_id`): an error that comes after
# the headers goes in the stream, and names it as an error body does.
STREAM_REQUEST_ID: ContextVar[str | None] = ContextVar("llmctl_stream_request_id", default=None)


def with_request_id(stream: Iterator[str], request_id: str) -> Iterator[str]:
    """``stream``, each step of it run with `STREAM_REQUEST_ID` set to ``request_id`` (a stream is produced
    after its request's handler returned, while the server writes it)."""
    try:
        while True:
            token = STREAM_REQUEST_ID.set(request_id)
            try:
                chunk = next(stream)
            except StopIteration:
                return
            finally:
                STREAM_REQUEST_ID.reset(token)
            yield chunk
    finally:
        close = getattr(stream, "close", None)
        if close is not None:  # a client gone: the stream's own cleanup (cancel the generation) runs now
            close()


def stream_error(exc: LLMCtlError) -> dict:
    """OpenAI's error envelope for an error inside a stream, with the request's id."""
    body = exc.to_body()
    if (request_id := STREAM_REQUEST_ID.get()) is not None:
        body["error"]["request_id"] = request_id
    return body


def request_id_field() -> dict:
    """``{"request_id": ...}`` for an error event of a named-event stream (nothing outside a request's stream)."""
    request_id = STREAM_REQUEST_ID.get()
    return {} if request_id is None else {"request_id": request_id}


def json_arguments(text: str) -> dict:
    """A tool call's arguments as an object (Anthropic's `input`); text that is not a JSON object is kept
    under one key rather than lost."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


@dataclass(frozen=True)
class Shown:
    """What one choice hands out at a time: thinking, and answer text (never markup of either)."""

    reasoning: str = ""
    content: str = ""


class ChoiceText:
    """One choice's text as it streams: the thinking split out when the server has a reasoning parser, then
    tool calls split out of the answer (never out of the thinking) when it parses them.

    ``count`` turns text into its number of tokens (for `reasoning_tokens`).
    """

    def __init__(self, parser: ToolParser | None, reasoning: ReasoningParser | None = None,
                 count: Callable[[str], int] | None = None) -> None:
        self.tools, self.reasoning, self.count = parser, reasoning, count
        self.text = ""  # the answer handed out
        self.thinking = ""  # the thinking handed out

    def feed(self, delta: str) -> Shown:
        """The thinking and answer text that are safe to show now."""
        return self._take(self.reasoning.feed(delta) if self.reasoning is not None else Piece(answer=delta))

    def _take(self, piece: Piece) -> Shown:
        shown = self.tools.feed(piece.answer) if self.tools is not None else piece.answer
        self.text += shown
        self.thinking += piece.reasoning
        return Shown(piece.reasoning, shown)

    def answer(self, calls: list[dict]) -> str:
        """The whole text as a plain (not streamed) answer gives it: trimmed when tool calls follow it."""
        return self.text.strip() if calls else self.text

    def finish(self, cut: bool = False) -> tuple[Shown, list[dict]]:
        """At the end: the thinking and text not shown yet, and the tool calls (OpenAI-shaped).

        When max_tokens ``cut`` the answer, what the parser still holds back is a call (or the start of
        one) that was never finished: it is dropped, so its markup never reaches the content.
        """
        rest = self._take(self.reasoning.finish()) if self.reasoning is not None else Shown()
        if self.tools is None:
            return rest, []
        tail, calls = self.tools.finish()
        if cut:
            tail = ""
        self.text += tail
        return Shown(rest.reasoning, rest.content + tail), calls

    @property
    def reasoning_tokens(self) -> int:
        """The tokens the thinking took (its markup included); 0 without a reasoning parser."""
        if self.reasoning is None or self.count is None or not self.reasoning.thought:
            return 0
        return self.count(self.reasoning.thought)


class TextPieces:
    """One choice's thinking and text to show as it streams (tool calls held back), the rest at the end.

    After the iteration ``calls`` holds the tool calls, or stays None when the client went away.
    """

    def __init__(self, run: Run, deltas: Iterator[Delta], text: ChoiceText) -> None:
        self.run, self.deltas, self.text = run, deltas, text
        self.calls: list[dict] | None = None

    def __iter__(self) -> Iterator[Shown]:
        for delta in self.deltas:
            shown = self.text.feed(delta.text)
            if shown.reasoning or shown.content:
                yield shown
        if self.run.cancelled:
            return
        rest, self.calls = self.text.finish(cut=self.run.gens[0].finish_reason == "length")
        if rest.reasoning or rest.content:
            yield rest
