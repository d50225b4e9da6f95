"""Engine behaviour seen through the HTTP API: batching, timeouts, cancellation, back-pressure, faults.

Some tests slow the model down by wrapping its real forward pass with a short sleep, so that a
request is still running when the test acts on it; the forward pass itself still runs.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx
import pytest
import torch

from llmctl.core.loader import LoadOptions, load_model
from llmctl.engine import EngineConfig, Finish, SamplingParams, Sequence
from llmctl.errors import ModelLoadError
from llmctl.server.api import status
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service, slow_down, slow_serving, wait_for

USER = [{"role": "user", "content": "Hello there"}]


@pytest.fixture()
def slow_server(tiny_model):
    with slow_serving(tiny_model, 0.01, EngineConfig(max_num_seqs=4, max_waiting=2, kv_cache_tokens=4096)) as server:
        yield server


def test_batched_output_equals_single_output(client, base_url, tiny_service):
    """With temperature 0 a request's text does not depend on what else is in the batch."""
    prompts = [f"Question number {i}: {'why ' * (i % 5)}?" for i in range(16)]

    def ask(prompt, c=client):
        r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}],
                                                 "max_tokens": 24, "temperature": 0, "ignore_eos": True})
        return r.json()["choices"][0]["message"]["content"]

    alone = [ask(p) for p in prompts]
    start_steps = tiny_service.engine.stats.max_batch_size

    def ask_new(prompt):
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return ask(prompt, c)

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask_new, prompts))
    assert together == alone
    assert tiny_service.engine.stats.max_batch_size >= max(start_steps, 4), "requests were not batched"


def test_timeout_answers_408_and_stops_generation(slow_server):
    service, url = slow_server
    before = service.engine.stats.tokens_generated
    r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
        "messages": USER, "max_tokens": 200, "ignore_eos": True, "timeout": 0.5})
    assert r.status_code == 408
    assert r.json()["error"]["type"] == "timeout_error"
    assert wait_for(lambda: service.engine.running == 0, 60)  # a bound for a hang only
    generated = service.engine.stats.tokens_generated - before
    # Each step sleeps 0.01 s, so at most ~50 tokens fit in the 0.5 s timeout (fewer on a busy machine): the answer
    # came before the 200 tokens were made, and generation stopped with it.
    assert generated < 120, f"generation went on after the timeout ({generated} tokens)"


def test_timeout_during_stream_reports_error_in_band(slow_server):
    service, url = slow_server
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "messages": USER, "max_tokens": 200, "ignore_eos": True, "timeout": 0.5, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200
    assert '"timeout_error"' in lines[-2] and lines[-1] == "data: [DONE]"  # the error, then the stream's end
    assert wait_for(lambda: service.engine.running == 0, 60)  # a bound for a hang only


def test_metrics_count_how_generations_ended(slow_server):
    """A stream that times out was answered 200; the finish counters still show how it ended.
    The request counters count the API only, not health probes."""
    service, url = slow_server
    before = httpx.get(url + "/metrics").json()
    for _ in range(3):
        httpx.get(url + "/health")
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "messages": USER, "max_tokens": 200, "ignore_eos": True, "timeout": 0.5, "stream": True}) as r:
        assert r.status_code == 200 and '"timeout_error"' in [line for line in r.iter_lines() if line][-2]
    assert httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
    assert wait_for(lambda: httpx.get(url + "/metrics").json()["finish_reasons"].get("timeout", 0)
                    == before["finish_reasons"].get("timeout", 0) + 1, 5)
    after = httpx.get(url + "/metrics").json()
    assert after["requests_total"] == before["requests_total"] + 2
    assert sum(after["finish_reasons"].values()) == sum(before["finish_reasons"].values()) + 2
    text = httpx.get(url + "/metrics", params={"format": "prometheus"}).text
    assert 'llmctl_request_finished_total{reason="timeout"}' in text


def test_client_disconnect_cancels_generation(slow_server):
    service, url = slow_server
    before = service.engine.stats.tokens_generated
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=30, json={
            "messages": USER, "max_tokens": 200, "ignore_eos": True, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 6:
                break
    assert wait_for(lambda: service.engine.running == 0, 60), "the sequence stayed in the batch"
    assert service.engine.stats.tokens_generated - before < 150


def test_non_streaming_disconnect_cancels_generation(slow_server):
    """Noticed while tokens keep flowing (a step every ~10 ms), not only when they pause."""
    service, url = slow_server
    before = service.engine.stats.tokens_generated
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/chat/completions", timeout=0.4, json={
            "messages": USER, "max_tokens": 200, "ignore_eos": True})
    assert wait_for(lambda: service.engine.running == 0, 60)  # a bound for a hang only
    # 200 tokens take over 2 s here; the client left at 0.4 s and is noticed within about 0.2 s more.
    assert service.engine.stats.tokens_generated - before < 150


