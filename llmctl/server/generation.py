"""One request's trip through the engine: prompt building, limits, and turning tokens into text."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llmctl.core.loader import LoadedModel
from llmctl.engine import Finish, SamplingParams, Sequence
from llmctl.engine.sampling import TokenLogprobs
from llmctl.engine.text import IncrementalDetokenizer, StopMatcher
from llmctl.errors import ContextLengthExceeded, InvalidRequest, RequestTimeout
from llmctl.server.schemas import ChatCompletionRequest

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a handler checks whether its client went away
DEADLINE_SLACK_S = 2.0  # past its deadline plus this, a handler gives up on its sequence by itself


def build_prompt(loaded: LoadedModel, req: ChatCompletionRequest) -> list[int]:
    """Render the chat template and tokenize it."""
    import jinja2

    messages = [m.for_template() for m in req.messages]
    extra = {"tools": req.tools} if req.tools else {}
    try:
        text = loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
    except jinja2.TemplateError as exc:
        raise InvalidRequest(f"The model's chat template rejected these messages: {exc}", param="messages") from exc
    except RecursionError:
        raise InvalidRequest("The messages or tools are nested too deeply to render.", param="tools" if req.tools
                             else "messages") from None
    return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class TokenLimits:
    """The server's limits on a request's tokens."""

    kv_budget: int  # the engine's KV cache budget, in tokens
    max_tokens_cap: int | None = None  # reject requests asking for more
    default_max_tokens: int | None = None  # when a request names no max_tokens (None: what fits)


def sampling_params(loaded: LoadedModel, req: ChatCompletionRequest, prompt_tokens: int,
                    limits: TokenLimits) -> SamplingParams:
    """Check the request against the context window and the server's limits; turn it into engine settings."""
    context, cap, budget = loaded.context_length, limits.max_tokens_cap, limits.kv_budget
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if cap is not None and asked is not None and asked > cap:
        raise InvalidRequest(f"{param} is {asked}, above this server's limit of {cap}.", param=param)
    if prompt_tokens >= context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens, but the messages use {prompt_tokens} "
            "tokens. Shorten the messages.", param="messages")
    if asked is not None and prompt_tokens + asked > context:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {context} tokens, but {prompt_tokens + asked} were requested "
            f"({prompt_tokens} in the messages, {asked} in the completion). Lower {param} to at most "
            f"{context - prompt_tokens}.", param=param)
    if asked is not None and prompt_tokens + asked > budget:
        raise InvalidRequest(
            f"This request needs {prompt_tokens + asked} tokens of KV cache ({prompt_tokens} in the messages, "
            f"{asked} in the completion) but the server's budget is {budget}; lower {param} to at most "
            f"{max(1, budget - prompt_tokens)}.", param=param)
    if asked is None:
        # The rest of the context (the engine admits by what a sequence holds, so this costs no
        # concurrency), unless the operator capped it or set a default.
        asked = min(context, budget) - prompt_tokens
        for limit in (cap, limits.default_max_tokens):
            if limit is not None:
                asked = min(asked, limit)
        if asked < 1:
            raise ContextLengthExceeded(
                f"The messages use {prompt_tokens} tokens, which leaves no room to answer within this server's "
                f"KV budget of {budget} tokens.", param="messages")
    bias: dict[int, float] = {}
    vocab = len(loaded.tokenizer)
    for key, value in (req.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias names token {token}, outside the vocabulary (0..{vocab - 1}).",
                                 param="logit_bias")
        bias[token] = value
    return SamplingParams(
        max_tokens=asked,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        frequency_penalty=req.frequency_penalty or 0.0,
        presence_penalty=req.presence_penalty or 0.0,
        logit_bias=bias,
        seed=req.seed,
        ignore_eos=req.ignore_eos,
        logprobs=(req.top_logprobs or 0) if req.logprobs else None,
    )


@dataclass
class Timing:
    arrived: float
    first_token: float | None = None
    last_token: float | None = None


class Generation:
    """Iterates over the text deltas of a submitted sequence, applying stop strings.

    After the iteration ends, ``finish_reason`` and ``completion_tokens`` are set. A timeout
    raises RequestTimeout; an engine failure raises the engine's error.
    """

    def __init__(self, seq: Sequence, tokenizer, stops: list[str], arrived: float,
                 disconnected: Callable[[], bool] | None = None) -> None:
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(stops)
        self.disconnected = disconnected
        self.timing = Timing(arrived)
        self.completion_tokens = 0
        self.streamed_tokens = 0  # tokens that arrived as events (not the end-of-sequence token)
        self._logprobs_taken = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        seq = self.seq
        next_check = time.monotonic() + POLL_S
        while True:
            try:
                event = seq.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            now = time.monotonic()
            # On a clock, not only when tokens pause: on a GPU they never pause for POLL_S.
            if now >= next_check:
                next_check = now + POLL_S
                if self.disconnected is not None and self.disconnected():
                    seq.cancel()
                    self.finish_reason = "cancelled"
                    return
                if seq.deadline is not None and now > seq.deadline + DEADLINE_SLACK_S:
                    # The engine ends timed-out sequences itself; this only guards against it never doing so.
                    seq.cancel()
                    yield from self._finish(Finish("timeout"))
                    return
            if event is None:
                continue
            if isinstance(event, Finish):
                yield from self._finish(event)
                return
            self.timing.first_token = self.timing.first_token or now
            self.timing.last_token = now
            self.completion_tokens += 1
            self.streamed_tokens += 1
            text, stopped = self.stops.feed(self.detok.add(event))
            if text:
                yield text
            if stopped:
                seq.cancel()
                self.finish_reason = "stop"
                return

    def _finish(self, event: Finish) -> Iterator[str]:
        if event.reason in ("stop", "length"):
            if event.reason == "stop":
                self.completion_tokens += 1  # the end-of-sequence token
            tail = self.stops.flush()
            if tail:
                yield tail
            self.finish_reason = event.reason
        elif event.reason == "timeout":
            self.finish_reason = "timeout"
            raise RequestTimeout(
                f"The request did not finish within its timeout ({self.completion_tokens} tokens generated); "
                "generation was stopped. Raise 'timeout' (max 300 s) or lower max_tokens.")
        elif event.reason == "cancelled":
            self.finish_reason = "cancelled"
        else:
            self.finish_reason = "error"
            raise event.error or RuntimeError("generation failed")

    def take_logprobs(self) -> list[TokenLogprobs]:
        """The log-probabilities of the tokens received since the last call (when the request asked)."""
        items = self.seq.logprobs[self._logprobs_taken:self.streamed_tokens]
        self._logprobs_taken += len(items)
        return items

    def close(self) -> None:
        """Stop the sequence if the consumer leaves before the end."""
        if not self.seq.done:
            self.seq.cancel()

    @property
    def ttft(self) -> float | None:
        return None if self.timing.first_token is None else self.timing.first_token - self.timing.arrived

    @property
    def itl(self) -> float | None:
        t = self.timing
        if t.first_token is None or t.last_token is None or self.streamed_tokens < 2:
            return None
        return (t.last_token - t.first_token) / (self.streamed_tokens - 1)
