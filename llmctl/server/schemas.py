"""Request and response schemas of the OpenAI-compatible API.

Fields the service does not know are accepted and ignored: the openai SDK, LangChain and LiteLLM
send fields a given server may not implement, and rejecting them breaks those clients.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import TYPE_CHECKING, Annotated, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from llmctl.errors import InvalidRequest
from llmctl.server.api import rules
from llmctl.server.api.rules import documented
from llmctl.server.thinking import ReasoningEffort, TemplateKwargs, ThinkingBudget

if TYPE_CHECKING:
    from llmctl.engine.sampling import TokenLogprobs
    from llmctl.engine.text import TokenText

MAX_TIMEOUT_S = 300.0
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


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


CATCH_ALL = "known_type_in_catch_all"


def other_type(known: tuple[str, ...], what: str) -> AfterValidator:
    """For the catch-all member of a union of typed parts: a known type that reaches it is a known part
    with a bad field, and must fail as one (not pass as 'some other type')."""

    def check(value: str) -> str:
        if value in known:
            # Its own error type, so that parse_body prefers the known part's error (which names the field).
            raise PydanticCustomError(CATCH_ALL, f"a '{value}' {what} is missing a field or has one of the wrong type")
        return value

    return AfterValidator(check)


class OtherPart(_Lenient):
    type: Annotated[str, other_type(("text",), "part")]


class ChatMessage(_Lenient):
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


def valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer accepts; replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


RequestT = TypeVar("RequestT", bound=BaseModel)


class StreamOptions(_Lenient):
    include_usage: StrictBool | None = False


class OpenAISampling(_Lenient):
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


# pydantic's type errors, and the kinds of JSON value a value of that type is near to.
NEAR_KINDS: dict[str, type | tuple[type, ...]] = {
    "string_type": str, "int_type": (int, float), "float_type": (int, float), "list_type": list,
    "dict_type": dict, "model_type": dict, "bool_type": bool}


def parse_body(model: type[RequestT], body: object) -> RequestT:
    """Validate a decoded JSON body against ``model``, turning the first problem into a 400 that names the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        # In a union (stop: str | list[str], or typed parts) pydantic reports each branch it tried. A part
        # whose "type" is another part's is the wrong branch; of the rest, the one that got furthest into
        # the body explains best, a bad field beats a wrong type, and a known type that fell through to the
        # catch-all part comes last.
        wrong = [e["loc"][:-1] for e in errors if e["type"] == "literal_error" and e["loc"][-1] == "type"]

        def rank(error: ErrorDetails) -> tuple:
            loc = error["loc"]
            found = _walk(loc, body, missing=error["type"] == "missing")
            mismatch = error["type"].endswith("_type") or error["type"] == "literal_error"
            # A branch of the input's own kind (a number for an integer: 4.0) explains better than another.
            near = isinstance(error.get("input"), NEAR_KINDS.get(error["type"], ()))
            return (error["type"] == CATCH_ALL, any(loc[:len(w)] == w for w in wrong), -len(found),
                    mismatch and not near, mismatch)

        error = min(errors, key=rank)
        param = field_path(error["loc"], body, missing=error["type"] == "missing")
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param in ("messages", "prompt", "input") and error["type"] == "too_short":
            message = f"'{param}' must contain at least one item."
        else:
            message = f"Invalid value for '{param}': {error['msg']}."
        raise InvalidRequest(message, param=param) from None


def field_path(loc: tuple[int | str, ...], body: object, *, missing: bool = False) -> str | None:
    """pydantic's error location as the API spells the field: ``messages[0].content[0].text``."""
    path = ""
    for part in _walk(loc, body, missing=missing):
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part
    return path or None


def _walk(loc: tuple[int | str, ...], body: object, *, missing: bool) -> list[int | str]:
    """The keys and indexes of ``loc`` found along ``body`` (a missing field's own name ends it).

    pydantic puts the union branch it tried in the location (``str``, ``list[...]``, ``TextPart``); those
    are not fields of the request, and are left out.
    """
    found: list[int | str] = []
    value = body
    for depth, part in enumerate(loc):
        if isinstance(part, int) and isinstance(value, list) and -len(value) <= part < len(value):
            found.append(part)
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and (
                part in value or missing and depth == len(loc) - 1):
            found.append(part)
            value = value.get(part)
    return found


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens served from the prefix cache; ``reasoning_tokens``:
    completion tokens that were thinking."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        # Counted from the thinking's text, which may tokenize into more pieces than were generated.
        "completion_tokens_details": {"reasoning_tokens": min(reasoning_tokens, completion_tokens)},
    }


# OpenAI's stand-in for a log-probability of minus infinity (JSON has no infinities).
MIN_LOGPROB = -9999.0


def logprobs_body(token_text: TokenText, items: list[TokenLogprobs]) -> dict:
    """A choice's ``logprobs``: each token's text, UTF-8 bytes and log-probability, and its alternatives."""

    def entry(token: int, logprob: float) -> dict:
        raw = token_text.bytes_of(token)
        return {"token": raw.decode("utf-8", "replace"), "logprob": max(logprob, MIN_LOGPROB), "bytes": list(raw)}

    content = [{**entry(i.token, i.logprob), "top_logprobs": [entry(t, v) for t, v in i.top]} for i in items]
    return {"content": content, "refusal": None}


def choice(index: int, text: str | None, finish_reason: str, logprobs: dict | None = None,
           tool_calls: list[dict] | None = None, reasoning: str | None = None) -> dict:
    """One choice of a chat completion; ``reasoning`` (with a reasoning parser) goes under both names clients
    read: ``reasoning`` (vLLM, OpenRouter) and ``reasoning_content`` (DeepSeek's)."""
    message: dict = {"role": "assistant", "content": text}
    if reasoning is not None:
        message["reasoning"] = message["reasoning_content"] = reasoning or None
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_body(cid: str, model: str, choices: list[dict], prompt_tokens: int, completion_tokens: int,
                    created: int | None = None, cached_tokens: int = 0, reasoning_tokens: int = 0) -> dict:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": created or int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens),
    }


def delta_fields(reasoning: str, content: str) -> dict:
    """A streamed chunk's delta: thinking under both names (as `choice` gives it), and answer text."""
    delta: dict = {"reasoning": reasoning, "reasoning_content": reasoning} if reasoning else {}
    if content:
        delta["content"] = content
    return delta


def chunk_body(cid: str, model: str, created: int, delta: dict, finish_reason: str | None = None,
               usage_: dict | None = None, with_choice: bool = True, logprobs: dict | None = None,
               index: int = 0) -> dict:
    body = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        if with_choice else [],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return body


def model_card(model: str, created: int, parent: str | None = None, root: str | None = None) -> dict:
    """A model's entry in /v1/models; a LoRA adapter's names its base model as ``parent`` (as vLLM does)."""
    card = {"id": model, "object": "model", "created": created, "owned_by": "llmctl"}
    if parent is not None:
        card.update(parent=parent, root=root)
    return card


def models_body(model: str, created: int, adapters: list | None = None) -> dict:
    """/v1/models: the base model, then each LoRA adapter (`llmctl.core.adapters.AdapterInfo`) it serves."""
    return {"object": "list", "data": [model_card(model, created)] + [
        model_card(a.name, created, parent=model, root=str(a.path)) for a in adapters or []]}
