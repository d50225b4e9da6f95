"""gpt-oss' harmony format: messages on channels; a call is a `commentary` message to `functions.NAME`.

The answer after the prompt's `<|start|>assistant` is a run of messages, each a header (channel,
recipient, content type) then `<|message|>` and a body ended by `<|end|>`, `<|call|>` or `<|return|>`
(the last two also end generation, so they are often absent from the text). The `final` channel (and
`commentary` with no recipient, the model's preamble to its calls) is content; `analysis` is the
model's reasoning, which is not shown; a message to `functions.NAME` is a call with JSON arguments.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from llmctl.server.tools.base import Function, ToolParser, held_prefix, json_rule, lit, marker, openai_call

START, CHANNEL, MESSAGE, CONSTRAIN = "<|start|>", "<|channel|>", "<|message|>", "<|constrain|>"
ENDS = ("<|end|>", "<|call|>", "<|return|>", START)
RECIPIENT = re.compile(r"to=([^\s<]+)")
SHOWN = ("final", "commentary")


class HarmonyParser(ToolParser):
    """Streams the `final` channel as content; messages to `functions.*` become calls (when the request has tools)."""

    name = "openai"
    special_tokens = (START, CHANNEL, MESSAGE, CONSTRAIN, "<|end|>", "<|call|>", "<|return|>")
    always = True

    def __init__(self, tools: list[dict] | None = None) -> None:
        super().__init__(tools)
        self.reading_header = True  # False inside a message's body
        self.shown = False  # whether the current body is content
        self.recipient: str | None = None
        self.body = ""
        self.calls: list[dict] = []
        self.messages = 0  # messages whose header was read

    def feed(self, delta: str) -> str:
        self.text += delta
        out: list[str] = []
        while self.sent < len(self.text):
            if self.reading_header:
                at = self.text.find(MESSAGE, self.sent)
                if at < 0:  # the header is read once it is whole
                    break
                self._open(self.text[self.sent:at])
                self.sent = at + len(MESSAGE)
                continue
            found = [(at, end) for end in ENDS if (at := self.text.find(end, self.sent)) >= 0]
            if not found:
                stop = len(self.text) - max(held_prefix(self.text, self.sent, end) for end in ENDS)
                self._take(self.text[self.sent:stop], out)
                self.sent = stop
                break
            at, end = min(found)
            self._take(self.text[self.sent:at], out)
            self._close()
            self.sent = at + (0 if end == START else len(end))
        return "".join(out)

    def _open(self, header: str) -> None:
        after = header.split(CHANNEL, 1)[1].split() if CHANNEL in header else []
        channel = after[0] if after else "final"
        recipient = RECIPIENT.search(header)
        self.recipient = recipient.group(1) if recipient else None
        self.shown = self.recipient is None and channel.split(CONSTRAIN)[0] in SHOWN
        self.reading_header, self.body = False, ""
        self.messages += 1

    def _take(self, text: str, out: list[str]) -> None:
        self.body += text
        if self.shown:
            out.append(text)

    def _close(self) -> None:
        if not self.reading_header and self.recipient is not None and self.recipient.startswith("functions."):
            try:  # arguments cut short (max_tokens) make no call
                arguments = json.loads(self.body)
            except (ValueError, RecursionError):
                arguments = None
            if isinstance(arguments, dict) and self.tools:  # no tools (or tool_choice "none"): no calls
                self.calls.append(openai_call(self.recipient[len("functions."):], arguments))
        self.reading_header, self.body, self.shown = True, "", False

    def finish(self) -> tuple[str, list[dict]]:
        if self.messages == 0:  # no harmony message at all: the text is the answer, as written
            rest, self.sent = self.text, len(self.text)
            return rest, []
        rest = self.text[self.sent:] if not self.reading_header and self.shown else ""
        self.sent = len(self.text)
        self.body += rest
        self._close()
        return rest, self.calls

    @classmethod
    def grammar(cls, functions: Sequence[Function], *, single: bool, free_text: bool,
                specials: frozenset[str] = frozenset()) -> str | None:
        if free_text:
            return None  # a call can follow reasoning on any channel: not enforced without forcing it
        lines = ["start: " + " | ".join(f"call_{i}" for i in range(len(functions)))]
        for i, f in enumerate(functions):
            head = (marker(CHANNEL, specials), lit(f"commentary to=functions.{f.name} "), marker(CONSTRAIN, specials),
                    lit("json"), marker(MESSAGE, specials))
            lines.append(f"call_{i}: {' '.join(head)} args_{i}")
            lines.append(f"args_{i}: {json_rule(f.schema)}")
        return "\n".join(lines)
