"""`<think>...</think>` before the answer: DeepSeek-R1 (and its distills, QwQ) and Qwen3 (and SmolLM3)."""

from __future__ import annotations

from llmctl.server.reasoning.base import ReasoningParser


class DeepSeekR1Parser(ReasoningParser):
    """DeepSeek-R1: the output is thinking up to `</think>`, whether or not it writes the opening `<think>`
    (its templates from 2025-01 on put `<think>\\n` in the prompt, and the model often leaves it out)."""

    name = "deepseek_r1"
    thinks_unopened = True


class Qwen3Parser(ReasoningParser):
    """Qwen3 (hybrid thinking): thinking only when the output (or the prompt) opens `<think>`; an output
    that does not is the answer (thinking switched off, or an instruct model with the same vocabulary)."""

    name = "qwen3"
