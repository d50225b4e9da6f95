"""Streams and admission counted right, on a real server: [DONE] after an in-band error, a client gone counted
as "cancelled" (never "error"), and a burst admitted into free batch slots before anyone counts as waiting."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import httpx
import pytest

from llmctl.engine import EngineConfig, SamplingParams, Sequence
from llmctl.server.generation import Generation
from llmctl.server.pipeline import Run
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service, wait_for, while_health_answers

USER = [{"role": "user", "content": "Hello there"}]
SLOTS, QUEUE = 8, 2
BODIES = {
    "/v1/chat/completions": lambda **kw: {"messages": USER, **kw},
    "/v1/completions": lambda **kw: {"prompt": "Hello there", **kw},
}


class Gate:
    """Holds the engine thread at the start of a forward pass once ``allow`` passes went through."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.opened.set()
        self.blocked = threading.Event()
        self.passes_left = 0

    def close(self, allow: int = 0) -> None:
        self.passes_left = allow
        self.blocked.clear()
        self.opened.clear()

    def open(self) -> None:
        self.opened.set()

    def wait(self) -> None:
        if self.opened.is_set():
            return
        if self.passes_left > 0:
            self.passes_left -= 1
            return
        self.blocked.set()
        self.opened.wait()


@pytest.fixture(scope="module")
def gated(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=SLOTS, max_waiting=QUEUE,
                                                           kv_cache_tokens=16384))
    gate = Gate()
    model = service.engine.model
    real = model.forward

    def forward(*args, **kwargs):
        gate.wait()
        return real(*args, **kwargs)

    model.forward = forward
    try:
        with serve_in_thread(service) as url:
            yield service, url, gate
    finally:
        gate.open()
        service.shutdown()


@pytest.mark.parametrize("route", list(BODIES))
def test_an_in_band_timeout_is_followed_by_done(gated, route):
    service, url, gate = gated
    timeout = 1.0
    gate.close(allow=4)  # the prefill and a few steps give the first text (greedy: the same each run); then it waits
    try:
        with httpx.Client(base_url=url, timeout=60) as client, client.stream(
                "POST", route, json=BODIES[route](max_tokens=50, ignore_eos=True, timeout=timeout, temperature=0,
                                                  stream=True)) as r:
            assert r.status_code == 200  # the first token is out: an error from now on goes in the stream
            started = time.monotonic()
            lines = r.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert wait_for(lambda: gate.blocked.is_set())
            # Past the request's deadline, /health answered all the while.
            while_health_answers(url, lambda: time.sleep(max(0.0, timeout - (time.monotonic() - started)) + 0.1))
            gate.open()
            rest = [line for line in lines if line.startswith("data: ")]
    finally:
        gate.open()
    assert first and rest[-1] == "data: [DONE]", rest[-3:]
    error = json.loads(rest[-2][len("data: "):])["error"]
    assert error["code"] == "request_timeout", error


STREAMS = {  # route: (body, the error event's request_id from its data)
    "/v1/chat/completions": (BODIES["/v1/chat/completions"], lambda data: data["error"]["request_id"]),
    "/v1/completions": (BODIES["/v1/completions"], lambda data: data["error"]["request_id"]),
    "/v1/responses": (lambda **kw: {"input": "Hello there", "max_output_tokens": kw.pop("max_tokens"), **kw},
                      lambda data: data["type"] == "error" and data["request_id"]),
    "/v1/messages": (lambda **kw: {"messages": USER, **kw},
                     lambda data: data["type"] == "error" and data["request_id"]),
}


