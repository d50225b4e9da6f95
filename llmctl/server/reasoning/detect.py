"""`--reasoning-parser auto`: whether (and how) a model marks its thinking, from its chat template and tokenizer."""

from __future__ import annotations

from typing import Any

from llmctl.server.tools.detect import Signs, first_sign

# (parser, what in the chat template shows it, why) in the order they are tried.
TEMPLATE_SIGNS: Signs = (
    ("openai_gptoss", ("<|channel|>", "analysis"), "the template writes harmony's analysis channel (gpt-oss)"),
    ("deepseek_r1", ("</think>", "｜Assistant｜"), "the template writes <think> with DeepSeek's turns (DeepSeek-R1)"),
    ("qwen3", ("</think>",), "the template writes <think>...</think> (Qwen3, QwQ, SmolLM3 and kin)"),
)
# (parser, tokens of the vocabulary that show it, why): for models whose template says nothing.
TOKEN_SIGNS: Signs = (
    ("openai_gptoss", ("<|channel|>",), "the tokenizer has harmony's <|channel|> token (gpt-oss)"),
    ("qwen3", ("<think>", "</think>"), "the tokenizer has <think> and </think> tokens"),
)


def detect_reasoning(tokenizer: Any) -> tuple[str | None, str]:
    """The reasoning parser for this model's markup, and why; (None, why) when it marks no thinking."""
    return first_sign(tokenizer, TEMPLATE_SIGNS, TOKEN_SIGNS) or (
        None, "neither the chat template nor the vocabulary has thinking markers")
