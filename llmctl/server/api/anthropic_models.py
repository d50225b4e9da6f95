"""POST /v1/messages' and /v1/messages/count_tokens' request and answer models (`llmctl.server.api.anthropic`
answers with them)."""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from llmctl.server.api import rules
from llmctl.server.api.rules import documented
from llmctl.server.api.validation import MAX_TIMEOUT_S, Lenient, Strict, other_type
from llmctl.server.thinking import TemplateKwargs

BLOCK_TYPES = ("text", "tool_use", "tool_result", "thinking")


class TextBlock(Lenient):
    type: Literal["text"]
    text: str


class OtherBlock(Lenient):
    type: Annotated[str, other_type(BLOCK_TYPES, "block")]


class ToolUseBlock(Lenient):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class ThinkingBlock(Lenient):
    type: Literal["thinking"]
    thinking: str
    signature: str | None = None


class ToolResultBlock(Lenient):
    type: Literal["tool_result"]
    tool_use_id: str
    content: str | Annotated[list[TextBlock | OtherBlock], documented(rules.ANTHROPIC_TEXT_BLOCKS)] | None = None
    is_error: StrictBool | None = None


Block = TextBlock | ToolUseBlock | ToolResultBlock | ThinkingBlock | OtherBlock


class Message(Lenient):
    role: Literal["user", "assistant"]
    # Documented with the blocks this model reads; others are a 400.
    content: str | Annotated[list[Block], documented(rules.ANTHROPIC_BLOCKS)]


class CountTokensRequest(Lenient):
    messages: Annotated[list[Message], Field(min_length=1)]
    model: str | None = None
    system: str | list[TextBlock] | None = None
    tools: Annotated[list[dict], documented(rules.ANTHROPIC_TOOLS)] | None = None
    tool_choice: Annotated[dict, documented(rules.ANTHROPIC_TOOL_CHOICE)] | None = None
    # Checked by llmctl.server.thinking, which names the faulty field.
    thinking: Annotated[dict, documented(rules.ANTHROPIC_THINKING)] | None = None
    chat_template_kwargs: TemplateKwargs | None = None  # vLLM's extension, as on the chat route

    model_config = ConfigDict(json_schema_extra={"allOf": rules.ANTHROPIC_RULES})


class MessagesRequest(CountTokensRequest):
    max_tokens: Annotated[StrictInt, Field(ge=1)]
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    top_k: Annotated[StrictInt, Field(ge=0)] | None = None
    stop_sequences: Annotated[list[str], Field(max_length=16)] | None = None
    stream: StrictBool | None = False
    metadata: dict | None = None
    timeout: Annotated[StrictFloat, Field(gt=0.0, le=MAX_TIMEOUT_S)] | None = None
    ignore_eos: StrictBool = False  # llmctl extension, as on the chat route (fixed-length benchmarks)


# ---- the answer ----------------------------------------------------------------------------------
class AnthropicText(Strict):
    type: Literal["text"]
    text: str


class AnthropicToolUse(Strict):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict


class AnthropicThinking(Strict):
    """The model's thinking (with `serve --reasoning-parser`); ``signature`` is opaque (clients send it back)."""

    type: Literal["thinking"]
    thinking: str
    signature: str


ContentBlock = AnthropicThinking | AnthropicText | AnthropicToolUse
StopReason = Literal["end_turn", "max_tokens", "stop_sequence", "tool_use"]


class AnthropicUsage(Strict):
    input_tokens: int
    output_tokens: int


class AnthropicMessage(Strict):
    """The answer to /v1/messages. Streamed, it comes as Anthropic's events: message_start, then per content
    block content_block_start, content_block_delta (thinking_delta then signature_delta, text_delta or
    input_json_delta), content_block_stop,
    then message_delta (stop_reason, output tokens) and message_stop; an error after the stream started
    comes as an `error` event."""

    id: str
    type: Literal["message"]
    role: Literal["assistant"]
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None
    usage: AnthropicUsage


class AnthropicTokenCount(Strict):
    input_tokens: int


class AnthropicErrorDetail(Strict):
    type: str
    message: str


class AnthropicError(Strict):
    """Errors on /v1/messages routes, in Anthropic's envelope."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None  # the response's x-request-id, as in Anthropic's own API


# ---- the events of a streamed answer (named by their `type`) ----------------------------------------
class MessageStartEvent(Strict):
    type: Literal["message_start"]
    message: AnthropicMessage  # without content, its output_tokens 0


class ContentBlockStartEvent(Strict):
    type: Literal["content_block_start"]
    index: int
    content_block: ContentBlock  # empty: its text, thinking, signature or input follow as deltas


class ThinkingDelta(Strict):
    type: Literal["thinking_delta"]
    thinking: str


class SignatureDelta(Strict):
    type: Literal["signature_delta"]
    signature: str


class TextDelta(Strict):
    type: Literal["text_delta"]
    text: str


class InputJsonDelta(Strict):
    type: Literal["input_json_delta"]
    partial_json: str


class ContentBlockDeltaEvent(Strict):
    type: Literal["content_block_delta"]
    index: int
    delta: ThinkingDelta | SignatureDelta | TextDelta | InputJsonDelta


class ContentBlockStopEvent(Strict):
    type: Literal["content_block_stop"]
    index: int


class StopDelta(Strict):
    stop_reason: StopReason | None
    stop_sequence: str | None


class OutputUsage(Strict):
    output_tokens: int


class MessageDeltaEvent(Strict):
    type: Literal["message_delta"]
    delta: StopDelta
    usage: OutputUsage


class MessageStopEvent(Strict):
    type: Literal["message_stop"]


class ErrorEvent(Strict):
    """An error after the stream started (its headers are sent: the error goes in the stream)."""

    type: Literal["error"]
    error: AnthropicErrorDetail
    request_id: str | None = None  # the response's x-request-id


MessagesEvent = MessageStartEvent | ContentBlockStartEvent | ContentBlockDeltaEvent | ContentBlockStopEvent | \
    MessageDeltaEvent | MessageStopEvent | ErrorEvent
# Each event's model by its type (what `event:` names).
EVENTS: dict[str, type[Strict]] = {name: model for model in get_args(MessagesEvent)
                                   for name in get_args(model.model_fields["type"].annotation)}
ANSWERS = (AnthropicMessage, AnthropicTokenCount, AnthropicError, *get_args(MessagesEvent))
