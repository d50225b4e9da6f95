"""POST /v1/completions: OpenAI's legacy text completions over the shared pipeline.

The prompt is taken as it is (no chat template): a string, a list of strings, token ids, or lists of
token ids; each prompt gets n choices, numbered prompt by prompt. `echo` puts the prompt in front
of each choice's text. `logprobs` (an integer) gives the legacy shape: tokens, token_logprobs,
top_logprobs (the chosen token and the most likely ones) and text_offset.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import ConfigDict, Field, StrictBool, StrictInt

from llmctl.errors import InvalidRequest, LLMCtlError
from llmctl.server.api import rules
from llmctl.server.api.chat_models import MIN_LOGPROB, OpenAISampling, Usage
from llmctl.server.api.common import sse, stream_error
from llmctl.server.api.prompts import text_prompt
from llmctl.server.api.rules import documented
from llmctl.server.api.validation import Strict, parse_body
from llmctl.server.limits import check_request
from llmctl.server.pipeline import Ask, Delta, Run
from llmctl.server.thinking import ThinkingBudget, chat_switches, engine_thinking

if TYPE_CHECKING:
    from llmctl.engine.sampling import TokenLogprobs
    from llmctl.engine.text import TokenText
    from llmctl.server.service import Service

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this API
MAX_PROMPTS = 64
TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0)]], Field(min_length=1)]
# A text prompt has at least one token; the tokenizer says so for text that tokenizes to none.
Text = Annotated[str, Field(min_length=1)]


class CompletionRequest(OpenAISampling):
    prompt: Text | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = DEFAULT_MAX_TOKENS
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool | None = False
    best_of: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    # Not supported: documented as empty, and a 400 that says so otherwise.
    suffix: Annotated[str, documented({"type": "string", "maxLength": 0})] | None = None
    thinking_token_budget: ThinkingBudget | None = None  # vLLM's, as on chat: for a prompt that opens thinking

    model_config = ConfigDict(json_schema_extra={"allOf": rules.COMPLETION_RULES})

    def prompts(self) -> list[str | list[int]]:
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        ids = [t for t in prompt if isinstance(t, int)]
        if ids:  # one prompt of token ids (the field's type: all ids, or none)
            return [ids]
        return [p for p in prompt if not isinstance(p, int)]


# ---- the answer's shape (the OpenAPI document's; tests validate real answers against it) ----------------
class LegacyLogprobs(Strict):
    """With `logprobs: N`: each token's text and log-probability, the chosen and N most likely tokens at its
    place, and where the token starts in the choice's text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(Strict):
    index: int
    text: str
    logprobs: LegacyLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class TextCompletion(Strict):
    """The answer to /v1/completions; when streamed, each event has this shape (without usage, except the
    last one when `stream_options.include_usage` is true, whose choices are empty), then `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


def handle(service: Service, body: object, disconnected: Callable[[], bool] | None = None) -> dict | Iterator[str]:
    """Answer one text completion: a response body, or an iterator of SSE lines when streaming."""
    arrived = time.monotonic()
    context = service.admit()
    req = parse_body(CompletionRequest, body)
    context = context.serving(req.model)
    loaded = context.loaded
    if req.suffix:
        raise InvalidRequest("suffix (insertion after the completion) is not supported by this server.",
                             param="suffix")
    n = req.n or 1
    if req.best_of is not None and req.best_of != n:
        raise InvalidRequest(f"best_of ({req.best_of}) other than n ({n}) is not supported: every choice "
                             "generated is returned.", param="best_of")
    if req.echo and req.logprobs is not None:
        raise InvalidRequest("echo with logprobs is not supported: this server does not score prompt tokens.",
                             param="echo")
    prompts = [text_prompt(loaded.tokenizer, p) for p in req.prompts()]
    max_tokens, cap = req.max_tokens, context.limits.max_tokens_cap
    if "max_tokens" not in req.model_fields_set and cap is not None:
        max_tokens = min(DEFAULT_MAX_TOKENS, cap)  # the default obeys the cap
    check_request(context.limits, choices=n * len(prompts))
    asks = [Ask(ids, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
                logit_bias=req.logit_bias, seed=req.seed, ignore_eos=req.ignore_eos, logprobs=req.logprobs,
                stops=tuple(req.stops()), n=n, timeout=req.timeout, prompt_param="prompt",
                thinking=engine_thinking(context.reasoning_parser(ids), loaded.tokenizer,
                                         chat_switches(None, None, req.thinking_token_budget).budget))
            for ids in prompts]
    run = service.start(context, asks, arrived, disconnected)
    echoes = [loaded.tokenizer.decode(ids) if req.echo else "" for ids in prompts for _ in range(n)]
    logprobs = _LegacyLogprobs(context.token_text, run, echoes) if req.logprobs is not None else None
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _events(run, run.stream(), echoes, context.model, logprobs, include_usage)
    return _answer(run, echoes, context.model, logprobs)


def _answer(run: Run, echoes: list[str], model: str, logprobs: _LegacyLogprobs | None) -> dict:
    """The `text_completion` body, once every choice has finished."""
    texts = run.collect()
    choices = [CompletionChoice(index=i, text=echoes[i] + text, logprobs=logprobs.take(i) if logprobs else None,
                                finish_reason=_finish_reason(gen.finish_reason))
               for i, (gen, text) in enumerate(zip(run.gens, texts, strict=False))]
    return TextCompletion(id=completion_id(), object="text_completion", created=int(time.time()), model=model,
                          choices=choices,
                          usage=Usage.of(run.prompt_tokens, run.completion_tokens, run.cached_tokens)).model_dump()


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex[:24]}"


def _finish_reason(reason: str | None) -> Literal["stop", "length"]:
    return "length" if reason == "length" else "stop"


class _LegacyLogprobs:
    """Each choice's logprobs in the legacy shape, taken as its tokens arrive."""

    def __init__(self, token_text: TokenText, run: Run, echoes: list[str]) -> None:
        self.token_text = token_text
        self.run = run
        self.offsets = [len(e) for e in echoes]  # text_offset runs on across a streamed choice's chunks

    def take(self, index: int) -> LegacyLogprobs:
        items: list[TokenLogprobs] = self.run.gens[index].take_logprobs()
        tokens, offsets = [], []
        for item in items:
            tokens.append(self._text(item.token))
            offsets.append(self.offsets[index])
            self.offsets[index] += len(tokens[-1])
        # The chosen token last: it keeps its own entry when an alternative has the same text.
        top = [{self._text(t): _clip(v) for t, v in item.top} | {self._text(item.token): _clip(item.logprob)}
               for item in items]
        return LegacyLogprobs(tokens=tokens, token_logprobs=[_clip(i.logprob) for i in items], top_logprobs=top,
                              text_offset=offsets)

    def _text(self, token: int) -> str:
        return self.token_text.text_of(token)


