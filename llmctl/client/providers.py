"""The providers a client can ask (the self-hosted service, Together AI, OpenAI) and their errors.

Shared by the chat client and by the commands that query the service directly (health, metrics).
"""

from __future__ import annotations

import email.utils
import time
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from llmctl import envvars
from llmctl.client.config import LLMSettings
from llmctl.errors import ConfigError, LLMCtlError

ORDER = ("self", "together", "openai")
LABELS = {"self": "The llmctl service", "together": "Together AI", "openai": "OpenAI"}
# Where each provider's key comes from, for the hint on a 401 (see llmctl.client.config.ENV_VARS).
KEY_SOURCES = {"self": f"{envvars.API_KEY} (or {envvars.API_KEY_FILE})", "together": envvars.TOGETHER_API_KEY,
               "openai": envvars.OPENAI_API_KEY}


class ClientError(LLMCtlError):
    """A chat request could not be answered."""

    type = "client_error"


class ProviderError(ClientError):
    """One provider failed to answer.

    ``retryable``: worth asking it again; ``fallback``: worth asking another provider;
    ``unreachable``: no connection could be made at all (refused, or timed out connecting).
    """

    def __init__(self, message: str, *, provider: str, status: int | None = None,
                 retry_after: float | None = None, retryable: bool = False, fallback: bool = True,
                 unreachable: bool = False) -> None:
        super().__init__(message)
        self.provider, self.status, self.retry_after = provider, status, retry_after
        self.retryable, self.fallback, self.unreachable = retryable, fallback, unreachable


class AllProvidersFailed(ClientError):
    """Every provider in the fallback chain failed or was skipped: ``failures`` maps each one asked to its
    error, ``skipped`` each one left out while it cools down to why."""

    status = 503

    def __init__(self, failures: dict[str, ProviderError], skipped: dict[str, str] | None = None) -> None:
        self.failures, self.skipped = failures, dict(skipped or {})
        said = {name: e.message for name, e in failures.items()} | self.skipped
        names = sorted(said, key=lambda n: ORDER.index(n) if n in ORDER else len(ORDER))
        super().__init__("No provider could answer: " + "; ".join(said[n].rstrip(". ") for n in names) + ".")


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible provider: its name, base URL (ending in /v1), key and model."""

    name: str
    base_url: str
    api_key: str | None = None
    model: str | None = None

    @property
    def label(self) -> str:
        return f"{LABELS.get(self.name, self.name)} at {self.base_url.removesuffix('/v1')}"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


def provider_chain(settings: LLMSettings) -> list[Endpoint]:
    """The providers to try, in order: `provider` first, then the remote ones after it that have a key."""
    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    available = {
        "self": Endpoint("self", settings.self_hosted_url + "/v1", secret(settings.self_hosted_api_key)),
        "together": Endpoint("together", settings.together_base_url, secret(settings.together_api_key),
                             settings.together_model),
        "openai": Endpoint("openai", settings.openai_base_url, secret(settings.openai_api_key),
                           settings.openai_model),
    }
    for name, var in (("together", "TOGETHER_API_KEY"), ("openai", "OPENAI_API_KEY")):
        if settings.provider == name and not available[name].api_key:
            raise ConfigError(f"The provider is '{name}' but {var} is not set.")
    start = ORDER.index(settings.provider)
    return [available[name] for name in ORDER[start:] if name == "self" or available[name].api_key]


def raise_for_status(response: httpx.Response, ep: Endpoint) -> None:
    """A ProviderError for an error status: retryable (and worth a fallback) for 408, 429 and 5xx."""
    status = response.status_code
    if status < 400:
        return
    response.read()
    retryable = status in (408, 429) or status >= 500
    message = f"{ep.label} answered {status}: {_error_message(response)}"
    if status == 401:  # say where the key comes from: the server's message cannot know
        source = KEY_SOURCES.get(ep.name, "its API key setting")
        message = message.rstrip(".") + (f". The key from {source} was refused; set it to a key this service "
                                         "accepts." if ep.api_key else f". It needs an API key: set {source}.")
    raise ProviderError(message, provider=ep.name, status=status, retry_after=_retry_after(response),
                        retryable=retryable, fallback=retryable)


# ---- helpers ---------------------------------------------------------------------------------
def reason(exc: Exception) -> str:
    """A transport error in a few words: 'Connection refused', not '[Errno 111] Connection refused'."""
    text = str(exc).strip()
    return text.split("] ", 1)[-1] if text else type(exc).__name__


def message_of(body: dict) -> str:
    error = body.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or body.get("message") or body)


def _error_message(response: httpx.Response) -> str:
    try:
        return message_of(response.json())
    except (ValueError, AttributeError):
        pass
    if "html" in response.headers.get("content-type", ""):  # a web server's or proxy's error page
        return f"{response.reason_phrase} (an HTML page: is this an OpenAI-compatible server?)"
    return " ".join(response.text.split())[:300] or response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds: a number, or an HTTP date (RFC 9110)."""
    value = response.headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
