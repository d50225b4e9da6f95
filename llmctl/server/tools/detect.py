"""`--tool-call-parser auto`: which family's format a model writes calls in, from its chat template and tokenizer."""

from __future__ import annotations

from typing import Any

Signs = tuple[tuple[str, tuple[str, ...], str], ...]  # (parser, signs that show it, why), in the order tried

# (parser, what in the chat template shows it, why) in the order they are tried: the more specific first
# (Qwen3-Coder's template also says <tool_call>; Llama 4's also describes JSON).
TEMPLATE_SIGNS: Signs = (
    ("openai", ("<|channel|>", "<|constrain|>"), "the template writes harmony channels (gpt-oss)"),
    ("qwen3_coder", ("<function=", "<parameter="), "the template writes <function=...><parameter=...> calls"),
    ("hermes", ("<tool_call>",), "the template writes <tool_call> blocks"),
    ("mistral", ("[TOOL_CALLS]",), "the template writes [TOOL_CALLS]"),
    ("pythonic", ("<|python_start|>",), "the template writes <|python_start|> calls (Llama 4)"),
    ("pythonic", ("[func_name1(",), "the template asks for [func_name(param=value)] calls (Llama 3.2)"),
    ("llama3_json", ("<|python_tag|>",), "the template uses <|python_tag|> (Llama 3.1/3.3)"),
    ("llama3_json", ('"parameters": dictionary of argument name',),
     'the template asks for JSON calls with "parameters" (Llama 3.1/3.2/3.3)'),
)
# (parser, a token of the tokenizer's vocabulary that shows it, why): for models whose template says nothing.
TOKEN_SIGNS: Signs = (
    ("openai", ("<|channel|>",), "the tokenizer has harmony's <|channel|> token (gpt-oss)"),
    ("mistral", ("[TOOL_CALLS]",), "the tokenizer has Mistral's [TOOL_CALLS] token"),
)


def template_text(tokenizer: Any) -> str:
    """All of a tokenizer's chat templates (one, or several by name) as one text."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        return "\n".join(str(t) for t in template.values())
    if isinstance(template, list):  # the form tokenizer_config.json may hold: [{"name", "template"}]
        return "\n".join(str(t.get("template", "")) for t in template if isinstance(t, dict))
    return template or ""


def first_sign(tokenizer: Any, template_signs: Signs, token_signs: Signs) -> tuple[str, str] | None:
    """The first (name, why) whose signs are all in the chat template, else all tokens of the vocabulary."""
    template = template_text(tokenizer)
    for name, signs, why in template_signs:
        if all(sign in template for sign in signs):
            return name, why
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for name, tokens, why in token_signs:
        if all(token in vocab for token in tokens):
            return name, why
    return None


def detect_parser(tokenizer: Any) -> tuple[str | None, str]:
    """The parser whose format this model writes, and why; (None, why) when it cannot be told."""
    found = first_sign(tokenizer, TEMPLATE_SIGNS, TOKEN_SIGNS)
    if found is not None:
        return found
    if "tools" in template_text(tokenizer):
        return None, "the chat template renders tools, but in no call format llmctl knows"
    return None, "the chat template does not render tools"
