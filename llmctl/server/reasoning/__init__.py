"""Thinking kept apart from the answer, one parser per model family, chosen by `serve --reasoning-parser`.

Every parser has the interface of `ReasoningParser` (what an engine and the API modules use):

- ``start`` / ``end``: the text that opens / ends the thinking in the output (`<think>` / `</think>`; for
  gpt-oss' harmony, the `analysis` channel's header / the `final` channel's header: the point where the
  answer starts). A constraint on the answer (a JSON schema, an enforced call) starts after ``end``.
- ``close``: the text an engine appends to end the thinking itself when a thinking budget runs out
  (`\\n</think>\\n\\n`; harmony: `<|end|><|start|>assistant<|channel|>final<|message|>`, special tokens).
- ``opening(prompt)`` (and ``starts_inside(prompt)``): where the output of a rendered prompt begins.
  DeepSeek-R1 and Qwen3 templates often end the generation prompt with `<think>\\n` (so the output has
  no opening tag: "thinking"), or with `<think>\\n\\n</think>\\n\\n` when thinking is switched off
  ("answer"); otherwise the output's first text tells ("either").
- ``special_tokens``: tokens of the markup that must stay in the detokenized text.
- ``answer_format``: the tool-call parser that must read the answer (harmony's markup), or None.
- A parser instance, made per choice with ``opening(prompt)``: ``feed(delta)`` returns a `Piece` (the
  thinking and answer text safe to hand out now, never a part of the markup), ``finish()`` the rest;
  ``thinking`` says whether the output is still inside the thinking, ``reasoning_text`` is the thinking
  so far and ``thought`` the raw output that was thinking (to count its tokens).

Tool calls are parsed from the answer only, never from the thinking: the answer text a reasoning
parser hands out is what the tool-call parser (`llmctl.server.tools`) reads.
"""

from __future__ import annotations

from typing import Any, Literal

from llmctl.server.reasoning.base import Opening, Piece, ReasoningParser
from llmctl.server.reasoning.detect import detect_reasoning
from llmctl.server.reasoning.harmony import GptOssParser
from llmctl.server.reasoning.think import DeepSeekR1Parser, Qwen3Parser

PARSERS: dict[str, type[ReasoningParser]] = {p.name: p for p in (DeepSeekR1Parser, Qwen3Parser, GptOssParser)}
ReasoningParserName = Literal["auto", "none", "deepseek_r1", "qwen3", "openai_gptoss"]

__all__ = ["PARSERS", "DeepSeekR1Parser", "GptOssParser", "Opening", "Piece", "Qwen3Parser", "ReasoningParser",
           "ReasoningParserName", "detect_reasoning", "resolve_reasoning"]


def resolve_reasoning(name: str | None, tokenizer: Any) -> tuple[type[ReasoningParser] | None, str]:
    """The parser a server uses for ``--reasoning-parser name`` and this tokenizer, and why (for the log)."""
    if name == "auto":
        found, why = detect_reasoning(tokenizer)
        if found is None:
            return None, f"auto: {why}; any thinking stays in the answer (set --reasoning-parser to split it)"
        return PARSERS[found], f"auto: {why}"
    if not name or name == "none":
        return None, "--reasoning-parser none"
    return PARSERS[name], f"--reasoning-parser {name}"
