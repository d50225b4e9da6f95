"""gpt-oss' harmony format: the `analysis` channel is the thinking; every other message is the answer.

The output is a run of messages, each a header (`<|channel|>NAME`, maybe a recipient) then
`<|message|>`, a body and `<|end|>` (or `<|call|>` / `<|return|>`, which end generation, or the next
`<|start|>`). Analysis bodies come out as thinking; every other message is passed on as written, so
the harmony tool-call parser reads the `final` text and the calls from it.
"""

from __future__ import annotations

from llmctl.server.reasoning.base import Opening, Piece, ReasoningParser
from llmctl.server.tools.base import held_prefix
from llmctl.server.tools.harmony import CHANNEL, CONSTRAIN, ENDS, MESSAGE, START

END_TOKENS = ("<|end|>", "<|call|>", "<|return|>")


class GptOssParser(ReasoningParser):
    """The `analysis` channel as thinking; the rest (final text, commentary, calls) as harmony answer text."""

    name = "openai_gptoss"
    start = f"{CHANNEL}analysis{MESSAGE}"
    end = f"{CHANNEL}final{MESSAGE}"
    close = f"<|end|>{START}assistant{CHANNEL}final{MESSAGE}"
    special_tokens = (START, CHANNEL, MESSAGE, CONSTRAIN, *END_TOKENS)
    answer_format = "openai"
    call_start = f"<|end|>{START}assistant"

    def __init__(self, opening: Opening = "either") -> None:
        super().__init__(opening)
        self.in_header = opening != "thinking"  # False inside a message's body
        self.analysis = opening == "thinking"  # whether the current message is thinking
        self.seen_answer = opening == "answer"
        self.thinking_text = ""
        self.messages = 0
        self.pending = ""  # answer text to hand out first
        if opening == "answer":  # the prompt opened the final message: the answer reader gets its header
            self.in_header, self.pending, self.messages = False, self.end, 1

    @property
    def reasoning_text(self) -> str:
        return self.thinking_text

    @property
    def thinking(self) -> bool:
        return not self.seen_answer and (self.in_header or self.analysis)

    def feed(self, delta: str) -> Piece:
        self.text += delta
        reasoning: list[str] = []
        answer: list[str] = [self.pending]
        self.pending = ""
        while self.sent < len(self.text):
            if self.in_header:
                at = self.text.find(MESSAGE, self.sent)
                if at < 0:  # the header is read once it is whole
                    break
                header = self.text[self.sent:at + len(MESSAGE)]
                self.sent = at + len(MESSAGE)
                after = header.split(CHANNEL, 1)[1].split() if CHANNEL in header else []
                self.analysis = bool(after) and after[0].split(MESSAGE)[0] == "analysis" and "to=" not in header
                self.in_header = False
                self.messages += 1
                if self.analysis:
                    if self.thinking_text or any(reasoning):
                        reasoning.append("\n")  # one thinking text from several analysis messages
                    self.thought += header
                else:
                    self.seen_answer = True
                    answer.append(header)
                continue
            found = [(at, end) for end in ENDS if (at := self.text.find(end, self.sent)) >= 0]
            if found:
                at, end = min(found)
                stop = at + (0 if end == START else len(end))
            else:
                at = stop = len(self.text) - max(held_prefix(self.text, self.sent, end) for end in ENDS)
            body = self.text[self.sent:at]
            if self.analysis:
                reasoning.append(body)
                self.thought += self.text[self.sent:stop]
            else:
                answer.append(self.text[self.sent:stop])
            self.sent = stop
            if not found:
                break
            self.in_header = True
        out = Piece("".join(reasoning), "".join(answer))
        self.thinking_text += out.reasoning
        return out

    def finish(self) -> Piece:
        if self.messages == 0 and self.in_header:  # no harmony message at all: the text is the answer, as written
            rest, self.sent = self.text[self.sent:], len(self.text)
            return Piece(answer=rest)
        if not self.in_header and not self.analysis:  # what an unfinished end marker held back
            rest, self.sent = self.text[self.sent:], len(self.text)
            return Piece(answer=rest)
        return Piece()