def test_full_queue_answers_429_at_once(slow_server):
    service, url = slow_server
    body = {"messages": USER, "max_tokens": 100, "ignore_eos": True}

    def send(_):
        t = time.monotonic()
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        return r, time.monotonic() - t

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        results = list(pool.map(send, range(12)))
    statuses = [r.status_code for r, _ in results]
    # At least the waiting queue (2) is accepted; what arrives while it is full is turned away.
    assert statuses.count(200) >= 2 and statuses.count(429) >= 1, statuses
    assert set(statuses) == {200, 429}
    for r, _ in results:
        if r.status_code == 429:
            assert r.headers["Retry-After"] == "1"
            assert r.json()["error"]["type"] == "rate_limit_error"
    # At once: every refusal came before any accepted request could finish (100 steps of at least 0.01 s each).
    assert max(t for r, t in results if r.status_code == 429) < min(t for r, t in results if r.status_code == 200)


def test_health_never_waits_on_the_model(tiny_model):
    """/health answers between decode steps: with each step made to take 0.5 s, it still answers at once."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=4, max_waiting=8, kv_cache_tokens=4096))
    slow_down(service, 0.5)
    body = {"messages": USER, "max_tokens": 6, "ignore_eos": True}
    try:
        with serve_in_thread(service) as url, concurrent.futures.ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=60)
                       for _ in range(4)]
            assert wait_for(lambda: service.engine.running >= 4, 120)  # a bound for a hang only
            within_a_step = []
            for _ in range(10):
                steps = service.engine.stats.steps
                assert httpx.get(url + "/health", timeout=60).json()["running"] >= 1
                within_a_step.append(service.engine.stats.steps == steps)
            for f in futures:
                assert f.result().status_code == 200
    finally:
        service.shutdown()
    # A probe that waited on the model would always end after a step did: some end within the step they began in
    # (on a busy machine a probe alone may take a good part of a 0.5 s step, so not all of them).
    assert any(within_a_step), within_a_step


def test_out_of_memory_fails_only_affected_requests(tiny_model):
    service = make_service(tiny_model)
    model = service.engine.model
    real = model.forward
    fail = threading.Event()

    def forward(*args, **kwargs):
        if fail.is_set():
            fail.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    model.forward = forward
    try:
        with serve_in_thread(service) as url:
            fail.set()
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5}, timeout=30)
            assert r.status_code == 503
            error = r.json()["error"]
            assert error["code"] == "out_of_memory" and "--load-in-4bit" in error["message"]
            ok = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5}, timeout=30)
            assert ok.status_code == 200
            assert service.engine.stats.oom_events == 1
    finally:
        service.shutdown()


def test_out_of_memory_in_a_step_spares_requests_outside_it(tiny_model):
    """The batch that was decoding fails (its cache may be half-updated); a request still waiting for a
    slot is not part of that step and is answered normally afterwards."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=1, max_waiting=4, kv_cache_tokens=4096))
    model, engine = service.engine.model, service.engine
    real = model.forward
    fail = threading.Event()

    def forward(*args, **kwargs):
        time.sleep(0.01)
        if fail.is_set() and kwargs["input_ids"].shape[1] == 1:  # a decode step
            fail.clear()
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(*args, **kwargs)

    model.forward = forward
    body = {"messages": USER, "max_tokens": 40, "ignore_eos": True}
    try:
        with serve_in_thread(service) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
            running = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            assert wait_for(lambda: engine.running == 1, 10)
            waiting = pool.submit(httpx.post, url + "/v1/chat/completions", json=body, timeout=30)
            assert wait_for(lambda: engine.waiting == 1, 10)
            fail.set()
            assert running.result().status_code == 503
            assert running.result().json()["error"]["code"] == "out_of_memory"
            answer = waiting.result()
            assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 40
    finally:
        service.shutdown()


def test_unexpected_engine_error_is_500_without_traceback(tiny_model):
    service = make_service(tiny_model)
    model = service.engine.model
    real = model.forward
    calls = {"n": 0}

    def forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom: internal detail")
        return real(*args, **kwargs)

    model.forward = forward
    try:
        with serve_in_thread(service) as url:
            r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5}, timeout=30)
            assert r.status_code == 500
            assert "boom" not in r.text and "Traceback" not in r.text
            assert r.json()["error"]["type"] == "server_error"
            ok = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 5}, timeout=30)
            assert ok.status_code == 200
    finally:
        service.shutdown()


def test_loading_then_ready(tiny_model):
    """/health answers while the model loads; requests get 503 with Retry-After until it is ready."""
    release = threading.Event()

    def slow_loader(options):
        release.wait(30)
        return load_model(options)

    service = Service(ServiceSettings(load=LoadOptions(model_path=tiny_model, dtype="float32")), loader=slow_loader)
    service.load_in_background()
    with serve_in_thread(service) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["Retry-After"]
        status.Health.model_validate(r.json())  # the documented shape, while loading too
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and r.headers["Retry-After"]
        assert r.json()["error"]["code"] == "model_loading"
        release.set()
        assert wait_for(lambda: httpx.get(url + "/health").status_code == 200, 30)
        assert httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}).status_code == 200
    service.shutdown()