def _clip(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def _events(run: Run, deltas: Iterator[Delta], echoes: list[str], model: str, logprobs: _LegacyLogprobs | None,
            include_usage: bool) -> Iterator[str]:
    cid, created = completion_id(), int(time.time())

    def chunk(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = TextCompletion(id=cid, object="text_completion", created=created, model=model, choices=choices)
        if usage is not None:
            body.usage = usage
        return sse(body.model_dump())

    def choice(index: int, text: str, finish_reason: Literal["stop", "length"] | None = None) -> str:
        lp = logprobs.take(index) if logprobs else None
        return chunk([CompletionChoice(index=index, text=text, logprobs=lp, finish_reason=finish_reason)])

    try:
        for index, echo in enumerate(echoes):
            if echo:
                yield chunk([CompletionChoice(index=index, text=echo, logprobs=None, finish_reason=None)])
        for delta in deltas:
            gen = run.gens[delta.index]
            if delta.text:
                yield choice(delta.index, delta.text)
            if delta.done and gen.finish_reason != "cancelled":
                yield choice(delta.index, "", _finish_reason(gen.finish_reason))
        if run.cancelled:
            return
        if include_usage:
            yield chunk([], Usage.of(run.prompt_tokens, run.completion_tokens, run.cached_tokens))
        yield "data: [DONE]\n\n"
    except LLMCtlError as exc:
        yield sse(stream_error(exc))  # headers are already sent: in-band, as OpenAI does, then the stream's end
        yield "data: [DONE]\n\n"
    finally:
        run.end()
