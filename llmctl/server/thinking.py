"""Thinking switched and bounded per request: each API's switch as chat-template variables and a budget, and
the engine's `Thinking` (token ids) for a rendered prompt and the server's reasoning parser.

The switches follow vLLM's mapping, so a client written for vLLM gets the same prompt here:

- chat and Responses: ``chat_template_kwargs`` reach the template as variables (``enable_thinking``);
  ``reasoning_effort`` (Responses: ``reasoning.effort``) is the template's ``reasoning_effort`` (gpt-oss'
  "Reasoning: low|medium|high"), and unless ``chat_template_kwargs`` sets it, ``enable_thinking`` is
  whether the effort is other than "none";
- chat's ``thinking_token_budget`` (vLLM's name; -1: no bound) and Anthropic's ``thinking``:
  ``{"type": "enabled", "budget_tokens": N}`` (a budget), ``{"type": "disabled"}`` (effort "none"),
  ``{"type": "adaptive"}`` (the template's default).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import Field, StrictInt, WithJsonSchema

from llmctl.engine.thinking import Thinking
from llmctl.errors import InvalidRequest
from llmctl.server.reasoning import ReasoningParser

ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
# vLLM's: a budget of thinking tokens, or -1 for none.
ThinkingBudget = Annotated[StrictInt, Field(ge=-1)]
# What llmctl itself passes to the template: a request may not set these through chat_template_kwargs.
RESERVED = ("messages", "tools", "documents", "add_generation_prompt", "continue_final_message", "tokenize",
            "chat_template", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs", "padding",
            "truncation", "max_length", "return_tensors", "raise_exception", "strftime_now")
TemplateKwargs = Annotated[dict[str, Any], WithJsonSchema({
    "type": "object", "propertyNames": {"not": {"enum": list(RESERVED)}},
    "description": "variables for the chat template (enable_thinking, ...), as vLLM takes them"})]


@dataclass(frozen=True)
class ThinkingAsk:
    """A request's switches: variables for the chat template, and the most thinking tokens (None: no bound)."""

    template_kwargs: dict[str, Any] = field(default_factory=dict)
    budget: int | None = None


def chat_switches(kwargs: dict | None, effort: str | None, budget: int | None = None,
                  kwargs_param: str = "chat_template_kwargs") -> ThinkingAsk:
    """The switches of a chat or Responses request (400 naming the field for a key llmctl sets itself)."""
    variables = dict(kwargs or {})
    for key in variables:
        if not isinstance(key, str) or key in RESERVED:
            raise InvalidRequest(f"'{kwargs_param}' may not set '{key}': the server sets it itself.",
                                 param=f"{kwargs_param}.{key}")
    if effort is not None:
        variables.setdefault("reasoning_effort", effort)
        variables.setdefault("enable_thinking", effort != "none")
    return ThinkingAsk(variables, None if budget is None or budget < 0 else budget)


def anthropic_switches(thinking: dict | None, max_tokens: int | None, kwargs: dict | None = None) -> ThinkingAsk:
    """Anthropic's ``thinking`` (checked here, 400 naming ``thinking.*`` as Anthropic's API does; ``max_tokens``
    None: token counting, which has none to compare the budget with)."""
    if thinking is None:
        return chat_switches(kwargs, None)
    kind = thinking.get("type")
    if kind == "disabled":
        return chat_switches(kwargs, "none")
    if kind == "adaptive":
        return chat_switches(kwargs, None)
    if kind != "enabled":
        raise InvalidRequest("thinking.type must be 'enabled', 'disabled' or 'adaptive'.", param="thinking.type")
    budget = thinking.get("budget_tokens")
    if not isinstance(budget, int) or isinstance(budget, bool) or budget < 1:
        raise InvalidRequest("thinking.budget_tokens must be a positive integer when thinking is enabled.",
                             param="thinking.budget_tokens")
    if max_tokens is not None and budget >= max_tokens:
        raise InvalidRequest(f"max_tokens ({max_tokens}) must be greater than thinking.budget_tokens ({budget}).",
                             param="thinking.budget_tokens")
    switches = chat_switches(kwargs, None)
    variables = {**switches.template_kwargs}
    variables.setdefault("enable_thinking", True)
    return ThinkingAsk(variables, budget)


def engine_thinking(parser: ReasoningParser | None, tokenizer, budget: int | None,
                    forced_call: bool = False) -> Thinking | None:
    """Where the engine must look for the end of thinking, for a prompt whose output ``parser`` (made for that
    prompt: `Service.reasoning_parser`) reads; None when the output is all answer (no parser, or the prompt
    closed the thinking), so a constraint applies from its first token and a budget has nothing to bound.
    ``forced_call``: the constraint is an enforced tool call (which starts elsewhere in harmony)."""
    if parser is None or not parser.thinking:
        return None

    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    end, close = (parser.call_start, parser.call_start) if forced_call and parser.call_start else \
        (parser.end, parser.close)
    return Thinking(end=ids(end), close=ids(close), start=ids(parser.start), inside=parser.expect_thinking,
                    budget=budget)
