"""The limits every API checks a request against, whichever API it came through: how many messages it sends
(`--max-messages`), how many choices it runs side by side (`--max-num-seqs`), and how many tokens it may
generate (the context window, the KV cache budget, `--max-tokens-cap`, `--default-max-tokens`)."""

from __future__ import annotations

from dataclasses import dataclass

from llmctl.errors import ContextLengthExceeded, InvalidRequest


@dataclass(frozen=True)
class RequestLimits:
    """The server's limits on one request (from `serve`'s flags and the engine's bounds)."""

    max_messages: int = 1024
    max_num_seqs: int = 256  # choices run as rows of the batch
    kv_budget: int = 1 << 30  # the engine's KV cache budget, in tokens
    max_tokens_cap: int | None = None  # reject requests asking for more
    default_max_tokens: int | None = None  # when a request names no max_tokens (None: what fits)


def check_request(limits: RequestLimits, *, messages: int = 0, choices: int = 1, messages_param: str = "messages",
                  unit: str = "messages") -> None:
    """400 when the request sends more than ``--max-messages`` messages (``unit`` and ``messages_param``: what
    the API calls them), or asks for more choices than the batch holds (n choices run as rows of it). Each
    handler calls it once, with its own field names, before the prompt is built."""
    if messages > limits.max_messages:
        raise InvalidRequest(f"{messages} {unit} is more than this server's limit of {limits.max_messages}.",
                             param=messages_param)
    if choices > limits.max_num_seqs:
        raise InvalidRequest(f"n is {choices}, more than this server runs at once ({limits.max_num_seqs}, its "
                             "--max-num-seqs).", param="n")


def max_new_tokens(limits: RequestLimits, context: int, prompt_tokens: int, asked: int | None, *, param: str,
                   where: str) -> int:
    """The tokens a request may generate: ``asked`` (its max_tokens, named ``param``) checked against the context
    window, the KV budget and the cap, or what fits when it asked for none (``where``: what the API calls its
    prompt). 400 `context_length_exceeded` when the prompt leaves no room."""
    cap, budget = limits.max_tokens_cap, limits.kv_budget
    if cap is not None and asked is not None and asked > cap:
        raise InvalidRequest(f"{param} is {asked}, above this server's limit of {cap}.", param=param)
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens, but the {where} use {prompt_tokens} "
            f"tokens. Shorten the {where}.", param=where)
    if asked is not None and prompt_tokens + asked > context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens, but {prompt_tokens + asked} were requested "
            f"({prompt_tokens} in the {where}, {asked} in the completion). Lower {param} to at most "
            f"{context - prompt_tokens}.", param=param)
    if asked is not None and prompt_tokens + asked > budget:
        raise InvalidRequest(
            f"This request needs {prompt_tokens + asked} tokens of KV cache ({prompt_tokens} in the {where}, "
            f"{asked} in the completion) but the server's budget is {budget}; lower {param} to at most "
            f"{max(1, budget - prompt_tokens)}.", param=param)
    if asked is not None:
        return asked
    # The rest of the context (the engine admits by what a sequence holds, so this costs no
    # concurrency), unless the operator capped it or set a default.
    fits = min(context, budget) - prompt_tokens
    for limit in (cap, limits.default_max_tokens):
        if limit is not None:
            fits = min(fits, limit)
    if fits < 1:
        raise ContextLengthExceeded(
            f"The {where} use {prompt_tokens} tokens, which leaves no room to answer within this server's "
            f"KV budget of {budget} tokens.", param=where)
    return fits
