"""Tool calls in a model's answer, one parser per model family, chosen by `serve --tool-call-parser` (vLLM's names).

Every parser has the interface of `ToolParser`: `feed(delta)` gives the content that is safe to
stream, `finish()` the rest and the calls (OpenAI-shaped), and `grammar(...)` the llguidance grammar
of a call in the family's own format, so an enforced call is written the way the model was trained.
"""

from __future__ import annotations

from typing import Any, Literal

from llmctl.server.tools.base import Function, ToolParser, openai_call
from llmctl.server.tools.detect import detect_parser
from llmctl.server.tools.harmony import HarmonyParser
from llmctl.server.tools.hermes import HermesParser
from llmctl.server.tools.llama import Llama3JsonParser
from llmctl.server.tools.mistral import ARGS, MistralNamedParser, MistralParser
from llmctl.server.tools.pythonic import PythonicParser
from llmctl.server.tools.qwen3_coder import Qwen3CoderParser

PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (
    HermesParser, Llama3JsonParser, PythonicParser, MistralParser, Qwen3CoderParser, HarmonyParser)}
ALIASES = {"llama4_pythonic": "pythonic"}  # vLLM's other name for the same format
ToolCallParser = Literal["auto", "none", "hermes", "llama3_json", "pythonic", "llama4_pythonic", "mistral",
                         "qwen3_coder", "openai"]
# Kept for the code that still names the Hermes format directly.
HermesToolParser = HermesParser

__all__ = ["ALIASES", "PARSERS", "Function", "HermesParser", "HermesToolParser", "ToolCallParser", "ToolParser",
           "detect_parser", "hidden_specials", "openai_call", "parser_class", "resolve_parser",
           "special_tokens"]


def parser_class(name: str | None) -> type[ToolParser] | None:
    """The parser registered under ``name`` (vLLM's name or alias); None for "none" or no name."""
    if not name or name == "none":
        return None
    return PARSERS[ALIASES.get(name, name)]


def resolve_parser(name: str | None, tokenizer: Any) -> tuple[type[ToolParser] | None, str]:
    """The parser a server uses for ``--tool-call-parser name`` and this tokenizer, and why (for the log)."""
    chosen: type[ToolParser] | None
    if name == "auto":
        found, why = detect_parser(tokenizer)
        if found is None:
            return None, f"auto: {why}; tool calls stay text (set --tool-call-parser to parse them)"
        chosen, why = PARSERS[found], f"auto: {why}"
    else:
        chosen, why = parser_class(name), "--tool-call-parser " + (name or "none")
    if chosen is MistralParser and ARGS in tokenizer.get_vocab():  # tokenizer v11 on: name[ARGS]{...}
        return MistralNamedParser, why + "; [ARGS] calls"
    return chosen, why


def hidden_specials(tokenizer: Any, *parsers: Any) -> frozenset[int] | None:
    """The special tokens to leave out of the text, when ``parsers`` need some of them kept; None: leave out all.

    A family whose calls or thinking are marked by special tokens (`[TOOL_CALLS]`, `<|python_tag|>`,
    `<think>`, harmony's channels) is parsed from text that keeps those tokens (each parser class names
    them in ``special_tokens``); every other special token stays hidden.
    """
    names = {t for parser in parsers if parser is not None for t in parser.special_tokens}
    if not names:
        return None
    vocab = tokenizer.get_vocab()
    kept = {vocab[t] for t in names if t in vocab}
    if not kept:
        return None
    return frozenset(set(special_tokens(tokenizer)) - kept)


def special_tokens(tokenizer: Any) -> dict[int, str]:
    """The vocabulary's special tokens (id to text): the named ones and the added tokens marked special, which
    the grammar engine sees as tokens, never as text."""
    special = dict(zip(getattr(tokenizer, "all_special_ids", []), getattr(tokenizer, "all_special_tokens", []),
                       strict=False))  # the same tokens, in order (a wrapper missing one list gives none)
    special |= {i: t.content for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()
                if getattr(t, "special", False)}
    return special
