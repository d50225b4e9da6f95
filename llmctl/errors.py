"""The exceptions llmctl raises, each carrying its HTTP status and OpenAI error type.

The core raises these; the server turns them into OpenAI's error envelope and the CLI into one
clean line. Anything else that escapes is a bug: a 500 for the server, a traceback under --debug.
"""

from __future__ import annotations


class LLMCtlError(Exception):
    """Base class: a problem that is explained to the user, not a bug."""

    # The HTTP status that goes with the error: the one llmctl's server answers with, or, for a client's error,
    # the one a provider answered with (None where no answer came: `ProviderError`).
    status: int | None = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict:
        """OpenAI's error envelope."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def headers(self) -> dict[str, str]:
        """HTTP headers that go with this error's response."""
        retry_after = getattr(self, "retry_after", None)
        return {"Retry-After": str(retry_after)} if retry_after is not None else {}


class InvalidRequest(LLMCtlError):
    status = 400
    type = "invalid_request_error"


class ContextLengthExceeded(InvalidRequest):
    code = "context_length_exceeded"


class Unauthorized(LLMCtlError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class UnsupportedMediaType(LLMCtlError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class NotFound(LLMCtlError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class RequestTimeout(LLMCtlError):
    status = 408
    type = "timeout_error"
    code = "request_timeout"

    def headers(self) -> dict[str, str]:
        # The openai and anthropic SDKs retry a 408 twice unless told not to: the same request would
        # run out of time again, at three times the cost.
        return {"x-should-retry": "false"}


class QueueFull(LLMCtlError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, *, retry_after: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class Unavailable(LLMCtlError):
    """The service cannot take requests now (loading, failed to load, shutting down)."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after: int | None = 5, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after = retry_after


class GenerationOutOfMemory(LLMCtlError):
    """Generation ran out of device memory; the request fails, the service keeps serving."""

    status = 503
    type = "server_error"
    code = "out_of_memory"


class ModelLoadError(LLMCtlError):
    """The model cannot be loaded: a bad path, missing files, an unusable quantization backend."""

    status = 503
    type = "server_error"
    code = "model_load_failed"


class ConfigError(LLMCtlError):
    """A configuration file or value is invalid."""

    status = 500
    type = "invalid_config"
