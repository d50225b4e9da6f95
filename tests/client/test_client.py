"""The client against a real llmctl service and against local stand-ins for Together AI and OpenAI.

The stand-ins are small OpenAI-compatible HTTP servers on 127.0.0.1 that answer, fail with a
given status, or are not there at all; nothing here leaves this machine.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from flask import Flask, Response, request
from werkzeug.serving import make_server

from llmctl import envvars
from llmctl.client import (
    AllProvidersFailed,
    ChatResult,
    Client,
    ProviderError,
    batch_chat,
    provider_chain,
)
from llmctl.client.config import ENV_VARS, LLMSettings
from llmctl.client.probe import get_health, get_metrics
from llmctl.errors import ConfigError
from llmctl.server.testing import free_port


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for var in [*ENV_VARS.values(), envvars.CONFIG, envvars.API_KEY_FILE]:
        monkeypatch.delenv(var, raising=False)


READY = object()


class StandIn:
    """A local OpenAI-compatible provider. ``fail`` is an HTTP status sent for the first ``fail_times``
    requests (all of them when None), with ``message`` as the error; after that it answers ``reply``,
    else "<name>: <last user message>". A stream stops, with the connection dropped, after ``cut_after``
    pieces. ``health`` is the /health body (llmctl's "ready" by default; None: no /health at all) and
    ``metrics`` the /metrics body (None: no /metrics)."""

    def __init__(self, name: str, *, fail: int | None = None, fail_times: int | None = None,
                 retry_after: str | None = None, delay: float = 0.0, chunk_delay: float = 0.0,
                 message: str | None = None, reply: str | None = None, cut_after: int | None = None,
                 health: object = READY, metrics: str | dict | None = None) -> None:
        self.name, self.fail, self.fail_times, self.retry_after = name, fail, fail_times, retry_after
        self.delay, self.chunk_delay = delay, chunk_delay
        self.message, self.reply, self.cut_after = message, reply, cut_after
        self.requests: list[dict] = []
        self.in_flight = self.max_in_flight = 0
        self._lock = threading.Lock()
        app = Flask(name)
        app.post("/v1/chat/completions")(self._completions)
        if health is READY:
            health = {"status": "ready", "model": name, "device": "cpu"}
        if health is not None:
            app.add_url_rule("/health", "health", lambda: health)
        if metrics is not None:
            app.add_url_rule("/metrics", "metrics", lambda: metrics)
        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.base_url = self.url + "/v1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    def _completions(self):
        body = request.get_json()
        with self._lock:
            self.requests.append({"body": body, "auth": request.headers.get("Authorization")})
            within = self.fail_times is None or len(self.requests) <= self.fail_times
            failing = self.fail is not None and within
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            time.sleep(self.delay)
            if failing:
                headers = {"Retry-After": self.retry_after} if self.retry_after else {}
                message = self.message or f"{self.name} says {self.fail}"
                error = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
                return Response(json.dumps(error), self.fail, headers, mimetype="application/json")
            text = self.reply if self.reply is not None else f"{self.name}: {body['messages'][-1]['content']}"
            if body.get("stream"):
                sock = request.environ.get("werkzeug.socket")
                return Response(self._chunks(text, sock), mimetype="text/event-stream")
            return {"id": "x", "object": "chat.completion", "model": body.get("model") or self.name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 3, "completion_tokens": len(text.split()), "total_tokens": 9}}
        finally:
            with self._lock:
                self.in_flight -= 1

    def _chunks(self, text: str, sock: socket.socket | None = None) -> Iterator[str]:
        words = text.split(" ")
        for i, word in enumerate(words):
            time.sleep(self.chunk_delay)
            if i == self.cut_after and sock is not None:
                # The server dies mid-answer: the connection closes before the chunked body is complete.
                sock.shutdown(socket.SHUT_RDWR)
                raise ConnectionAbortedError("stand-in cut the stream")
            piece = word if i == 0 else " " + word
            yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': piece}}]})}\n\n"
        yield f"data: {json.dumps({'choices': [{'index': 0, 'delta': {}, 'finish_reason': 'stop'}]})}\n\n"
        usage = {"prompt_tokens": 3, "completion_tokens": len(words)}
        yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture()
def stand_in():
    made: list[StandIn] = []

    def make(name: str, **kwargs) -> StandIn:
        made.append(StandIn(name, **kwargs))
        return made[-1]

    yield make
    for server in made:
        server.close()


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def settings(self_url: str, together: StandIn | None = None, openai: StandIn | None = None,
             **kw) -> LLMSettings:
    values = {"self_hosted_url": self_url, "retry_attempts": 1, "timeout_seconds": 5} | kw
    if together is not None:
        values.update(together_base_url=together.base_url, together_api_key="tg-key")
    if openai is not None:
        values.update(openai_base_url=openai.base_url, openai_api_key="sk-key")
    return LLMSettings(**values)


def quick_client(s: LLMSettings, waits: list[float] | None = None, **kw) -> Client:
    """A client that records its back-off waits instead of sleeping through them."""
    return Client(s, sleep=(waits.append if waits is not None else time.sleep), backoff_s=0.01, **kw)


# ---- against the real service -------------------------------------------------------------------
def test_chat_against_the_service(base_url):
    with Client(LLMSettings(self_hosted_url=base_url, max_tokens=6)) as client:
        result = client.chat("Hello there", temperature=0)
    assert isinstance(result, ChatResult) and result.provider == "self" and result.failed == {}
    assert isinstance(result.content, str) and result.model == "tiny-llama"
    assert 1 <= result.completion_tokens <= 6 and result.prompt_tokens > 0
    assert result.finish_reason in ("stop", "length") and result.tokens_per_second > 0


def test_stream_against_the_service(base_url):
    with Client(LLMSettings(self_hosted_url=base_url, max_tokens=8)) as client:
        stream = client.stream([{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hi"}])
        pieces = list(stream)
    result = stream.result
    assert stream.provider == "self" and result.provider == "self"
    assert "".join(pieces) == result.content
    assert result.completion_tokens >= 1 and result.prompt_tokens > 0  # from stream_options.include_usage
    assert result.finish_reason in ("stop", "length")


def test_closing_a_stream_early_stops_reading(base_url):
    with Client(LLMSettings(self_hosted_url=base_url, max_tokens=64)) as client:
        stream = client.stream("Count to five")
        first = next(iter(stream))
        stream.close()
        assert isinstance(first, str)
        assert client.chat("again", max_tokens=2).provider == "self"  # the client is still usable


def test_health_and_metrics_helpers(base_url):
    health = get_health(base_url)
    assert health.ready and health.body["model"] == "tiny-llama"
    assert get_health(down_url()).status == "unreachable"
    assert get_metrics(base_url)["service"] == "llmctl"
    with pytest.raises(ProviderError) as info:
        get_metrics(down_url())
    assert info.value.status is None and "not reachable" in info.value.message


def test_batch_against_the_service_keeps_input_order(base_url):
    prompts = [f"Question {i}" for i in range(3)]
    with Client(LLMSettings(self_hosted_url=base_url, max_tokens=2, batch_size=2)) as client:
        results = client.batch(prompts)
    assert len(results) == 3 and all(r.provider == "self" and r.completion_tokens for r in results)


# ---- retries ----------------------------------------------------------------------------------
@pytest.mark.parametrize("status", [500, 502, 503, 408, 429])
def test_retries_transient_statuses_then_succeeds(stand_in, status):
    server = stand_in("self", fail=status, fail_times=2)
    waits: list[float] = []
    with quick_client(settings(server.url, retry_attempts=2), waits) as client:
        result = client.chat("hi")
    assert result.content == "self: hi" and result.provider == "self"
    assert len(server.requests) == 3 and len(waits) == 2


def test_gives_up_after_retry_attempts(stand_in):
    server = stand_in("self", fail=500)
    with quick_client(settings(server.url, retry_attempts=2), []) as client, \
            pytest.raises(ProviderError) as info:
        client.chat("hi")
    assert len(server.requests) == 3
    assert info.value.status == 500 and "self says 500" in info.value.message


@pytest.mark.parametrize("status", [400, 401, 404, 422])
def test_no_retry_and_no_fallback_for_other_client_errors(stand_in, status):
    server = stand_in("self", fail=status)
    openai = stand_in("openai")
    with quick_client(settings(server.url, openai=openai, retry_attempts=3), []) as client, \
            pytest.raises(ProviderError) as info:
        client.chat("hi")
    assert info.value.status == status and len(server.requests) == 1 and openai.requests == []


def test_retry_after_seconds_is_honoured(stand_in):
    server = stand_in("self", fail=429, fail_times=1, retry_after="2")
    waits: list[float] = []
    with quick_client(settings(server.url), waits) as client:
        assert client.chat("hi").content == "self: hi"
    assert waits == [2.0]


def test_retry_after_really_waits(stand_in):
    server = stand_in("self", fail=503, fail_times=1, retry_after="1")
    with quick_client(settings(server.url)) as client:
        started = time.monotonic()
        client.chat("hi")
    assert time.monotonic() - started >= 0.95


def test_retry_after_http_date(stand_in):
    when = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 3))
    server = stand_in("self", fail=503, fail_times=1, retry_after=when)
    waits: list[float] = []
    with quick_client(settings(server.url), waits) as client:
        client.chat("hi")
    assert len(waits) == 1 and 1.0 <= waits[0] <= 3.0


def test_a_retry_after_longer_than_our_patience_moves_on(stand_in):
    server = stand_in("self", fail=503, retry_after="600")
    openai = stand_in("openai")
    waits: list[float] = []
    with quick_client(settings(server.url, openai=openai, retry_attempts=3), waits) as client:
        assert client.chat("hi").provider == "openai"
    assert len(server.requests) == 1 and waits == []


def test_connection_errors_are_retried():
    waits: list[float] = []
    with quick_client(settings(down_url(), retry_attempts=2), waits) as client, \
            pytest.raises(ProviderError, match="is not reachable"):
        client.chat("hi")
    assert len(waits) == 2


def test_timeout_seconds_bounds_each_request(stand_in):
    slow = stand_in("self", delay=20.0)
    started = time.monotonic()
    with quick_client(settings(slow.url, timeout_seconds=0.3, retry_attempts=0)) as client, \
            pytest.raises(ProviderError, match="did not answer within 0.3 s"):
        client.chat("hi")
    assert time.monotonic() - started < slow.delay  # it gave up instead of waiting for the answer


# ---- fallback ---------------------------------------------------------------------------------
def test_fallback_chain_down_then_500_then_openai(stand_in, caplog):
    together = stand_in("together", fail=500)
    openai = stand_in("openai")
    with caplog.at_level(logging.INFO, logger="llmctl.client"), \
            quick_client(settings(down_url(), together, openai), []) as client:
        result = client.chat("hi")
    assert result.provider == "openai" and result.content == "openai: hi"
    assert set(result.failed) == {"self", "together"}
    assert "not reachable" in result.failed["self"] and "500" in result.failed["together"]
    assert len(together.requests) == 2  # one retry
    # Each remote provider gets its own key and model; the llmctl-only field is not sent to them.
    assert together.requests[0]["auth"] == "Bearer tg-key" and openai.requests[0]["auth"] == "Bearer sk-key"
    sent = openai.requests[0]["body"]
    assert sent["model"] == "gpt-4o-mini" and "timeout" not in sent
    assert "Answered by openai instead of self, together" in caplog.text


def test_fallback_on_429(stand_in):
    together = stand_in("together", fail=429, retry_after="0")
    openai = stand_in("openai")
    with quick_client(settings(down_url(), together, openai, retry_attempts=2), []) as client:
        assert client.chat("hi").provider == "openai"
    assert len(together.requests) == 3


def test_together_answers_when_the_service_is_down(stand_in):
    together = stand_in("together")
    openai = stand_in("openai")
    with quick_client(settings(down_url(), together, openai), []) as client:
        result = client.chat("hi")
    assert result.provider == "together" and openai.requests == []
    assert together.requests[0]["body"]["model"] == "meta-llama/Llama-3.3-70B-Instruct-Turbo"


def test_providers_without_a_key_are_not_in_the_chain(stand_in):
    openai = stand_in("openai")
    s = settings(down_url(), openai=openai)
    assert [ep.name for ep in provider_chain(s)] == ["self", "openai"]
    assert [ep.name for ep in provider_chain(LLMSettings())] == ["self"]
    assert [ep.name for ep in provider_chain(s.model_copy(update={"provider": "openai"}))] == ["openai"]
    with pytest.raises(ConfigError, match="TOGETHER_API_KEY is not set"):
        provider_chain(LLMSettings(provider="together"))


def test_all_providers_failing_lists_each(stand_in):
    together = stand_in("together", fail=500)
    openai = stand_in("openai", fail=503)
    with quick_client(settings(down_url(), together, openai), []) as client, \
            pytest.raises(AllProvidersFailed) as info:
        client.chat("hi")
    assert set(info.value.failures) == {"self", "together", "openai"}
    message = info.value.message
    assert "together says 500; OpenAI at" in message and message.endswith("openai says 503.")
    assert "(Connection refused); Together AI at" in message and ".;" not in message


def test_all_providers_failing_names_the_one_skipped_while_it_cools_down(stand_in):
    """Without the skipped one, the message blamed only OpenAI, and the user did not know the service
    was not even asked."""
    flaky = stand_in("self", fail=500)
    openai = stand_in("openai")
    now = [0.0]
    with quick_client(settings(flaky.url, openai=openai, retry_attempts=0, cooldown_seconds=30), [],
                      clock=lambda: now[0], failures_before_cooldown=1) as client:
        assert client.chat("hi").provider == "openai"  # the service failed once: it cools down
        openai.fail = 500
        now[0] += 10
        with pytest.raises(AllProvidersFailed) as info:
            client.chat("hi")
    message = info.value.message
    skipped = f"The llmctl service at {flaky.url} skipped: it kept failing (cooling down for 20 s more)"
    assert skipped in message
    assert "openai says 500" in message and message.index("llmctl service") < message.index("OpenAI")
    assert info.value.skipped.keys() == {"self"} and info.value.failures.keys() == {"openai"}
    assert len(flaky.requests) == 1


def test_stream_falls_back_before_the_first_byte(stand_in):
    together = stand_in("together")
    with quick_client(settings(down_url(), together), []) as client:
        stream = client.stream("tell me")
        text = "".join(stream)
    assert stream.provider == "together" and text == "together: tell me"
    assert stream.result.completion_tokens == 3 and "self" in stream.result.failed


def test_a_failing_provider_cools_down_instead_of_being_retried_every_call(stand_in):
    flaky = stand_in("self", fail=500)
    openai = stand_in("openai")
    now = [1000.0]
    with quick_client(settings(flaky.url, openai=openai, retry_attempts=0, cooldown_seconds=30), [],
                      clock=lambda: now[0], failures_before_cooldown=2) as client:
        for _ in range(2):
            assert client.chat("hi").provider == "openai"
        assert len(flaky.requests) == 2
        result = client.chat("hi")  # cooling down: not asked at all
        assert result.provider == "openai" and "cooling down" in result.failed["self"]
        assert len(flaky.requests) == 2
        now[0] += 31  # cool-down over: asked again
        flaky.fail = None
        assert client.chat("hi").provider == "self"
        assert len(flaky.requests) == 3


def test_with_every_provider_cooling_down_they_are_tried_anyway(stand_in):
    together = stand_in("together", fail=500)
    now = [0.0]
    with quick_client(settings(down_url(), together, retry_attempts=0), [], clock=lambda: now[0],
                      failures_before_cooldown=1) as client:
        with pytest.raises(AllProvidersFailed):
            client.chat("hi")
        together.fail = None
        assert client.chat("hi").provider == "together"


# ---- batches ----------------------------------------------------------------------------------
def test_batch_chat_bounds_concurrency_and_keeps_order(stand_in):
    server = stand_in("self", delay=0.1)
    prompts = [f"p{i}" for i in range(9)]
    with quick_client(settings(server.url, batch_size=3)) as client:
        results = batch_chat(client, prompts)
    assert [r.content for r in results] == [f"self: p{i}" for i in range(9)]
    assert server.max_in_flight == 3


def test_a_batch_larger_than_the_connection_pool_waits_for_a_connection(stand_in):
    """The client keeps max(16, 2 x batch_size) connections; a batch_chat of 48 at once used to fail the
    third wave with "could not be reached within 2 s" after waiting that long for a free connection."""
    server = stand_in("self", delay=1.2)
    prompts = [f"p{i}" for i in range(48)]
    with quick_client(settings(server.url, batch_size=1, timeout_seconds=2, retry_attempts=0)) as client:
        results = batch_chat(client, prompts, batch_size=48, return_exceptions=True)
    assert [getattr(r, "message", None) for r in results if not isinstance(r, ChatResult)] == []
    assert [r.content for r in results] == [f"self: {p}" for p in prompts]
    assert len(server.requests) == 48 and server.max_in_flight == 16


def test_waiting_for_a_pool_connection_is_not_called_unreachable(stand_in):
    """With an httpx.Client of one's own that bounds the wait for a connection, running out of them is
    said as such: the provider was never asked, so it is neither unreachable nor failed over."""
    server = stand_in("self", delay=1.0)
    openai = stand_in("openai")
    http = httpx.Client(limits=httpx.Limits(max_connections=1), timeout=httpx.Timeout(5, pool=0.2))
    with http, quick_client(settings(server.url, openai=openai), [], http=http) as client:
        results = batch_chat(client, ["a", "b"], batch_size=2, return_exceptions=True)
    answered = [r for r in results if isinstance(r, ChatResult)]
    refused = [r for r in results if isinstance(r, ProviderError)]
    assert len(answered) == 1 and answered[0].provider == "self" and len(refused) == 1
    message = refused[0].message
    assert "was not asked: no connection of the HTTP client's pool came free" in message
    assert "could not be reached" not in message and not refused[0].unreachable
    assert len(server.requests) == 1 and openai.requests == []


def test_batch_chat_failures(stand_in):
    server = stand_in("self", fail=400)
    with quick_client(settings(server.url)) as client:
        results = batch_chat(client, ["a", "b"], batch_size=2, return_exceptions=True)
        assert all(isinstance(r, ProviderError) and r.status == 400 for r in results)
        with pytest.raises(ProviderError):
            batch_chat(client, ["a", "b"])


# ---- streams cut short, dead providers, keys ------------------------------------------------------
def test_a_stream_cut_off_mid_answer_says_so(stand_in):
    server = stand_in("self", reply="one two three four", cut_after=2)
    with quick_client(settings(server.url)) as client:
        stream = client.stream("hi")
        pieces = []
        with pytest.raises(ProviderError) as info:
            for piece in stream:
                pieces.append(piece)
    assert pieces == ["one", " two"]
    assert "closed the connection mid-answer; the answer is cut off" in info.value.message
    assert "not reachable" not in info.value.message and not info.value.fallback


def test_a_provider_refusing_connections_is_skipped_at_once_while_another_can_answer(stand_in):
    """Without this, every prompt after the service died spent seconds of back-off on it first."""
    openai = stand_in("openai")
    waits: list[float] = []
    with quick_client(settings(down_url(), openai=openai, retry_attempts=3), waits) as client:
        first = client.chat("hi")
        assert first.provider == "openai" and "not reachable" in first.failed["self"]
        assert waits == []  # no back-off on a refused connection while OpenAI can answer
        second = client.chat("hi")
    assert second.provider == "openai" and "could not be reached (cooling down" in second.failed["self"]


def test_a_cut_stream_counts_as_a_failure_of_that_provider(stand_in):
    server = stand_in("self", reply="one two three", cut_after=1)
    openai = stand_in("openai")
    with quick_client(settings(server.url, openai=openai), [], failures_before_cooldown=1) as client:
        with pytest.raises(ProviderError):
            list(client.stream("hi"))
        assert client.chat("again").provider == "openai"
    assert len(server.requests) == 1  # cooling down after the cut


def test_set_aside_skips_a_provider_for_a_while(stand_in):
    server = stand_in("self")
    openai = stand_in("openai")
    now = [0.0]
    with quick_client(settings(server.url, openai=openai), [], clock=lambda: now[0]) as client:
        client.set_aside("self", 30, "its model is still loading")
        result = client.chat("hi")
        assert result.provider == "openai" and "its model is still loading" in result.failed["self"]
        now[0] += 31
        assert client.chat("hi").provider == "self"


@pytest.mark.parametrize("key, words", [
    (None, "It needs an API key: set LLMCTL_API_KEY (or LLMCTL_API_KEY_FILE)."),
    ("wrong", "The key from LLMCTL_API_KEY (or LLMCTL_API_KEY_FILE) was refused"),
])
def test_a_401_says_which_setting_holds_the_key(stand_in, key, words):
    server = stand_in("self", fail=401, message="Missing API key.")
    with quick_client(settings(server.url, self_hosted_api_key=key)) as client, \
            pytest.raises(ProviderError) as info:
        client.chat("hi")
    assert info.value.status == 401 and words in info.value.message


def test_a_401_from_openai_names_OPENAI_API_KEY(stand_in):
    openai = stand_in("openai", fail=401)
    with quick_client(settings(down_url(), openai=openai)) as client, pytest.raises(ProviderError) as info:
        client.chat("hi")
    assert "OPENAI_API_KEY was refused" in info.value.message