@pytest.mark.parametrize("route", list(STREAMS))
def test_an_error_in_a_started_stream_names_the_request_id(gated, route):
    """A timeout after the first token (the engine held past the deadline): the error event in the stream
    carries the request's x-request-id, on every streaming API."""
    service, url, gate = gated
    body, request_id_of = STREAMS[route]
    timeout = 1.0
    gate.close(allow=4)
    try:
        with httpx.Client(base_url=url, timeout=60) as client, client.stream(
                "POST", route, headers={"x-request-id": f"mid-stream-{route}"},
                json=body(max_tokens=50, ignore_eos=True, timeout=timeout, temperature=0, stream=True)) as r:
            assert r.status_code == 200 and r.headers["x-request-id"] == f"mid-stream-{route}"
            started = time.monotonic()
            lines = r.iter_lines()
            assert next(line for line in lines if line.startswith("data: "))
            assert wait_for(lambda: gate.blocked.is_set())
            time.sleep(max(0.0, timeout - (time.monotonic() - started)) + 0.1)  # past the deadline, engine held
            gate.open()
            rest = [json.loads(line[len("data: "):]) for line in lines
                    if line.startswith("data: ") and line != "data: [DONE]"]
    finally:
        gate.open()
    errors = [data for data in rest if "error" in data or data.get("type") == "error"]
    assert len(errors) == 1 and request_id_of(errors[0]) == f"mid-stream-{route}", rest[-2:]


def test_a_burst_fills_free_slots_before_it_counts_as_waiting(gated):
    """With the engine busy on one request, a burst takes the other SLOTS - 1 slots and the QUEUE places:
    only the one arrival beyond both is a 429 (arrivals used to count as waiting until admitted)."""
    service, url, gate = gated
    gate.close()
    route = "/v1/chat/completions"
    burst_size = SLOTS - 1 + QUEUE + 1

    def send(_):
        return httpx.post(url + route, json=BODIES[route](max_tokens=3, timeout=60), timeout=60).status_code

    with concurrent.futures.ThreadPoolExecutor(burst_size + 1) as pool:
        try:
            first = pool.submit(send, 0)
            assert wait_for(lambda: gate.blocked.is_set())  # the engine is busy with the first request
            burst = [pool.submit(send, i) for i in range(burst_size)]
            # Every arrival is queued behind the busy engine, or answered at once (refused).
            assert while_health_answers(url, lambda: wait_for(
                lambda: service.engine.waiting + sum(f.done() for f in burst) == burst_size, 30))
            early = [f.result() for f in burst if f.done()]
        finally:
            gate.open()
        statuses = [f.result() for f in burst]
    assert early == [429], early
    assert first.result() == 200 and sorted(statuses) == [200] * (burst_size - 1) + [429], statuses


def test_a_client_that_leaves_mid_stream_is_counted_as_cancelled(gated):
    service, url, gate = gated
    route = "/v1/chat/completions"
    before = dict(service.metrics.finished)

    def leave_early() -> None:
        with httpx.Client(base_url=url, timeout=60) as client, client.stream(
                "POST", route, json=BODIES[route](max_tokens=200, ignore_eos=True, stream=True)) as r:
            next(line for line in r.iter_lines() if line.startswith("data: "))

    for _ in range(4):
        while_health_answers(url, leave_early)
    assert wait_for(lambda: sum(service.metrics.finished.values()) == sum(before.values()) + 4, 30)
    assert wait_for(lambda: service.engine.running == 0, 30)
    after = service.metrics.finished
    assert after.get("cancelled", 0) - before.get("cancelled", 0) == 4, (before, after)
    assert after.get("error", 0) == before.get("error", 0)


def test_a_stream_closed_by_the_server_s_failed_write_counts_as_cancelled(gated):
    """The other order of the race: the server's write fails (the stream is closed) before the handler's
    poll saw the client go: the generation ends as "cancelled" all the same."""
    service, url, gate = gated
    loaded = service.loaded
    seq = Sequence(loaded.tokenizer("Hello")["input_ids"], SamplingParams(max_tokens=50, ignore_eos=True))
    gen = Generation(seq, loaded.tokenizer, [], time.monotonic())
    before = service.metrics.finished.get("cancelled", 0)
    seq.events.put(loaded.tokenizer("Hi")["input_ids"][0])
    run = Run([gen], len(seq.prompt_ids), service._ended)
    service._enter()
    deltas = run.stream()
    assert next(deltas).text
    deltas.close()  # what waitress does to the answer's iterator when a write to the client fails
    assert seq.cancelled and gen.finish_reason == "cancelled"
    assert service.metrics.finished.get("cancelled", 0) == before + 1
