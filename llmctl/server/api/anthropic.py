"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the shared pipeline.

`system`, text / `tool_use` / `tool_result` blocks and `tools` reach the chat template as the chat
route's messages, tool calls and tool results do; the model's tool calls (with
`serve --tool-call-parser`, or forced by `tool_choice` any / tool, enforced as chat's) come back as
`tool_use` blocks. With `serve --reasoning-parser` the model's thinking comes back as `thinking` blocks
(`thinking_delta` events), and earlier `thinking` blocks reach the template as the message's
`reasoning_content`. Errors use Anthropic's envelope,
`{"type": "error", "error": {"type", "message"}}`, with Anthropic's type names.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from llmctl.errors import InvalidRequest, LLMCtlError
from llmctl.server.api.anthropic_models import (
    EVENTS,
    AnthropicMessage,
    AnthropicText,
    AnthropicThinking,
    AnthropicTokenCount,
    AnthropicToolUse,
    AnthropicUsage,
    ContentBlock,
    CountTokensRequest,
    MessagesRequest,
    StopReason,
)
from llmctl.server.api.common import ChoiceText, TextPieces, json_arguments, request_id_field, sse_event
from llmctl.server.api.prompts import anthropic_messages, chat_prompt
from llmctl.server.api.validation import parse_body
from llmctl.server.constraints import ToolUse, function_tool, output_constraint, tool_use
from llmctl.server.limits import check_request
from llmctl.server.pipeline import Ask, Delta, Run
from llmctl.server.thinking import anthropic_switches, engine_thinking

if TYPE_CHECKING:
    from llmctl.server.context import RequestContext
    from llmctl.server.service import Service

# Anthropic's error types by HTTP status (https://docs.anthropic.com/en/api/errors); 408 is llmctl's timeout.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
               413: "request_too_large", 415: "invalid_request_error", 429: "rate_limit_error",
               500: "api_error", 503: "overloaded_error", 529: "overloaded_error"}


def error_body(status: int, message: str) -> dict:
    """Anthropic's error envelope for an HTTP status."""
    return {"type": "error", "error": {"type": ERROR_TYPES.get(status, "api_error"), "message": message}}


def chat_tools(req: CountTokensRequest) -> tuple[list[dict] | None, ToolUse]:
    """Anthropic's client tools in the chat template's shape, and what `tool_choice` asks of them:
    {"type": "auto" | "any" | "tool" | "none", "name": ..., "disable_parallel_tool_use": ...}.
    Server tools (web search, bash, ...) are a 400."""
    out, functions = [], []
    for i, tool in enumerate(req.tools or []):
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(f"Tools of type '{tool.get('type')}' (server tools) are not available on this "
                                 "server; only client tools with an input_schema are supported.", param=f"tools[{i}]")
        if not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"Missing required parameter: 'tools[{i}].name' (a string).", param=f"tools[{i}].name")
        schema = tool.get("input_schema") or {"type": "object"}
        functions.append(function_tool(tool["name"], schema, tool.get("strict"), f"tools[{i}].input_schema"))
        function = {"name": tool["name"], "parameters": schema}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    choice = req.tool_choice or {"type": "auto"}
    kind, name = choice.get("type"), choice.get("name")
    parallel = choice.get("disable_parallel_tool_use") is not True
    if kind == "tool" and isinstance(name, str):
        return out or None, tool_use(functions, "required", name, parallel)
    if kind not in ("auto", "any", "none"):
        raise InvalidRequest("tool_choice must be {\"type\": \"auto\"}, {\"type\": \"any\"}, {\"type\": \"none\"} or "
                             "{\"type\": \"tool\", \"name\": ...}.", param="tool_choice")
    return out or None, tool_use(functions, "required" if kind == "any" else kind, parallel=parallel)


def _prompt(context: RequestContext, req: CountTokensRequest,
            template_kwargs: dict | None = None) -> tuple[list[int], list[dict] | None, ToolUse]:
    tools, choice = chat_tools(req)
    messages = anthropic_messages(req)
    check_request(context.limits, messages=len(messages))
    prompt = chat_prompt(context.loaded, messages, tools, param="messages", template_kwargs=template_kwargs)
    return prompt, tools, choice


def count_tokens(service: Service, body: object) -> dict:
    """POST /v1/messages/count_tokens: the prompt's size, as the template renders it."""
    context = service.context()
    req = parse_body(CountTokensRequest, body)
    context = context.serving(req.model)
    switches = anthropic_switches(req.thinking, None, req.chat_template_kwargs)
    prompt, _, _ = _prompt(context, req, switches.template_kwargs)
    return AnthropicTokenCount(input_tokens=len(prompt)).model_dump()


def handle(service: Service, body: object, disconnected: Callable[[], bool] | None = None) -> dict | Iterator[str]:
    """Answer one Messages request: a message, or Anthropic's event stream."""
    arrived = time.monotonic()
    context = service.admit()
    req = parse_body(MessagesRequest, body)
    context = context.serving(req.model)
    switches = anthropic_switches(req.thinking, req.max_tokens, req.chat_template_kwargs)
    prompt, template_tools, tools = _prompt(context, req, switches.template_kwargs)
    stops = tuple(req.stop_sequences or ())
    ask = Ask(prompt, max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
              stops=stops, ignore_eos=req.ignore_eos, timeout=req.timeout,
              constraint=output_constraint(None, tools, context.tool_format, context.grammar_specials),
              thinking=engine_thinking(context.reasoning_parser(prompt), context.loaded.tokenizer, switches.budget,
                                       tools.forced))
    run = service.start(context, [ask], arrived, disconnected)
    parser = context.tool_parser(template_tools, tools.mode != "none", tools.forced)
    choice = _Choice(context.model, ChoiceText(parser, context.reasoning_parser(prompt)), stops)
    if req.stream:
        return _events(run, run.stream(), choice)
    choice.text.feed(run.collect()[0])
    _, calls = choice.text.finish(cut=run.gens[0].finish_reason == "length")
    content = _blocks(choice.text.answer(calls), calls, choice.text.thinking)
    reason, sequence = choice.stop(run, calls)
    return choice.message(content, reason, sequence, run.prompt_tokens, run.completion_tokens)


