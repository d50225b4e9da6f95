"""What one request is answered with, resolved once when it is admitted (`Service.admit`, `Service.context`): the
loaded model, the served model name and LoRA adapter the request names, the tool-call and reasoning formats,
the special tokens grammars may name, the server's limits, and token ids as text. The API modules read
everything they need from it, so nothing after admission calls back into the service but `Service.start`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmctl.errors import ModelNotFound
from llmctl.server.limits import RequestLimits
from llmctl.server.tools import PARSERS, HermesParser, ToolParser

if TYPE_CHECKING:
    from llmctl.core.loader import LoadedModel
    from llmctl.engine.text import TokenText
    from llmctl.server.loras import Loras
    from llmctl.server.reasoning import ReasoningParser

PROMPT_TAIL_TOKENS = 32  # the end of a prompt, decoded, shows whether it opened or closed the thinking


@dataclass(frozen=True)
class RequestContext:
    """A ready server, as one request sees it; ``model`` and ``adapter``: what it runs (`serving`)."""

    loaded: LoadedModel
    token_text: TokenText  # token ids to text and bytes (logprobs, /tokenize)
    limits: RequestLimits
    tool_format: type[ToolParser] | None = None  # the family whose tool calls are parsed
    reasoning_format: type[ReasoningParser] | None = None  # the family whose thinking is split out
    grammar_specials: frozenset[str] = frozenset()  # the text of the special tokens, named so in grammars
    loras: Loras | None = None  # the LoRA adapters served (None: adapters are off)
    model: str = ""  # the served model name the answer carries (the base model's until `serving`)
    adapter: str | None = None  # the LoRA adapter the request runs with (None: the base model)

    def serving(self, asked: str | None) -> RequestContext:
        """This context for the model a request names (none: the base model); 404 for a name not served."""
        base = self.loaded.name
        if not asked or asked == base:
            return dataclasses.replace(self, model=base, adapter=None)
        if self.loras is not None and asked in self.loras:
            return dataclasses.replace(self, model=asked, adapter=asked)
        raise not_found(asked, base, self.loras)

    def tool_parser(self, tools: list[dict] | None, enabled: bool = True, forced: bool = False) -> ToolParser | None:
        """A parser for one choice's answer: when the request sends tools (and does not turn them off with
        tool_choice "none"), or always for a format whose channels must be read (harmony, also when the
        reasoning parser hands on a harmony answer). A forced call on a server without a parser is
        written, and so parsed, in the Hermes format."""
        answer_format = self.reasoning_format.answer_format if self.reasoning_format else None
        family = self.tool_format or (PARSERS[answer_format] if answer_format else None) or (
            HermesParser if forced else None)
        if family is None or not (tools and enabled or family.always):
            return None
        return family(tools if enabled else None)

    def reasoning_parser(self, prompt: list[int]) -> ReasoningParser | None:
        """A parser for one choice's output, starting where the rendered ``prompt`` leaves the model."""
        family = self.reasoning_format
        if family is None:
            return None
        tail = self.loaded.tokenizer.decode(prompt[-PROMPT_TAIL_TOKENS:], skip_special_tokens=False)
        return family(family.opening(tail))

    def count_tokens(self, text: str) -> int:
        """How many tokens ``text`` is in the served model's vocabulary (markup tokens counted as one)."""
        return len(self.loaded.tokenizer.encode(text, add_special_tokens=False))


def not_found(name: str, base: str, loras: Loras | None) -> ModelNotFound:
    """404 for a model this server does not serve (naming the models it does)."""
    if loras is not None:
        return loras.not_found(name)
    return ModelNotFound(f"The model '{name}' does not exist; this server serves '{base}'.", param="model")
