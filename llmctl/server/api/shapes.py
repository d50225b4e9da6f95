"""The shapes of the newer routes' answers, for the OpenAPI document (as `llmctl.server.responses` does for
chat completions): Responses. (Legacy completions', Anthropic Messages' and /tokenize's are beside their
handlers.)

Tests validate real answers against these models with unknown fields forbidden, so the document
cannot drift from what the service sends.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- /v1/responses ----------------------------------------------------------------------------
class OutputText(_Strict):
    type: Literal["output_text"]
    text: str
    annotations: list


class OutputMessage(_Strict):
    type: Literal["message"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"]
    content: list[OutputText]


class FunctionCallOutput(_Strict):
    type: Literal["function_call"]
    id: str
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed"]


class ReasoningText(_Strict):
    type: Literal["reasoning_text"]
    text: str


class ReasoningOutput(_Strict):
    """The model's thinking (with `serve --reasoning-parser`), before the message it led to. Its text is in
    `content`; `summary` stays empty (the server writes no summaries)."""

    type: Literal["reasoning"]
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    summary: list[dict]
    content: list[ReasoningText]


class InputTokensDetails(_Strict):
    cached_tokens: int


class OutputTokensDetails(_Strict):
    reasoning_tokens: int


class ResponseUsage(_Strict):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class IncompleteDetails(_Strict):
    reason: Literal["max_output_tokens"]


class ResponseError(_Strict):
    code: str
    message: str


class ConversationRef(_Strict):
    id: str


class Response(_Strict):
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
    status: Literal["queued", "in_progress", "completed", "incomplete", "cancelled", "failed"]
    error: ResponseError | None
    incomplete_details: IncompleteDetails | None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[ReasoningOutput | OutputMessage | FunctionCallOutput]
    parallel_tool_calls: bool
    previous_response_id: str | None
    store: bool  # kept by the server (unless store: false, or --responses-store none): GET /v1/responses/{id}
    background: bool  # generated after the answer (queued), read back by polling GET /v1/responses/{id}
    conversation: ConversationRef | None
    temperature: float
    top_p: float
    text: dict
    tool_choice: str | dict
    tools: list[dict]
    truncation: Literal["disabled"]
    metadata: dict
    usage: ResponseUsage | None


SHAPES = (Response,)
