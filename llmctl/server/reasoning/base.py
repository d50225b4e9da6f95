"""The one interface every reasoning parser has: split a streamed output into thinking and answer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from llmctl.server.tools.base import held_prefix

# Where a model's output begins, read from the end of its rendered prompt.
Opening = Literal["thinking", "answer", "either"]


@dataclass(frozen=True)
class Piece:
    """A part of the output that is safe to hand out now: thinking, and answer text."""

    reasoning: str = ""
    answer: str = ""


class Trimmed:
    """One channel of streamed text with its leading (and, with ``right``, trailing) whitespace left out.

    Whitespace at the start is dropped; with ``right``, whitespace at the end of what came so far is
    held until more text follows it (then it was inside the text) or the channel ends (then it is dropped).
    """

    def __init__(self, right: bool = True) -> None:
        self.right = right
        self.started = False
        self.held = ""
        self.text = ""  # everything handed out

    def add(self, text: str) -> str:
        if not self.started:
            text = text.lstrip()
            if not text:
                return ""
            self.started = True
        body = (self.held + text).rstrip() if self.right else self.held + text
        self.held = (self.held + text)[len(body):]
        self.text += body
        return body


class ReasoningParser:
    """Splits one streamed output into thinking and answer, for one model family's markup.

    ``start`` opens the thinking in the output, ``end`` ends it (the answer follows), and ``close`` is
    what an engine appends to end the thinking itself (a thinking budget). ``opening(prompt)`` tells
    where the output of a rendered prompt begins.
    """

    name: ClassVar[str]
    start: ClassVar[str] = "<think>"
    end: ClassVar[str] = "</think>"
    close: ClassVar[str] = "\n</think>\n\n"
    special_tokens: ClassVar[tuple[str, ...]] = ("<think>", "</think>")  # must stay in the detokenized text
    answer_format: ClassVar[str | None] = None  # the tool-call parser that must read the answer (its markup)
    # Where an enforced tool call's grammar starts, when not after ``end`` (harmony: a call is a message of its
    # own, so its grammar starts with the next message's header); an engine's budget closes the thinking there.
    call_start: ClassVar[str | None] = None
    # With no sign in the prompt, whether the output is thinking before its first sign: DeepSeek-R1 often
    # leaves out the opening tag; a hybrid model (Qwen3) that does not open it answers directly.
    thinks_unopened: ClassVar[bool] = False

    def __init__(self, opening: Opening = "either") -> None:
        self.text = ""
        self.sent = 0  # characters of text read
        self.state: Literal["head", "thinking", "answer"] = "head"
        self.expect_thinking = opening == "thinking" or (opening == "either" and self.thinks_unopened)
        self._reasoning = Trimmed()
        self._answer = Trimmed(right=False)  # the separator after the thinking is left out, nothing else
        self.thought = ""  # the raw output that was thinking, markup included (to count its tokens)
        if opening == "answer":
            self._begin(False)

    @classmethod
    def opening(cls, prompt: str) -> Opening:
        """Where the output of this rendered prompt begins: inside thinking the prompt opened, in the answer
        (the prompt closed the thinking: thinking switched off), or either (the output's first text tells)."""
        tail = prompt.rstrip()
        if tail.endswith(cls.end):
            return "answer"
        if tail.endswith(cls.start):
            return "thinking"
        return "either"

    @classmethod
    def starts_inside(cls, prompt: str) -> bool:
        """Whether the model's output for this rendered prompt is thinking from its first token on."""
        return cls.opening(prompt) == "thinking" or (cls.opening(prompt) == "either" and cls.thinks_unopened)

    @property
    def reasoning_text(self) -> str:
        """All the thinking handed out so far."""
        return self._reasoning.text

    @property
    def thinking(self) -> bool:
        """Whether the output read so far is inside the thinking (or may still open it)."""
        return self.state != "answer"

    def feed(self, delta: str) -> Piece:
        """The thinking and answer text that are safe to hand out now (never a part of the markup)."""
        self.text += delta
        reasoning, answer = "", ""
        if self.state == "head":
            head = self.text.lstrip()
            if len(head) < len(self.start) and self.start.startswith(head):
                return Piece()  # may still become the opening tag: wait for more
            if head.startswith(self.start):
                self.sent = len(self.text) - len(head) + len(self.start)
                self.state = "thinking"
            else:
                self._begin(self.expect_thinking)
        if self.state == "thinking":
            at = self.text.find(self.end, self.sent)
            stop = at if at >= 0 else len(self.text) - held_prefix(self.text, self.sent, self.end)
            reasoning = self._reasoning.add(self.text[self.sent:stop])
            self.sent = stop
            if at >= 0:
                self.sent = at + len(self.end)
                self.state = "answer"
            self.thought = self.text[:self.sent]
        if self.state == "answer":
            answer = self._answer.add(self.text[self.sent:])
            self.sent = len(self.text)
        return Piece(reasoning, answer)

    def finish(self) -> Piece:
        """At the end of the output: what is left (an unfinished opening tag is answer text, as written)."""
        if self.state == "head":
            self._begin(self.expect_thinking)
            return self.feed("")
        return Piece()

    def _begin(self, thinking: bool) -> None:
        """The output opened without the tag: thinking (the family's default) or the answer, kept as written."""
        self.state = "thinking" if thinking else "answer"
        self._answer.started = not thinking
