"""OpenAI-compatible chat client: timeouts, retries, streaming, and fallback to Together AI and OpenAI.

    from llmctl.client import Client
    from llmctl.client.config import load_settings

    with Client(load_settings()) as client:
        result = client.chat("Name three rivers.")
        print(result.content, "-- answered by", result.provider)
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
from httpx_sse import EventSource, SSEError
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from llmctl.client.config import LLMSettings
from llmctl.client.providers import (
    AllProvidersFailed,
    ClientError,
    Endpoint,
    ProviderError,
    message_of,
    provider_chain,
    raise_for_status,
    reason,
)

# The errors a caller catches are part of this module's API, though they live with the providers.
__all__ = ["AllProvidersFailed", "ChatResult", "ChatStream", "Client", "ClientError", "Endpoint", "ProviderError",
           "batch_chat", "provider_chain"]

log = logging.getLogger("llmctl.client")

T = TypeVar("T")
Messages = str | Sequence[dict]


@dataclass
class ChatResult:
    """One answer, and who gave it: ``provider`` is "self", "together" or "openai"."""

    content: str
    provider: str
    model: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    elapsed_s: float = 0.0
    failed: dict[str, str] = field(default_factory=dict)
    """Providers tried (or skipped) before ``provider``, each with the reason."""

    @property
    def tokens_per_second(self) -> float | None:
        if not self.completion_tokens or self.elapsed_s <= 0:
            return None
        return self.completion_tokens / self.elapsed_s


@dataclass
class _ProviderState:
    failures: int = 0
    skip_until: float = 0.0
    why: str = "it kept failing"


class Client:
    """Chat with the self-hosted service, retrying and falling back as ``settings`` say. Thread-safe."""

    def __init__(self, settings: LLMSettings | None = None, *, http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 failures_before_cooldown: int = 2, backoff_s: float = 0.5,
                 max_backoff_s: float = 30.0) -> None:
        self.settings = settings or LLMSettings()
        self.endpoints = provider_chain(self.settings)
        self._own_http = http is None
        # The timeout is for the provider, not for the wait for a free connection: with more requests
        # at once than the pool holds (a large batch_chat), the others queue without failing.
        self._http = http or httpx.Client(
            timeout=httpx.Timeout(self.settings.timeout_seconds, pool=None),
            limits=httpx.Limits(max_connections=max(16, 2 * self.settings.batch_size)),
        )
        self._sleep, self._clock = sleep, clock
        self.failures_before_cooldown = failures_before_cooldown
        self.max_backoff_s = max_backoff_s
        self._backoff = wait_exponential_jitter(initial=backoff_s, max=max_backoff_s, jitter=backoff_s)
        self._state = {ep.name: _ProviderState() for ep in self.endpoints}
        self._lock = threading.Lock()

    @property
    def providers(self) -> list[str]:
        return [ep.name for ep in self.endpoints]

    def close(self) -> None:
        if self._own_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- requests ----------------------------------------------------------------------------
    def chat(self, messages: Messages, *, temperature: float | None = None, max_tokens: int | None = None,
             **params: Any) -> ChatResult:
        """Ask for one complete answer."""
        started = time.monotonic()

        def call(ep: Endpoint) -> dict:
            body = self._body(ep, messages, temperature, max_tokens, params, stream=False)
            with self._errors(ep):
                response = self._http.post(ep.base_url + "/chat/completions", json=body, headers=ep.headers())
            raise_for_status(response, ep)
            try:
                data = response.json()
                choice = data["choices"][0]
            except (ValueError, KeyError, IndexError, TypeError):
                raise ProviderError(f"{ep.label} sent an answer that is not a chat completion.",
                                    provider=ep.name) from None
            return data | {"_choice": choice}

        data, ep, failed = self._first_answer(call)
        usage = data.get("usage") or {}
        return ChatResult(
            content=(data["_choice"].get("message") or {}).get("content") or "", provider=ep.name,
            model=data.get("model") or ep.model, finish_reason=data["_choice"].get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"), completion_tokens=usage.get("completion_tokens"),
            elapsed_s=time.monotonic() - started, failed=failed,
        )

    def stream(self, messages: Messages, *, temperature: float | None = None, max_tokens: int | None = None,
               **params: Any) -> ChatStream:
        """Ask for an answer streamed as it is generated. Falls back only before the first byte."""
        started = time.monotonic()

        def call(ep: Endpoint) -> tuple[ExitStack, httpx.Response]:
            body = self._body(ep, messages, temperature, max_tokens, params, stream=True)
            stack = ExitStack()
            try:
                with self._errors(ep):
                    response = stack.enter_context(self._http.stream(
                        "POST", ep.base_url + "/chat/completions", json=body, headers=ep.headers()))
                    raise_for_status(response, ep)
            except BaseException:
                stack.close()
                raise
            return stack, response

        (stack, response), ep, failed = self._first_answer(call)
        return ChatStream(ep, stack, response, started, failed, self._errors,
                          on_cut=lambda: self._record_failure(ep))

    def batch(self, prompts: Sequence[Messages], *, batch_size: int | None = None,
              return_exceptions: bool = False, **options: Any) -> list[ChatResult | ClientError]:
        """See `batch_chat`."""
        return batch_chat(self, prompts, batch_size=batch_size, return_exceptions=return_exceptions,
                          **options)

    def _body(self, ep: Endpoint, messages: Messages, temperature: float | None, max_tokens: int | None,
              params: dict, *, stream: bool) -> dict:
        msgs = [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
        body: dict[str, Any] = {
            "messages": msgs,
            "temperature": self.settings.temperature if temperature is None else temperature,
            "max_tokens": max_tokens or self.settings.max_tokens,
            **params,
        }
        if ep.model:
            body["model"] = ep.model
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        elif ep.name == "self":
            # llmctl's own extension: the service stops generating once this client has given up.
            body.setdefault("timeout", min(self.settings.timeout_seconds, 300.0))
        return body

    @contextmanager
    def _errors(self, ep: Endpoint) -> Iterator[None]:
        """Turn httpx's transport errors into a ProviderError that says whether to retry."""
        try:
            yield
        except httpx.PoolTimeout:
            # The request never left this process: the provider is not to blame, so no retry or fallback.
            raise ProviderError(f"{ep.label} was not asked: no connection of the HTTP client's pool came "
                                "free within its pool timeout (more requests at once than the pool allows). "
                                "Lower batch_size, or give the httpx.Client passed as http= a larger pool or "
                                "pool=None in its timeout.",
                                provider=ep.name, fallback=False) from None
        except httpx.TimeoutException as exc:
            connecting = isinstance(exc, httpx.ConnectTimeout)
            what = "could not be reached" if connecting else "did not answer"
            raise ProviderError(f"{ep.label} {what} within {self.settings.timeout_seconds:g} s.",
                                provider=ep.name, retryable=connecting, unreachable=connecting) from None
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise ProviderError(f"{ep.label} is not reachable ({reason(exc)}).", provider=ep.name,
                                retryable=True, unreachable=isinstance(exc, httpx.ConnectError)) from None
        except httpx.TransportError as exc:
            raise ProviderError(f"{ep.label} failed: {reason(exc)}.", provider=ep.name) from None

    # ---- retries and fallback ----------------------------------------------------------------
    def _first_answer(self, call: Callable[[Endpoint], T]) -> tuple[T, Endpoint, dict[str, str]]:
        failures: dict[str, ProviderError] = {}
        failed: dict[str, str] = {}
        candidates = self._candidates(failed)
        for ep in candidates:
            last = ep is candidates[-1]
            retrying = Retrying(
                stop=stop_after_attempt(self.settings.retry_attempts + 1), wait=self._wait,
                retry=retry_if_exception(functools.partial(self._should_retry, last=last)),
                sleep=self._sleep, reraise=True, before_sleep=self._log_retry,
            )
            try:
                answer = retrying(call, ep)
            except ProviderError as exc:
                if not exc.fallback:
                    raise
                # Nothing listening: it will not be back within a retry's back-off, so skip it from now on.
                self._record_failure(ep, at_once=exc.unreachable)
                failures[ep.name], failed[ep.name] = exc, exc.message
                log.info("%s", exc.message)
                continue
            self._record_success(ep)
            if failed:
                log.warning("Answered by %s instead of %s: %s", ep.name, ", ".join(failed),
                            " ".join(failed.values()))
            else:
                log.info("Answered by %s.", ep.name)
            return answer, ep, failed
        skipped = {name: why for name, why in failed.items() if name not in failures}
        if len(failures) == 1 and not skipped:
            raise next(iter(failures.values()))
        raise AllProvidersFailed(failures, skipped)

    def _candidates(self, failed: dict[str, str]) -> list[Endpoint]:
        now = self._clock()
        with self._lock:
            ready = [ep for ep in self.endpoints if self._state[ep.name].skip_until <= now]
        if not ready:
            # Skipping only helps while someone else can answer; with everyone cooling down, try them all.
            return list(self.endpoints)
        for ep in self.endpoints:
            if ep not in ready:
                state = self._state[ep.name]
                failed[ep.name] = (f"{ep.label} skipped: {state.why} (cooling down for "
                                   f"{state.skip_until - now:.0f} s more).")
                log.info("%s", failed[ep.name])
        return ready

    def set_aside(self, name: str, seconds: float, why: str) -> None:
        """Skip provider ``name`` for ``seconds`` while another one can answer (e.g. its model is loading)."""
        if name not in self._state or seconds <= 0 or len(self.endpoints) < 2:
            return
        with self._lock:
            self._state[name].skip_until = self._clock() + seconds
            self._state[name].why = why

    def _record_failure(self, ep: Endpoint, *, at_once: bool = False) -> None:
        cooldown = self.settings.cooldown_seconds
        with self._lock:
            state = self._state[ep.name]
            state.failures += 1
            enough = at_once or state.failures >= self.failures_before_cooldown
            if enough and cooldown > 0 and len(self.endpoints) > 1:
                state.skip_until = self._clock() + cooldown
                state.why = "it could not be reached" if at_once else "it kept failing"
                log.warning("%s failed %d time(s) in a row; skipping it for %g s.", ep.label, state.failures,
                            cooldown)

    def _record_success(self, ep: Endpoint) -> None:
        with self._lock:
            self._state[ep.name] = _ProviderState()

    def _should_retry(self, exc: BaseException, *, last: bool = True) -> bool:
        if not isinstance(exc, ProviderError) or not exc.retryable:
            return False
        if exc.unreachable and not last:
            # Retrying a refused connection costs seconds of back-off; another provider can answer now.
            return False
        # A Retry-After beyond our patience means: ask the next provider instead of waiting.
        return exc.retry_after is None or exc.retry_after <= self.max_backoff_s

    def _wait(self, state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        return float(retry_after) if retry_after is not None else self._backoff(state)

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else 0.0
        log.info("%s Retrying in %.1f s (attempt %d of %d).", getattr(exc, "message", exc), delay,
                 state.attempt_number + 1, self.settings.retry_attempts + 1)


class ChatStream:
    """A streamed answer: iterate for text pieces as they arrive, then read ``result``; ``close()`` stops."""

    def __init__(self, endpoint: Endpoint, stack: ExitStack, response: httpx.Response, started: float,
                 failed: dict[str, str], errors: Callable[[Endpoint], Any],
                 on_cut: Callable[[], None] | None = None) -> None:
        self.endpoint = endpoint
        self.provider = endpoint.name
        self.model = endpoint.model
        self.failed = failed
        self.finish_reason: str | None = None
        self.first_token_s: float | None = None
        self._stack, self._response, self._errors, self._on_cut = stack, response, errors, on_cut
        self._started = started
        self._ended: float | None = None
        self._parts: list[str] = []
        self._usage: dict = {}

    def __iter__(self) -> Iterator[str]:
        try:
            with self._errors(self.endpoint):
                try:
                    yield from self._texts()
                except (httpx.NetworkError, httpx.RemoteProtocolError, httpx.ReadTimeout) as exc:
                    raise self._cut(exc) from None
        finally:
            self._ended = self._ended or time.monotonic()
            self.close()

    def _cut(self, exc: Exception) -> ProviderError:
        """The answer stopped halfway: say so, rather than that the provider is not reachable."""
        if self._on_cut is not None:
            self._on_cut()
        log.info("%s: stream ended early: %s", self.endpoint.label, reason(exc))
        what = "went silent" if isinstance(exc, httpx.ReadTimeout) else "closed the connection"
        when = "mid-answer; the answer is cut off" if self._parts else "before answering"
        return ProviderError(f"{self.endpoint.label} {what} {when}.", provider=self.provider, fallback=False)

    def _texts(self) -> Iterator[str]:
        if "text/event-stream" not in self._response.headers.get("content-type", ""):
            # A provider that ignored stream=true: the whole answer comes as one JSON body.
            yield from self._take(json.loads(self._response.read()), "message")
            return
        try:
            for event in EventSource(self._response).iter_sse():
                if event.data.strip() == "[DONE]":
                    return
                data = json.loads(event.data)
                if isinstance(data, dict) and data.get("error"):
                    raise ProviderError(f"{self.endpoint.label} failed mid-answer: {message_of(data)}",
                                        provider=self.provider, fallback=False)
                yield from self._take(data, "delta")
        except (SSEError, json.JSONDecodeError) as exc:
            raise ProviderError(f"{self.endpoint.label} sent a malformed stream ({exc}).",
                                provider=self.provider, fallback=False) from None

    def _take(self, data: dict, key: str) -> Iterator[str]:
        self.model = data.get("model") or self.model
        self._usage = data.get("usage") or self._usage
        for choice in data.get("choices") or []:
            text = (choice.get(key) or {}).get("content")
            if text:
                if self.first_token_s is None:
                    self.first_token_s = time.monotonic() - self._started
                self._parts.append(text)
                yield text
            self.finish_reason = choice.get("finish_reason") or self.finish_reason

    def close(self) -> None:
        """Stop reading; the service notices the closed connection and stops generating."""
        self._stack.close()

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def text(self) -> str:
        return "".join(self._parts)

    @property
    def completion_tokens(self) -> int:
        """From the provider's usage report; else the number of pieces received (one token each, about)."""
        return self._usage.get("completion_tokens") or len(self._parts)

    @property
    def result(self) -> ChatResult:
        end = self._ended or time.monotonic()
        return ChatResult(content=self.text, provider=self.provider, model=self.model,
                          finish_reason=self.finish_reason, prompt_tokens=self._usage.get("prompt_tokens"),
                          completion_tokens=self.completion_tokens, elapsed_s=end - self._started,
                          failed=dict(self.failed))


def batch_chat(client: Client, prompts: Sequence[Messages], *, batch_size: int | None = None,
               return_exceptions: bool = False, **options: Any) -> list[ChatResult | ClientError]:
    """Answer many prompts, at most ``batch_size`` (default: the setting) at a time; results in input order.

    A failure raises once the requests in flight are done, unless ``return_exceptions`` puts it in the list.
    """
    size = batch_size or client.settings.batch_size
    if size < 1:
        raise ValueError("batch_size must be at least 1")
    with ThreadPoolExecutor(max_workers=size, thread_name_prefix="llmctl-batch") as pool:
        futures: list[Future] = [pool.submit(client.chat, prompt, **options) for prompt in prompts]
        results: list[ChatResult | ClientError] = []
        for future in futures:
            try:
                results.append(future.result())
            except ClientError as exc:
                if not return_exceptions:
                    for pending in futures:
                        pending.cancel()
                    raise
                results.append(exc)
    return results
