"""POST /v1/chat/completions' request and answer models (`llmctl.server.api.chat` answers with them).

The request's sampling fields (`OpenAISampling`) and the answer's `Usage` are shared with legacy completions.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from llmctl.errors import InvalidRequest
from llmctl.server.api import rules
from llmctl.server.api.rules import documented
from llmctl.server.api.validation import MAX_TIMEOUT_S, Lenient, Strict, other_type, valid_unicode
from llmctl.server.thinking import ReasoningEffort, TemplateKwargs, ThinkingBudget

if TYPE_CHECKING:
    from llmctl.engine.sampling import TokenLogprobs
    from llmctl.engine.text import TokenText

TOKEN_ID = re.compile(r"-?[0-9]{1,10}")  # ASCII digits only: str.isdigit() also accepts '²'
# Numbers are strict (StrictInt, StrictFloat): pydantic's lax mode reads true as 1, "10" as 10 and 4.0 as 4;
# OpenAI's API rejects all three, and so do we. Bounds go in Field() so the JSON schema says minimum/maximum.


def _token_ids(value: dict[str, float]) -> dict[str, float]:
    for key in value:
        if not TOKEN_ID.fullmatch(key):
            raise ValueError(f"keys must be token ids, got {key!r}")
    return value


LogitBias = Annotated[dict[str, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]], AfterValidator(_token_ids),
                      Field(json_schema_extra={"propertyNames": {"pattern": f"^{TOKEN_ID.pattern}$"}})]
Stop = str | Annotated[list[str], Field(max_length=16)]


def stop_list(stop: Stop | None) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


class TextPart(Lenient):
    type: Literal["text"]
    text: str


class OtherPart(Lenient):
    type: Annotated[str, other_type(("text",), "part")]


class ChatMessage(Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Documented as text parts only: other parts are a 400 (this model reads text).
    content: str | Annotated[list[TextPart | OtherPart], documented(rules.TEXT_PARTS)] | None = None
    name: str | None = None
    tool_calls: list[dict] | None = None  # an assistant's earlier calls, in an agent's history
    tool_call_id: str | None = None  # a tool message: the call it answers
    # An assistant's earlier thinking, as a client sends it back: vLLM's and OpenRouter's name, DeepSeek's.
    reasoning: str | None = None
    reasoning_content: str | None = None

    def for_template(self) -> dict:
        """The message as chat templates read it: system for developer, tool calls whose arguments are
        objects (OpenAI sends them as JSON text; templates such as Qwen's and Llama 3's index them), and
        earlier thinking under the names templates read (`reasoning_content`: Qwen3, DeepSeek; `thinking`:
        gpt-oss)."""
        message: dict = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        thinking = self.reasoning_content or self.reasoning
        if thinking and self.role == "assistant":
            message["reasoning_content"] = message["thinking"] = valid_unicode(thinking)
        if self.name:
            message["name"] = self.name
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [_template_tool_call(call) for call in self.tool_calls]
        return message

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return valid_unicode(self.content)
        texts = []
        for part in self.content:
            if not isinstance(part, TextPart):
                raise InvalidRequest(
                    f"Content parts of type '{part.type}' are not supported: this model reads text only.",
                    param="messages",
                )
            texts.append(part.text)
        return valid_unicode("".join(texts))


def _template_tool_call(call: dict) -> dict:
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        return call  # not JSON (or nested beyond reason): the template gets the text as it came
    return {**call, "function": {**function, "arguments": arguments}}


class StreamOptions(Lenient):
    include_usage: StrictBool | None = False


class OpenAISampling(Lenient):
    """The fields OpenAI's chat and legacy completions share."""

    model: str | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    stop: Stop | None = None
    # torch seeds are 64-bit; OpenAI documents an integer, so take the signed and unsigned range.
    seed: Annotated[StrictInt, Field(ge=-(2**63), lt=2**64)] | None = None
    logit_bias: LogitBias | None = None
    n: Annotated[StrictInt, Field(ge=1, le=128)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    timeout: Annotated[StrictFloat, Field(gt=0.0, le=MAX_TIMEOUT_S)] | None = None
    # llmctl extension: keep generating past end-of-sequence (fixed-length benchmarks).
    ignore_eos: StrictBool = False

    def stops(self) -> list[str]:
        return stop_list(self.stop)


class ChatCompletionRequest(OpenAISampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1)] | None = None
    logprobs: StrictBool | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    # Checked by server.constraints, which names the faulty field; the document carries the same rules.
    tools: Annotated[list[dict], documented(rules.CHAT_TOOLS)] | None = None
    tool_choice: Annotated[str | dict, documented(rules.CHAT_TOOL_CHOICE)] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: Annotated[dict, documented(rules.response_format(nested=True))] | None = None
    # vLLM's extension (top-level, or in the openai SDK's extra_body): regex, choice, json, grammar.
    structured_outputs: Annotated[dict, documented(rules.STRUCTURED_OUTPUTS)] | None = None
    # Thinking switched and bounded per request (llmctl.server.thinking): vLLM's fields.
    chat_template_kwargs: TemplateKwargs | None = None
    reasoning_effort: ReasoningEffort | None = None
    thinking_token_budget: ThinkingBudget | None = None

    model_config = ConfigDict(json_schema_extra={"allOf": rules.CHAT_RULES})



