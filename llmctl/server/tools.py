"""Tool calls in a model's answer, turned into OpenAI's `tool_calls`.

The Hermes format, `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, is what the chat
templates of Qwen 2/2.5/3, Hermes, SmolLM3 and many fine-tunes teach their models to write. Text
before the first call streams as content; from `<tool_call>` on, the answer is held back and
parsed when it ends. A block that is not valid JSON with a "name" stays in the content, as written.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Literal

ToolCallParser = Literal["hermes"]
OPEN, CLOSE = "<tool_call>", "</tool_call>"
BLOCK = re.compile(re.escape(OPEN) + r"\s*(.*?)\s*(?:" + re.escape(CLOSE) + r"|$)", re.DOTALL)


class HermesToolParser:
    """Splits a streamed answer into content and tool calls."""

    def __init__(self) -> None:
        self.text = ""
        self.sent = 0  # characters of text already handed out as content
        self.calling = False

    def feed(self, delta: str) -> str:
        """The content that is safe to send now (never the start of a tool call)."""
        self.text += delta
        if self.calling:
            return ""
        start = self.text.find(OPEN, self.sent)
        if start >= 0:
            self.calling = True
            end = start
        else:  # hold back what may be the beginning of "<tool_call>"
            hold = next((n for n in range(min(len(OPEN) - 1, len(self.text) - self.sent), 0, -1)
                         if self.text.endswith(OPEN[:n])), 0)
            end = len(self.text) - hold
        out, self.sent = self.text[self.sent:end], end
        return out

    def finish(self) -> tuple[str, list[dict]]:
        """At the end of the answer: the content not sent yet, and the tool calls, OpenAI-shaped."""
        calls: list[dict] = []

        def take(match: re.Match) -> str:
            try:
                call = json.loads(match.group(1))
            except ValueError:
                return match.group(0)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                return match.group(0)
            arguments = call.get("arguments", call.get("parameters", {}))
            calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {
                "name": call["name"],
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False),
            }})
            return ""

        rest = BLOCK.sub(take, self.text[self.sent:])
        self.sent = len(self.text)
        return (rest.strip() if calls else rest), calls
