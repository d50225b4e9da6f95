"""POST /v1/responses: OpenAI's Responses API over the shared pipeline.

Responses are stored unless the request says `store: false` (or the server runs with
`--responses-store none`); `previous_response_id`, `conversation` and `background` are read and
written by `llmctl.server.api.stored`, which the handler asks what a request continues. `input` is a
string or a list of items: messages, and `function_call` / `function_call_output` items for an
agent's tool history, and `reasoning` items (earlier thinking); they reach the chat template as the chat
route's messages do. With `serve --reasoning-parser` the model's thinking comes back as a `reasoning` item
before the message. Function tools
work as on the chat route (calls are parsed with `serve --tool-call-parser`, and an enforced
`tool_choice` maps onto the same `ToolUse` as chat's, in `function_tools`); built-in tools
(web search, file search, ...) get a 400. `text.format` (json_object, json_schema) is enforced as the
chat route's `response_format` is, through `structured_format`.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Callable, Generator, Iterator
from typing import TYPE_CHECKING

from llmctl.engine.structured import Constraint
from llmctl.errors import InvalidRequest, LLMCtlError
from llmctl.server.api import stored
from llmctl.server.api.common import ChoiceText, TextPieces, request_id_field, sse_event
from llmctl.server.api.prompts import chat_prompt, responses_messages
from llmctl.server.api.responses_models import (
    EVENTS,
    FunctionCallOutput,
    IncompleteDetails,
    InputTokensDetails,
    ItemStatus,
    OutputItem,
    OutputMessage,
    OutputText,
    OutputTokensDetails,
    ReasoningOutput,
    ReasoningText,
    Response,
    ResponsesRequest,
    ResponseUsage,
    Status,
)
from llmctl.server.api.validation import MAX_TIMEOUT_S, parse_body
from llmctl.server.constraints import (
    FunctionTool,
    ToolUse,
    constraint_from_request,
    function_tool,
    output_constraint,
    tool_use,
)
from llmctl.server.limits import check_request
from llmctl.server.pipeline import Ask, Delta, Run
from llmctl.server.thinking import chat_switches, engine_thinking

if TYPE_CHECKING:
    from llmctl.server.service import Service


def structured_format(text: dict | None) -> Constraint | None:
    """`text.format` as the constraint the chat route's `response_format` becomes; None for plain text.

    The Responses API puts name/schema/strict next to "type" (the chat route nests them under
    "json_schema"); `constraint_from_request` reads both shapes, and names `text.format` in its 400s.
    """
    return constraint_from_request((text or {}).get("format"), format_param="text.format")


def function_tools(req: ResponsesRequest) -> tuple[list[dict] | None, ToolUse]:
    """The request's function tools in the chat template's shape, and what its tool_choice asks of them.

    tool_choice is "none", "auto", "required", {"type": "function", "name": ...} or
    {"type": "allowed_tools", "mode": "auto" | "required", "tools": [...]} (the calls are limited to
    those tools; the template still shows all of them). Built-in tools are a 400.
    """
    out, functions = [], []
    for i, tool in enumerate(req.tools or []):
        kind = tool.get("type")
        if kind != "function":
            raise InvalidRequest(f"Tools of type '{kind}' (built-in tools) are not available on this server; only "
                                 "function tools are supported.", param=f"tools[{i}]")
        if not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"Missing required parameter: 'tools[{i}].name' (a string).", param=f"tools[{i}].name")
        functions.append(function_tool(tool["name"], tool.get("parameters"), tool.get("strict"),
                                       f"tools[{i}].parameters"))
        function = {k: tool[k] for k in ("name", "description", "parameters") if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out or None, _tool_use(req.tool_choice, functions, req.parallel_tool_calls is not False)


def _tool_use(choice: str | dict | None, functions: list[FunctionTool], parallel: bool) -> ToolUse:
    if choice is None or choice in ("none", "auto", "required"):
        return tool_use(functions, choice or "auto", parallel=parallel)
    spec = choice if isinstance(choice, dict) else {}  # another string: no kind, refused below
    kind = spec.get("type")
    if kind == "function" and isinstance(spec.get("name"), str):
        return tool_use(functions, "required", spec["name"], parallel)
    if kind == "allowed_tools" and spec.get("mode") in ("auto", "required") and isinstance(spec.get("tools"), list):
        names = {t.get("name") for t in spec["tools"] if isinstance(t, dict)}
        unknown = names - {f.name for f in functions}
        if unknown:
            raise InvalidRequest(f"tool_choice.tools names {sorted(map(str, unknown))}, which are not in 'tools'.",
                                 param="tool_choice.tools")
        return tool_use([f for f in functions if f.name in names], spec["mode"], parallel=parallel)
    if kind in ("function", "allowed_tools") or not isinstance(kind, str):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required', {\"type\": \"function\", \"name\": ...} "
                             "or {\"type\": \"allowed_tools\", \"mode\": \"auto\" | \"required\", \"tools\": [...]}.",
                             param="tool_choice")
    raise InvalidRequest(f"tool_choice of type '{kind}' names a built-in tool, which this server does not have; "
                         "only function tools are supported.", param="tool_choice")


def handle(service: Service, body: object, disconnected: Callable[[], bool] | None = None) -> dict | Iterator[str]:
    """Answer one Responses request: a response object, or its event stream."""
    arrived = time.monotonic()
    context = service.admit()
    req = parse_body(ResponsesRequest, body)
    context = context.serving(req.model)
    turn = stored.prepare(service, req)
    tools, tool_choice = function_tools(req)
    constraint = output_constraint(structured_format(req.text), tool_choice, context.tool_format,
                                   context.grammar_specials)
    # The model reads what the request continues (stored as it saw it), then the new input.
    messages = responses_messages(req.model_copy(update={"input": ResponsesRequest.model_validate(
        {"input": turn.prior + turn.input_items}).input}) if turn.prior else req)
    check_request(context.limits, messages=len(messages), messages_param="input", unit="input items")
    switches = chat_switches(req.chat_template_kwargs, req.reasoning.effort if req.reasoning else None)
    prompt = chat_prompt(context.loaded, [m.for_template() for m in messages], tools, param="input",
                         template_kwargs=switches.template_kwargs)
    thinking = context.reasoning_parser(prompt)
    ask = Ask(prompt, max_tokens=req.max_output_tokens, temperature=req.temperature, top_p=req.top_p,
              ignore_eos=req.ignore_eos, timeout=req.timeout or (MAX_TIMEOUT_S if turn.background else None),
              constraint=constraint, prompt_param="input", max_tokens_param="max_output_tokens",
              thinking=engine_thinking(context.reasoning_parser(prompt), context.loaded.tokenizer, None,
                                       tool_choice.forced))
    run = service.start(context, [ask], arrived, turn.disconnected(disconnected))
    parser = context.tool_parser(tools, tool_choice.mode != "none", tool_choice.forced)
    answer = _Answer(req, context.model, ChoiceText(parser, thinking, context.count_tokens), turn.fields())
    if turn.background:
        return stored.run_in_background(service, turn, answer.body(None, [], "queued"), run,
                                        lambda: _event_dicts(run, run.stream(), answer), bool(req.stream))
    if req.stream:
        return _sse(stored.saving(service, turn, _event_dicts(run, run.stream(), answer)))
    text = run.collect()[0]
    answer.text.feed(text)
    _, calls = answer.text.finish(cut=run.gens[0].finish_reason == "length")
    body = answer.body(run, _output(answer.text.answer(calls), calls, run.gens[0].finish_reason, answer,
                                    answer.text.thinking))
    stored.save(service, turn, body)
    return body


class _Answer:
    """The parts of a response that do not change while it is generated."""

    def __init__(self, req: ResponsesRequest, model: str, text: ChoiceText, fields: dict) -> None:
        self.req, self.model, self.text, self.fields = req, model, text, fields
        self.id, self.created = f"resp_{uuid.uuid4().hex}", int(time.time())
        self.message_id = f"msg_{uuid.uuid4().hex}"
        self.reasoning_id = f"rs_{uuid.uuid4().hex}"

    def body(self, run: Run | None, output: list[OutputItem], status: Status | None = None) -> dict:
        req = self.req
        finish = run.gens[0].finish_reason if run is not None else None
        status = status or ("incomplete" if finish == "length" else "completed")
        usage = None
        if run is not None and status != "in_progress":
            usage = ResponseUsage(
                input_tokens=run.prompt_tokens, input_tokens_details=InputTokensDetails(cached_tokens=0),
                output_tokens=run.completion_tokens, output_tokens_details=OutputTokensDetails(
                    reasoning_tokens=min(self.text.reasoning_tokens, run.completion_tokens)),
                total_tokens=run.prompt_tokens + run.completion_tokens)
        return Response(
            id=self.id, object="response", created_at=self.created, status=status, error=None,
            incomplete_details=IncompleteDetails(reason="max_output_tokens") if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=self.model,
            output=output, parallel_tool_calls=req.parallel_tool_calls is not False,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_p=1.0 if req.top_p is None else req.top_p,
            text={**(req.text or {}), "format": (req.text or {}).get("format") or {"type": "text"}},
            tool_choice=req.tool_choice or "auto", tools=req.tools or [], truncation="disabled",
            metadata=req.metadata or {}, usage=usage, **self.fields,
        ).model_dump()

    def reasoning(self, text: str, status: ItemStatus, item_id: str | None = None) -> ReasoningOutput:
        content = [ReasoningText(type="reasoning_text", text=text)] if status != "in_progress" else []
        return ReasoningOutput(type="reasoning", id=item_id or self.reasoning_id, status=status, summary=[],
                               content=content)

    def message(self, text: str, status: ItemStatus) -> OutputMessage:
        content = [_part(text)] if status != "in_progress" else []
        return OutputMessage(type="message", id=self.message_id, status=status, role="assistant", content=content)


def _part(text: str) -> OutputText:
    return OutputText(type="output_text", text=text, annotations=[])


def _function_call(call: dict) -> FunctionCallOutput:
    return FunctionCallOutput(type="function_call", id=f"fc_{uuid.uuid4().hex}", call_id=call["id"],
                              name=call["function"]["name"], arguments=call["function"]["arguments"],
                              status="completed")


def _output(text: str, calls: list[dict], finish_reason: str | None, answer: _Answer,
            thinking: str) -> list[OutputItem]:
    """The output items: the thinking (when the model thought), the message (unless only calls), the calls."""
    status: ItemStatus = "incomplete" if finish_reason == "length" else "completed"
    items: list[OutputItem] = [answer.reasoning(thinking, status)] if thinking else []
    if text or not calls:
        items.append(answer.message(text, status))
    return items + [_function_call(call) for call in calls]


def _sse(events: Generator[dict, None, None]) -> Iterator[str]:
    try:
        for event in events:
            yield sse_event(event["type"], event)
    finally:
        events.close()  # the client left: end the run now


def _event_dicts(run: Run, deltas: Iterator[Delta], answer: _Answer) -> Generator[dict, None, None]:
    """Responses' event sequence: created, in_progress, the output items with their deltas, completed.

    Thinking streams as a reasoning item, closed when the answer starts; thinking after that (gpt-oss
    may think again after a preamble) is a reasoning item of its own.
    """
    numbers = itertools.count()
    mid = answer.message_id
    done: dict[int, OutputItem] = {}  # output index -> finished item
    message_index: int | None = None
    thought: dict | None = None  # the reasoning item being streamed: its index, id and text

    def event(name: str, /, **fields) -> dict:
        return EVENTS[name].model_validate({"type": name, "sequence_number": next(numbers), **fields}).model_dump()

    def next_index() -> int:
        return len(done) + (thought is not None) + (message_index is not None)

    def reasoning_delta(text: str) -> Iterator[dict]:
        nonlocal thought
        if thought is None:
            index = next_index()
            thought = {"index": index, "id": answer.reasoning_id if index == 0 else f"rs_{uuid.uuid4().hex}",
                       "text": ""}
            yield event("response.output_item.added", output_index=index,
                        item=answer.reasoning("", "in_progress", thought["id"]))
        thought["text"] += text
        yield event("response.reasoning_text.delta", item_id=thought["id"], output_index=thought["index"],
                    content_index=0, delta=text)

    def close_reasoning(status: ItemStatus = "completed") -> Iterator[dict]:
        nonlocal thought
        if thought is None:
            return
        item = answer.reasoning(thought["text"], status, thought["id"])
        yield event("response.reasoning_text.done", item_id=thought["id"], output_index=thought["index"],
                    content_index=0, text=thought["text"])
        yield event("response.output_item.done", output_index=thought["index"], item=item)
        done[thought["index"]], thought = item, None

    def open_message() -> Generator[dict, None, int]:
        """The message item's events if it is not open yet; its output index."""
        nonlocal message_index
        if message_index is None:
            yield from close_reasoning()
            message_index = next_index()
            yield event("response.output_item.added", output_index=message_index,
                        item=answer.message("", "in_progress"))
            yield event("response.content_part.added", item_id=mid, output_index=message_index, content_index=0,
                        part=_part(""))
        return message_index

    def text_delta(text: str) -> Iterator[dict]:
        yield from open_message()
        yield event("response.output_text.delta", item_id=mid, output_index=message_index, content_index=0,
                    delta=text, logprobs=[])

    try:
        yield event("response.created", response=answer.body(None, [], "in_progress"))
        yield event("response.in_progress", response=answer.body(None, [], "in_progress"))
        pieces = TextPieces(run, deltas, answer.text)
        for piece in pieces:
            if piece.reasoning:
                yield from reasoning_delta(piece.reasoning)
            if piece.content:
                yield from text_delta(piece.content)
        calls = pieces.calls
        if calls is None:
            return
        cut = run.gens[0].finish_reason == "length"
        yield from close_reasoning("incomplete" if cut else "completed")
        for item in _output(answer.text.text, calls, run.gens[0].finish_reason, answer, ""):
            if isinstance(item, OutputMessage):
                index = yield from open_message()
                text = answer.text.text
                yield event("response.output_text.done", item_id=mid, output_index=index, content_index=0, text=text,
                            logprobs=[])
                yield event("response.content_part.done", item_id=mid, output_index=index, content_index=0,
                            part=_part(text))
            elif isinstance(item, FunctionCallOutput):
                index = next_index()
                yield event("response.output_item.added", output_index=index,
                            item=item.model_copy(update={"arguments": "", "status": "in_progress"}))
                yield event("response.function_call_arguments.delta", item_id=item.id, output_index=index,
                            delta=item.arguments)
                yield event("response.function_call_arguments.done", item_id=item.id, output_index=index,
                            name=item.name, arguments=item.arguments)
            else:
                continue  # the thinking went out as it streamed
            yield event("response.output_item.done", output_index=index, item=item)
            done[index] = item
            if index == message_index:
                message_index = None  # counted in done from now on
        final = answer.body(run, [done[i] for i in sorted(done)])
        yield event("response.incomplete" if final["status"] == "incomplete" else "response.completed",
                    response=final)
    except LLMCtlError as exc:
        # Headers are already sent: the error goes in the stream, as OpenAI's API does.
        yield event("error", code=exc.code, message=exc.message, param=exc.param, **request_id_field())
    finally:
        run.end()
