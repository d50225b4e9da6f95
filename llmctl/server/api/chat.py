"""POST /v1/chat/completions: OpenAI's chat completions over the shared pipeline."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from llmctl.errors import InvalidRequest, LLMCtlError
from llmctl.server.api.chat_models import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    FinishReason,
    ToolCallDelta,
    Usage,
    completion_id,
)
from llmctl.server.api.chat_models import Delta as ChunkDelta
from llmctl.server.api.common import ChoiceText, sse, stream_error
from llmctl.server.api.prompts import build_prompt
from llmctl.server.api.validation import parse_body
from llmctl.server.constraints import chat_tool_use, constraint_from_request, output_constraint
from llmctl.server.limits import check_request
from llmctl.server.pipeline import Ask, Delta, Run
from llmctl.server.thinking import chat_switches, engine_thinking

if TYPE_CHECKING:
    from llmctl.server.context import RequestContext
    from llmctl.server.generation import Generation
    from llmctl.server.service import Service


def handle(service: Service, body: object, disconnected: Callable[[], bool] | None = None) -> dict | Iterator[str]:
    """Answer one chat completion: a response body, or an iterator of SSE lines when streaming."""
    arrived = time.monotonic()
    context = service.admit()
    req = parse_body(ChatCompletionRequest, body)
    context = context.serving(req.model)
    n = req.n or 1
    check_request(context.limits, messages=len(req.messages), choices=n)
    if req.top_logprobs and not req.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
    tools = chat_tool_use(req.tools, req.tool_choice, req.parallel_tool_calls)
    constraint = output_constraint(constraint_from_request(req.response_format, req.structured_outputs), tools,
                                   context.tool_format, context.grammar_specials)
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    switches = chat_switches(req.chat_template_kwargs, req.reasoning_effort, req.thinking_token_budget)
    prompt = build_prompt(context.loaded, req, switches.template_kwargs)
    ask = Ask(prompt, max_tokens=asked, temperature=req.temperature, top_p=req.top_p,
              frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
              logit_bias=req.logit_bias, seed=req.seed, ignore_eos=req.ignore_eos,
              logprobs=(req.top_logprobs or 0) if req.logprobs else None, stops=tuple(req.stops()), n=n,
              timeout=req.timeout, constraint=constraint, thinking=engine_thinking(
                  context.reasoning_parser(prompt), context.loaded.tokenizer, switches.budget, tools.forced),
              max_tokens_param="max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens")
    run = service.start(context, [ask], arrived, disconnected)
    # Without a parser an enforced call is written in the Hermes format, and parsed as such.
    texts = [ChoiceText(context.tool_parser(req.tools, tools.mode != "none", tools.forced),
                        context.reasoning_parser(prompt), context.count_tokens) for _ in range(n)]
    logprobs = bool(req.logprobs)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _events(context, run, run.stream(), texts, logprobs, include_usage)
    return _answer(context, run, texts, logprobs)


def _answer(context: RequestContext, run: Run, texts: list[ChoiceText], logprobs: bool) -> dict:
    """The `chat.completion` body, once every choice has finished."""
    outs = run.collect()
    choices = []
    for index, (gen, text) in enumerate(zip(run.gens, texts, strict=False)):
        text.feed(outs[index])
        _, calls = text.finish(cut=gen.finish_reason == "length")
        content: str | None = text.answer(calls)
        if calls:
            content = content or None
        message = AssistantMessage.of(content, calls, text.thinking if text.reasoning is not None else None)
        choices.append(Choice(index=index, message=message, logprobs=_logprobs(context, gen, logprobs),
                              finish_reason=_finish_reason(gen.finish_reason, calls)))
    usage = Usage.of(run.prompt_tokens, run.completion_tokens, run.cached_tokens,
                     sum(t.reasoning_tokens for t in texts))
    return ChatCompletion(id=completion_id(), object="chat.completion", created=int(time.time()),
                          model=context.model, choices=choices, usage=usage).model_dump()


def _logprobs(context: RequestContext, gen: Generation, wanted: bool) -> ChoiceLogprobs | None:
    """The logprobs of the tokens ``gen`` received since the last call, when the request asked."""
    return ChoiceLogprobs.of(context.token_text, gen.take_logprobs()) if wanted else None


def _finish_reason(reason: str | None, calls: list[dict]) -> FinishReason:
    """"length" for an answer max_tokens cut, even one with complete calls before the cut (a half-written
    call is dropped, and the client must know the answer is not whole); else "tool_calls" when it calls."""
    if reason == "length":
        return "length"
    return "tool_calls" if calls else "stop"


def _events(context: RequestContext, run: Run, deltas: Iterator[Delta], texts: list[ChoiceText], logprobs: bool,
            include_usage: bool) -> Iterator[str]:
    cid, created = completion_id(), int(time.time())

    def chunk(choices: list[ChunkChoice], usage: Usage | None = None) -> str:
        body = ChatCompletionChunk(id=cid, object="chat.completion.chunk", created=created, model=context.model,
                                   choices=choices)
        if usage is not None:
            body.usage = usage
        return sse(body.model_dump())

    def choice(index: int, delta: ChunkDelta, finish_reason: FinishReason | None = None) -> str:
        # Tokens whose text was held back (the start of a stop string or of a tool call) keep their
        # logprobs until a chunk goes out.
        lp = _logprobs(context, run.gens[index], logprobs)
        return chunk([ChunkChoice(index=index, delta=delta, logprobs=lp if lp and lp.content else None,
                                  finish_reason=finish_reason)])

    try:
        for index in range(len(texts)):
            yield chunk([ChunkChoice(index=index, delta=ChunkDelta(role="assistant", content=""), logprobs=None,
                                     finish_reason=None)])
        for delta in deltas:
            text, gen = texts[delta.index], run.gens[delta.index]
            shown = text.feed(delta.text)
            if shown.reasoning or shown.content:
                yield choice(delta.index, ChunkDelta.of(shown.reasoning, shown.content))
            if not delta.done or gen.finish_reason == "cancelled":
                continue
            rest, calls = text.finish(cut=gen.finish_reason == "length")
            if rest.reasoning or rest.content:
                yield choice(delta.index, ChunkDelta.of(rest.reasoning, rest.content))
            if calls:
                yield choice(delta.index, ChunkDelta(tool_calls=[ToolCallDelta(index=i, **call)
                                                                 for i, call in enumerate(calls)]))
            yield choice(delta.index, ChunkDelta(), _finish_reason(gen.finish_reason, calls))
        if run.cancelled:
            return
        if include_usage:
            yield chunk([], Usage.of(run.prompt_tokens, run.completion_tokens, run.cached_tokens,
                                     sum(t.reasoning_tokens for t in texts)))
        yield "data: [DONE]\n\n"
    except LLMCtlError as exc:
        # Headers are already sent: report the error in-band, as OpenAI's API does, and end the stream
        # as every stream ends (vLLM does the same), so clients waiting for [DONE] stop waiting.
        yield sse(stream_error(exc))
        yield "data: [DONE]\n\n"
    finally:
        run.end()