class _Choice:
    def __init__(self, model: str, text: ChoiceText, stops: tuple[str, ...]) -> None:
        self.model, self.text, self.stops = model, text, stops
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def stop(self, run: Run, calls: list[dict]) -> tuple[StopReason, str | None]:
        """Anthropic's stop_reason and stop_sequence."""
        gen = run.gens[0]
        if gen.finish_reason == "length":  # even with whole calls before the cut: the answer is not whole
            return "max_tokens", None
        if calls:
            return "tool_use", None
        if gen.stop_sequence is not None and gen.stop_sequence in self.stops:
            return "stop_sequence", gen.stop_sequence
        return "end_turn", None

    def message(self, content: list[ContentBlock], reason: StopReason | None, sequence: str | None,
                input_tokens: int, output_tokens: int) -> dict:
        return AnthropicMessage(id=self.id, type="message", role="assistant", model=self.model, content=content,
                                stop_reason=reason, stop_sequence=sequence,
                                usage=AnthropicUsage(input_tokens=input_tokens, output_tokens=output_tokens)
                                ).model_dump()


def signature(thinking: str) -> str:
    """A thinking block's `signature`: opaque to clients, which send it back with the block (a digest of
    the thinking; the server checks nothing with it)."""
    return base64.b64encode(hashlib.sha256(thinking.encode("utf-8")).digest()).decode("ascii")


def _blocks(text: str, calls: list[dict], thinking: str = "") -> list[ContentBlock]:
    blocks: list[ContentBlock] = []
    if thinking:
        blocks.append(AnthropicThinking(type="thinking", thinking=thinking, signature=signature(thinking)))
    if text or not calls:
        blocks.append(AnthropicText(type="text", text=text))
    return blocks + [_tool_use(call) for call in calls]


def _tool_use(call: dict) -> AnthropicToolUse:
    return AnthropicToolUse(type="tool_use", id="toolu_" + call["id"].removeprefix("call_"),
                            name=call["function"]["name"], input=json_arguments(call["function"]["arguments"]))


def _events(run: Run, deltas: Iterator[Delta], choice: _Choice) -> Iterator[str]:
    """Anthropic's event sequence: message_start, content blocks (start, deltas, stop), message_delta, message_stop.

    Thinking is a `thinking` block (thinking_delta events, then its signature_delta), closed when the
    answer starts; thinking after that (gpt-oss may think again after a preamble) is a block of its own.
    """

    def event(name: str, /, **fields) -> str:
        return sse_event(name, EVENTS[name].model_validate({"type": name, **fields}).model_dump())

    index = 0
    kind: str | None = None  # the type of the open block
    thought = ""

    def close() -> Iterator[str]:
        nonlocal index, kind, thought
        if kind == "thinking":
            yield event("content_block_delta", index=index, delta={"type": "signature_delta",
                                                                   "signature": signature(thought)})
        if kind is not None:
            yield event("content_block_stop", index=index)
            index, kind, thought = index + 1, None, ""

    def delta(block: str, text: str) -> Iterator[str]:
        nonlocal kind, thought
        if kind != block:
            yield from close()
            kind = block
            start = AnthropicThinking(type="thinking", thinking="", signature="") if block == "thinking" \
                else AnthropicText(type="text", text="")
            yield event("content_block_start", index=index, content_block=start)
        if block == "thinking":
            thought += text
            yield event("content_block_delta", index=index, delta={"type": "thinking_delta", "thinking": text})
        else:
            yield event("content_block_delta", index=index, delta={"type": "text_delta", "text": text})

    try:
        yield event("message_start", message=choice.message([], None, None, run.prompt_tokens, 0))
        pieces = TextPieces(run, deltas, choice.text)
        wrote = False  # whether the answer has a text block
        for piece in pieces:
            if piece.reasoning:
                yield from delta("thinking", piece.reasoning)
            if piece.content:
                wrote = True
                yield from delta("text", piece.content)
        calls = pieces.calls
        if calls is None:
            return
        if not (wrote or calls):
            yield from delta("text", "")  # an empty answer still has its (empty) text block
        yield from close()
        for call in calls:
            block = _tool_use(call)
            yield event("content_block_start", index=index, content_block=block.model_copy(update={"input": {}}))
            yield event("content_block_delta", index=index, delta={
                "type": "input_json_delta", "partial_json": json.dumps(block.input, ensure_ascii=False)})
            yield event("content_block_stop", index=index)
            index += 1
        reason, sequence = choice.stop(run, calls)
        yield event("message_delta", delta={"stop_reason": reason, "stop_sequence": sequence},
                    usage={"output_tokens": run.completion_tokens})
        yield event("message_stop")
    except LLMCtlError as exc:
        # Headers are already sent: in the stream, with the request's id as Anthropic's error bodies carry it.
        yield event("error", error=error_body(exc.status or 500, exc.message)["error"], **request_id_field())
    finally:
        run.end()