def test_load_failure_is_reported_by_health():
    def failing_loader(options):
        raise ModelLoadError("weights are corrupt (test)")

    service = Service(ServiceSettings(), loader=failing_loader)
    service.load()
    with serve_in_thread(service) as url:
        r = httpx.get(url + "/health")
        assert r.status_code == 503
        assert r.json()["status"] == "error" and "corrupt" in r.json()["error"]
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER})
        assert r.status_code == 503 and "corrupt" in r.json()["error"]["message"]


def test_chunked_prefill_gives_the_same_answer(tiny_model, client):
    """A prompt longer than --max-batched-tokens is prefilled in chunks, with the same result."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=4, max_batched_tokens=16))
    long = [{"role": "user", "content": "The capital of France is Paris. " * 6}]
    body = {"messages": long, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    try:
        with serve_in_thread(service) as url:
            chunked = httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()
    finally:
        service.shutdown()
    assert chunked["usage"]["prompt_tokens"] > 16 * 3
    whole = client.post("/v1/chat/completions", json=body).json()
    assert chunked["choices"][0]["message"] == whole["choices"][0]["message"]


def test_64_concurrent_streams_are_all_served(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=16, max_waiting=64, kv_cache_tokens=8192))
    body = {"messages": USER, "max_tokens": 24, "ignore_eos": True, "stream": True}

    def stream(url):
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            return r.status_code, [line for line in r.iter_lines() if line.startswith("data: ")][-1]

    try:
        with serve_in_thread(service, threads=96) as url, concurrent.futures.ThreadPoolExecutor(64) as pool:
            results = list(pool.map(lambda _: stream(url), range(64)))
    finally:
        service.shutdown()
    assert results == [(200, "data: [DONE]")] * 64


def test_small_requests_overtake_one_that_does_not_fit_yet(tiny_model):
    """A request whose KV reservation must wait does not hold up smaller ones behind it (for a while)."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, max_waiting=16, kv_cache_tokens=300))
    slow_down(service, 0.02)
    engine = service.engine

    def submit(max_tokens: int, prompt_tokens: int = 4) -> Sequence:
        return engine.submit(Sequence([5 + i % 50 for i in range(prompt_tokens)], SamplingParams(
            max_tokens=max_tokens, temperature=0, ignore_eos=True)))

    def finish_time(seq: Sequence) -> float:
        while not isinstance(seq.events.get(timeout=60), Finish):
            pass
        return time.monotonic()

    try:
        # Admission charges rows x the widest row, each row's context plus up to 128 tokens of growth.
        first = submit(60)  # 4 + 60 = 64
        assert wait_for(lambda: engine.running == 1, 10)
        big = submit(100, prompt_tokens=150)  # 150 + 100 = 250: 2 rows x 250 > 300, so it waits for `first`
        small = [submit(20) for _ in range(3)]  # 4 + 20: 4 rows x 64 <= 300, so they join `first` at once
        small_done = max(finish_time(s) for s in small)
        first_done, big_done = finish_time(first), finish_time(big)
        assert small_done < first_done < big_done
        assert engine.stats.max_batch_size >= 4
    finally:
        service.shutdown()


def test_requests_without_max_tokens_share_the_batch(tiny_model):
    """Clients that send no max_tokens (the openai SDK's and LangChain's default) may each run to the end
    of the context; they still run together, and the KV budget holds by preempting and resuming rows."""
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, max_waiting=16, kv_cache_tokens=1024))
    prompts = [f"Tell me about number {i}" for i in range(8)]
    model, engine = service.engine.model, service.engine
    real, gate = model.forward, threading.Event()

    def forward(*args, **kwargs):  # together: hold the first step until all eight have arrived
        gate.wait(30)
        return real(*args, **kwargs)

    try:
        with serve_in_thread(service) as url:
            def ask(prompt):
                r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
                    "messages": [{"role": "user", "content": prompt}], "temperature": 0, "ignore_eos": True})
                assert r.status_code == 200, r.text
                body = r.json()
                return body["choices"][0]["message"]["content"], body["usage"]["total_tokens"]

            alone = [ask(p) for p in prompts]
            assert engine.stats.preemptions == 0
            model.forward = forward
            gate.clear()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(ask, p) for p in prompts]
                assert wait_for(lambda: engine.waiting + engine.running == 8, 10)
                gate.set()
                together = [f.result() for f in futures]
        assert together == alone
        assert all(total == 256 for _, total in alone)  # each ran to the end of the tiny model's context
        # A worst-case reservation (the whole context) would have let 1024 // 256 = 4 run at once.
        assert engine.stats.max_batch_size >= 6
        assert engine.stats.preemptions >= 1
    finally:
        service.shutdown()
