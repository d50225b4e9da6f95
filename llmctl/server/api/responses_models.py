"""POST /v1/responses' request and answer models (`llmctl.server.api.responses_api` answers with them; stored
responses and conversations, `llmctl.server.api.stored` and `conversations`, keep and read the same items)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from llmctl.server.api import rules
from llmctl.server.api.rules import documented
from llmctl.server.api.validation import MAX_TIMEOUT_S, Lenient, Strict, other_type
from llmctl.server.thinking import ReasoningEffort, TemplateKwargs

ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


class InputText(Lenient):
    type: Literal["input_text", "output_text", "text", "refusal"]
    text: str | None = None
    refusal: str | None = None


class OtherContent(Lenient):
    type: Annotated[str, other_type(("input_text", "output_text", "text", "refusal"), "part")]


# Documented as text parts only: other parts are a 400 (this model reads text).
Content = str | Annotated[list[InputText | OtherContent], documented(rules.INPUT_PARTS)]


class MessageItem(Lenient):
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: Content


class FunctionCallItem(Lenient):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str


class FunctionCallOutputItem(Lenient):
    type: Literal["function_call_output"]
    call_id: str
    output: Content


class ReasoningPart(Lenient):
    type: str | None = None  # "reasoning_text" in content, "summary_text" in summary
    text: str = ""


class ReasoningItem(Lenient):
    """Earlier thinking a client sends back: its text in `content` (reasoning_text parts), else in `summary`."""

    type: Literal["reasoning"]
    summary: list[ReasoningPart] | None = None
    content: list[ReasoningPart] | None = None

    def text(self) -> str:
        return "\n".join(part.text for part in self.content or self.summary or [] if part.text)


class OtherItem(Lenient):
    type: Annotated[str, other_type(ITEM_TYPES, "item")]


class ReasoningOptions(Lenient):
    effort: ReasoningEffort | None = None
    summary: str | None = None  # accepted; the thinking comes back whole


class ResponsesRequest(Lenient):
    input: str | Annotated[list[MessageItem | FunctionCallItem | FunctionCallOutputItem | ReasoningItem | OtherItem],
                           documented(rules.INPUT_ITEMS)]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    tools: Annotated[list[dict], documented(rules.RESPONSES_TOOLS)] | None = None
    tool_choice: Annotated[str | dict, documented(rules.RESPONSES_TOOL_CHOICE)] | None = None
    parallel_tool_calls: StrictBool | None = None
    text: Annotated[dict, documented({"type": "object", "properties": {
        "format": rules.response_format(nested=False)}})] | None = None
    stream: StrictBool | None = False
    store: StrictBool | None = None
    previous_response_id: str | None = None
    conversation: Annotated[str | dict, documented({"anyOf": [{"type": "string"}, {
        "type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}}]})] | None = None
    background: StrictBool | None = None
    metadata: dict | None = None
    timeout: Annotated[StrictFloat, Field(gt=0.0, le=MAX_TIMEOUT_S)] | None = None
    ignore_eos: StrictBool = False  # llmctl extension, as on the chat route (fixed-length benchmarks)
    reasoning: ReasoningOptions | None = None
    chat_template_kwargs: TemplateKwargs | None = None  # vLLM's extension, as on the chat route

    model_config = ConfigDict(json_schema_extra={"allOf": rules.RESPONSES_RULES})


# ---- the answer ----------------------------------------------------------------------------------
ItemStatus = Literal["in_progress", "completed", "incomplete"]
Status = Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]


class OutputText(Strict):
    type: Literal["output_text"]
    text: str
    annotations: list


class OutputMessage(Strict):
    type: Literal["message"]
    id: str
    status: ItemStatus
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallOutput(Strict):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed"]


class ReasoningText(Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningOutput(Strict):
    """The model's thinking (with `serve --reasoning-parser`), before the message it led to. Its text is in
    `content`; `summary` stays empty (the server writes no summaries)."""

    type: Literal["reasoning"]
    id: str
    status: ItemStatus
    summary: list[dict]
    content: list[ReasoningText]


OutputItem = ReasoningOutput | OutputMessage | FunctionCallOutput


class InputTokensDetails(Strict):
    cached_tokens: int


class OutputTokensDetails(Strict):
    reasoning_tokens: int


class ResponseUsage(Strict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(Strict):
    reason: Literal["max_output_tokens"]


class ResponseError(Strict):
    code: str
    message: str


class ConversationRef(Strict):
    id: str


class Response(Strict):
    """The answer to /v1/responses. Streamed, it comes as named events: response.created, response.in_progress,
    a reasoning item (response.output_item.added, response.reasoning_text.delta (many),
    response.reasoning_text.done, response.output_item.done) when the model thinks,
    response.output_item.added, response.content_part.added, response.output_text.delta (many),
    response.output_text.done, response.content_part.done, response.output_item.done, function-call items
    (response.function_call_arguments.delta/.done), then response.completed (or response.incomplete) with
    this object; an error after the stream started comes as an `error` event."""

    id: str
    object: Literal["response"]
    created_at: int
    status: Status
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    temperature: float
    top_p: float
    text: dict
    tool_choice: str | dict
    tools: list[dict]
    truncation: Literal["disabled"]
    metadata: dict
    usage: ResponseUsage | None
    store: bool  # kept by the server (unless store: false, or --responses-store none): GET /v1/responses/{id}
    previous_response_id: str | None
    background: bool  # generated after the answer (queued), read back by polling GET /v1/responses/{id}
    conversation: ConversationRef | None


# ---- the events of a streamed answer (named by their `type`; `sequence_number` counts them from 0) ----------
class ResponseLifecycleEvent(Strict):
    """response.created and response.in_progress (the response without output), then response.completed or
    response.incomplete (the whole response)."""

    type: Literal["response.created", "response.in_progress", "response.completed", "response.incomplete"]
    sequence_number: int
    response: Response


class ResponseOutputItemEvent(Strict):
    """response.output_item.added (an item as it starts: in progress, without its text) and .done."""

    type: Literal["response.output_item.added", "response.output_item.done"]
    sequence_number: int
    output_index: int
    item: OutputItem


class ResponseContentPartEvent(Strict):
    type: Literal["response.content_part.added", "response.content_part.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    part: OutputText


class ResponseTextDeltaEvent(Strict):
    type: Literal["response.output_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str
    logprobs: list


class ResponseTextDoneEvent(Strict):
    type: Literal["response.output_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str
    logprobs: list


class ResponseReasoningDeltaEvent(Strict):
    type: Literal["response.reasoning_text.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    delta: str


class ResponseReasoningDoneEvent(Strict):
    type: Literal["response.reasoning_text.done"]
    sequence_number: int
    item_id: str
    output_index: int
    content_index: int
    text: str


class ResponseArgumentsDeltaEvent(Strict):
    type: Literal["response.function_call_arguments.delta"]
    sequence_number: int
    item_id: str
    output_index: int
    delta: str


class ResponseArgumentsDoneEvent(Strict):
    type: Literal["response.function_call_arguments.done"]
    sequence_number: int
    item_id: str
    output_index: int
    name: str
    arguments: str


class ResponseErrorEvent(Strict):
    """An error after the stream started (its headers are sent: the error goes in the stream)."""

    type: Literal["error"]
    sequence_number: int
    code: str | None
    message: str
    param: str | None
    request_id: str | None = None  # the response's x-request-id


ResponseEvent = ResponseLifecycleEvent | ResponseOutputItemEvent | ResponseContentPartEvent | \
    ResponseTextDeltaEvent | ResponseTextDoneEvent | ResponseReasoningDeltaEvent | ResponseReasoningDoneEvent | \
    ResponseArgumentsDeltaEvent | ResponseArgumentsDoneEvent | ResponseErrorEvent
# Each event's model by its type (what `event:` names).
EVENTS: dict[str, type[Strict]] = {name: model for model in get_args(ResponseEvent)
                                   for name in get_args(model.model_fields["type"].annotation)}


# ---- the routes that read stored responses back (`llmctl.server.api.stored`) ---------------------------------
class ResponseDeleted(Strict):
    """The answer to DELETE /v1/responses/{id}."""

    id: str
    object: Literal["response"]
    deleted: Literal[True]


class ItemList(Strict):
    """One page of items (a response's input items, a conversation's), as OpenAI's cursor pages go: newest
    first unless order=asc; the next page is the one after last_id."""

    object: Literal["list"]
    data: list[dict[str, Any]]  # the items as they were stored (input items, and a conversation's outputs)
    first_id: str | None
    last_id: str | None
    has_more: bool


ANSWERS = (Response, *get_args(ResponseEvent), ResponseDeleted, ItemList)