# ---- the answer ----------------------------------------------------------------------------------
FinishReason = Literal["stop", "length", "tool_calls"]


class PromptTokensDetails(Strict):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (not prefilled again)


class CompletionTokensDetails(Strict):
    reasoning_tokens: int  # completion tokens that were thinking (with a reasoning parser; else 0)


class Usage(Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
           reasoning_tokens: int = 0) -> Usage:
        """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache;
        ``reasoning_tokens``: completion tokens that were thinking."""
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
                   # Counted from the thinking's text, which may tokenize into more pieces than were generated.
                   completion_tokens_details=CompletionTokensDetails(
                       reasoning_tokens=min(reasoning_tokens, completion_tokens)))


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    """A call the model asked for (with `serve --tool-call-parser`)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(Strict):
    index: int
    id: str
    type: Literal["function"]
    function: FunctionCall


class AssistantMessage(Strict):
    role: Literal["assistant"]
    content: str | None
    # The thinking (with `serve --reasoning-parser`), under both names clients read; null when there was none.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None

    @classmethod
    def of(cls, content: str | None, calls: list[dict], reasoning: str | None) -> AssistantMessage:
        """The answer of one choice; ``reasoning`` (with a reasoning parser, else None) goes under both names
        clients read: ``reasoning`` (vLLM, OpenRouter) and ``reasoning_content`` (DeepSeek's)."""
        message = cls(role="assistant", content=content)
        if reasoning is not None:
            message.reasoning = message.reasoning_content = reasoning or None
        if calls:
            message.tool_calls = [ToolCall.model_validate(call) for call in calls]
        return message


class TopLogprob(Strict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(Strict):
    """Sent when the request has `logprobs: true`: the model's log-probabilities (before temperature,
    top_p, penalties and logit_bias) of each generated token and of its `top_logprobs` alternatives."""

    content: list[TokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, token_text: TokenText, items: list[TokenLogprobs]) -> ChoiceLogprobs:
        """Each token's text, UTF-8 bytes and log-probability, and its alternatives."""

        def entry(token: int, logprob: float) -> dict:
            raw = token_text.bytes_of(token)
            return {"token": raw.decode("utf-8", "replace"), "logprob": max(logprob, MIN_LOGPROB), "bytes": list(raw)}

        return cls(content=[TokenLogprob(**entry(i.token, i.logprob), top_logprobs=[
            TopLogprob(**entry(t, v)) for t, v in i.top]) for i in items], refusal=None)


class Choice(Strict):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(Strict):
    """The answer to a request without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(Strict):
    role: Literal["assistant"] | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None

    @classmethod
    def of(cls, reasoning: str, content: str) -> Delta:
        """Thinking under both names (as `AssistantMessage.of` gives it), and answer text; each only when there is
        some."""
        delta = cls(reasoning=reasoning, reasoning_content=reasoning) if reasoning else cls()
        if content:
            delta.content = content
        return delta


class ChunkChoice(Strict):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(Strict):
    """One server-sent event of a streamed answer (`data: {...}`); the stream ends with `data: [DONE]`.
    The usage chunk, sent when `stream_options.include_usage` is true, has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


ANSWERS = (ChatCompletion, ChatCompletionChunk)
# OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
MIN_LOGPROB = -9999.0


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"
