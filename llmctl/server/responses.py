"""The shapes of the service's answers, for its OpenAPI document.

The service builds its answers as plain dicts (`schemas.completion_body` and friends); these
models describe them, and `tests/server/test_api.py` validates real answers against them with unknown
fields forbidden, so the document cannot drift from what the service sends.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

FinishReason = Literal["stop", "length", "tool_calls"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PromptTokensDetails(_Strict):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache (not prefilled again)


class CompletionTokensDetails(_Strict):
    reasoning_tokens: int  # completion tokens that were thinking (with a reasoning parser; else 0)


class Usage(_Strict):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    completion_tokens_details: CompletionTokensDetails


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Strict):
    """A call the model asked for (with `serve --tool-call-parser`)."""

    id: str
    type: Literal["function"]
    function: FunctionCall


class ToolCallDelta(ToolCall):
    index: int


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str | None
    # The thinking (with `serve --reasoning-parser`), under both names clients read; null when there was none.
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(_Strict):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Strict):
    """Sent when the request has `logprobs: true`: the model's log-probabilities (before temperature,
    top_p, penalties and logit_bias) of each generated token and of its `top_logprobs` alternatives."""

    content: list[TokenLogprob] | None
    refusal: None = None


class Choice(_Strict):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason


class ChatCompletion(_Strict):
    """The answer to a request without `stream`."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(_Strict):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChunkChoice(_Strict):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: FinishReason | None


class ChatCompletionChunk(_Strict):
    """One server-sent event of a streamed answer (`data: {...}`); the stream ends with `data: [DONE]`.
    The usage chunk, sent when `stream_options.include_usage` is true, has no choices."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class Model(_Strict):
    """A served model: the base model, or a LoRA adapter (with its base model as ``parent`` and its folder as
    ``root``, as vLLM lists them)."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    parent: str | None = None
    root: str | None = None


class ModelList(_Strict):
    object: Literal["list"]
    data: list[Model]


class LoraAdapters(_Strict):
    """The LoRA adapters served: their names, how many may be loaded at once, and their weights' memory."""

    loaded: list[str]
    max_loras: int
    max_lora_rank: int
    memory_bytes: int


class LoraAdapter(_Strict):
    """POST /v1/load_lora_adapter and /v1/unload_lora_adapter: the adapter; ``message`` is vLLM's answer text."""

    object: Literal["lora_adapter"]
    id: str
    message: str
    parent: str | None = None
    rank: int | None = None
    running_requests: int | None = None


class Health(_Strict):
    """GET /health: 200 when ready, 503 otherwise. Fields are null until the model has loaded."""

    status: Literal["loading", "ready", "error", "shutting_down", "stopped"]
    model: str | None
    device: str | None
    cpu_threads: int
    cuda_available: bool
    cuda_device_count: int
    memory_allocated_gb: float
    memory_reserved_gb: float
    dtype: str | None
    quantization: Literal["none", "8bit", "4bit"] | None
    context_length: int | None
    running: int
    waiting: int
    lora_adapters: LoraAdapters | None = None  # null when the server does not serve LoRA adapters
    version: str
    speculative: dict[str, Any] | None = Field(
        default=None, description="The --speculative-config in effect, as given; absent when speculation is off.")
    error: str | None = None


class WorkerLoad(_Strict):
    """GET /get_load: the sequences this replica holds, as request routers (vLLM's, SGLang's) poll it."""

    load: int
    running: int
    waiting: int


class ModelInfo(_Strict):
    """GET /get_model_info: the served model in SGLang's shape, which request routers pass through."""

    model_path: str
    tokenizer_path: str
    is_generation: bool
    served_model_name: str
    context_length: int


RESPONSE_MODELS = (ChatCompletion, ChatCompletionChunk, Model, ModelList, Health, WorkerLoad, ModelInfo, LoraAdapter)
