"""Bounded memory and connections: big prompts on every route, slow clients, full workers (issue 23, items
2 and 3), each sent to a real server on 127.0.0.1 with its limits set low so the floods stay small."""

from __future__ import annotations

import contextlib
import json
import select
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmctl.engine import EngineConfig
from llmctl.server.admission import TOKENIZER_POOL, TOKENIZER_THREADS, AdmissionLimits
from llmctl.server.testing import serve_in_thread
from llmctl.server.transport import TransportLimits
from tests.conftest import REAL_MODEL, make_service, probe_health, slow_down, wait_for, while_health_answers

USER = [{"role": "user", "content": "Hello there"}]
FLOOD_SOURCE = "127.0.0.2"  # the flooding client; /health is asked from 127.0.0.1, another client


def big_body(route: str, size: int) -> dict:
    """A request for ``route`` whose prompt is ``size`` characters."""
    text = "hello world " * (size // 12)
    messages = [{"role": "user", "content": text}]
    return {
        "/v1/chat/completions": {"messages": messages, "max_tokens": 2},
        "/v1/completions": {"prompt": text, "max_tokens": 2},
        "/v1/responses": {"input": text, "max_output_tokens": 2},
        "/v1/messages": {"messages": messages, "max_tokens": 2},
        "/v1/messages/count_tokens": {"messages": messages},
        "/tokenize": {"prompt": text},
        "/detokenize": {"tokens": [1] * (size // 2)},
    }[route]


ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/messages", "/v1/messages/count_tokens",
          "/tokenize", "/detokenize"]


def unanswered(sock: socket.socket) -> bool:
    """Whether the server has sent nothing on ``sock`` yet (nor closed it)."""
    return not select.select([sock], [], [], 0)[0]


def flood_socket(port: int, source: str = FLOOD_SOURCE) -> socket.socket:
    sock = socket.socket()
    try:
        sock.bind((source, 0))
    except OSError:
        sock.close()
        pytest.skip(f"this system cannot send from {source} (Linux routes all of 127.0.0.0/8 to loopback)")
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    return sock


def read_status(sock: socket.socket) -> tuple[int, str]:
    """The status and the whole response of a connection the server answers and closes."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    text = data.decode("latin-1")
    return (int(text.split()[1]) if text.startswith("HTTP/1.") else 0), text


@pytest.fixture(scope="module")
def service(tiny_model):
    svc = make_service(tiny_model, admission=AdmissionLimits(max_preparing=3, max_preparing_bytes=96 * 1024))
    yield svc
    svc.shutdown()


@pytest.fixture(scope="module")
def url(service):
    limits = TransportLimits(header_timeout=1.0, body_timeout=1.0, max_client_connections=32)
    with serve_in_thread(service, limits=limits, max_body_bytes=256 * 1024) as base:
        yield base


@contextlib.contextmanager
def tokenizer_held():
    """Keep every tokenizer thread busy, so that requests reaching tokenization wait there (holding their
    admission)."""
    release = threading.Event()
    started = threading.Semaphore(0)

    def hold() -> None:
        started.release()
        release.wait(60)

    blockers = [TOKENIZER_POOL.submit(hold) for _ in range(TOKENIZER_THREADS)]
    try:
        for _ in blockers:
            assert started.acquire(timeout=10)
        yield
    finally:
        release.set()
        for blocker in blockers:
            blocker.result()


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_over_the_preparing_bytes_is_429_with_retry_after_on_every_route(service, url, route):
    with ThreadPoolExecutor(1) as pool, tokenizer_held():
        held = pool.submit(httpx.post, url + "/tokenize", json=big_body("/tokenize", 64 * 1024), timeout=30)
        assert wait_for(lambda: service.admission.preparing == 1)
        r = httpx.post(url + route, json=big_body(route, 48 * 1024), timeout=10)
        assert r.status_code == 429, r.text
        assert r.headers["Retry-After"] == "1"
        assert "bytes of requests" in r.text
        if route.startswith("/v1/messages"):
            assert r.json()["error"]["type"] == "rate_limit_error"  # Anthropic's envelope
        else:
            assert r.json()["error"]["code"] == "server_busy"
        probe_health(url)
        assert not held.done()  # answered beside the request held in tokenization, not after it
    assert held.result().status_code == 200
    assert service.admission.preparing == 0 and service.admission.preparing_bytes == 0


def test_requests_beyond_the_preparing_count_are_429(service, url):
    with ThreadPoolExecutor(3) as pool, tokenizer_held():
        held = [pool.submit(httpx.post, url + "/tokenize", json={"prompt": "hi"}, timeout=30) for _ in range(3)]
        assert wait_for(lambda: service.admission.preparing == 3)
        r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=10)
        assert r.status_code == 429 and r.headers["Retry-After"] == "1"
        assert "3 requests" in r.json()["error"]["message"]
    assert [f.result().status_code for f in held] == [200] * 3


@pytest.mark.parametrize("route", ROUTES)
def test_a_body_over_the_body_limit_is_413_on_every_route(url, route):
    r = httpx.post(url + route, json=big_body(route, 300 * 1024), timeout=30)
    assert r.status_code == 413, r.text


def test_a_flood_of_big_prompts_gets_answers_or_429_and_health_stays_fast(service, url):
    routes = ["/tokenize", "/v1/messages/count_tokens", "/v1/chat/completions", "/v1/completions"]
    # Encoded up front and sent on one pooled client: the clients share this process (and its GIL) with the server.
    bodies = [(route, json.dumps(big_body(route, 40 * 1024))) for route in routes * 6]

    def flood() -> list[httpx.Response]:
        with ThreadPoolExecutor(len(bodies)) as pool, httpx.Client(timeout=60) as client:
            return list(pool.map(lambda rb: client.post(url + rb[0], content=rb[1],
                                                        headers={"Content-Type": "application/json"}), bodies))

    results = while_health_answers(url, flood)
    statuses = {r.status_code for r in results}
    # Generation routes answer 400: 40 KB is past the tiny model's context; what matters is no 5xx.
    assert statuses <= {200, 400, 429}, statuses
    assert all(r.headers.get("Retry-After") == "1" for r in results if r.status_code == 429)
    assert service.admission.preparing == 0 and service.admission.preparing_bytes == 0


def test_slow_header_connections_are_capped_per_client_and_timed_out(url):
    port = int(url.rsplit(":", 1)[1])
    socks = [flood_socket(port) for _ in range(60)]
    try:
        for sock in socks:  # the start of a request, and then nothing more
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        probe_health(url)  # another client is served while they wait, not once their header timeout is over
        assert any(unanswered(sock) for sock in socks)
        answers = [read_status(sock) for sock in socks]  # each read gives up after 10 s: a bound for a hang
    finally:
        for sock in socks:
            sock.close()
    statuses = sorted(status for status, _ in answers)
    # Beyond the cap: 429 at once; the 32 within it: 408 once the header timeout (1 s) has passed.
    assert statuses == [408] * 32 + [429] * 28
    assert all("Retry-After: 1" in text for status, text in answers if status == 429)
    assert all('"code": "request_timeout"' in text for status, text in answers if status == 408)
    probe_health(url)
    r = httpx.post(url + "/v1/chat/completions", json={"messages": USER, "max_tokens": 2}, timeout=30)
    assert r.status_code == 200


def test_at_the_connection_limit_the_oldest_slow_connections_make_room(service):
    limits = TransportLimits(header_timeout=30.0, max_connections=20, max_client_connections=100)
    with serve_in_thread(service, limits=limits) as base, httpx.Client(timeout=10) as probe:
        assert probe.get(base + "/health").status_code == 200  # a kept-alive probe, the oldest connection
        port = int(base.rsplit(":", 1)[1])
        socks = [flood_socket(port) for _ in range(30)]
        try:
            for sock in socks:
                sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\n")
            # Eleven of them, then /health's new connection, each took the place of the oldest connection
            # that never completed a request; the probe's connection, which did, is kept.
            probe_health(base)
            assert probe.get(base + "/health").status_code == 200
            evicted = [read_status(sock) for sock in socks[:12]]
            for sock in socks[12:]:
                sock.settimeout(0.2)
                with pytest.raises(TimeoutError):
                    sock.recv(1)
        finally:
            for sock in socks:
                sock.close()
    assert all(status == 408 and "connection_evicted" in text for status, text in evicted)


def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(url):
    port = int(url.rsplit(":", 1)[1])
    with flood_socket(port) as sock:
        assert read_status(sock)[0] == 408


def test_a_body_that_trickles_in_is_408_after_the_body_timeout(url):
    port = int(url.rsplit(":", 1)[1])
    with flood_socket(port) as sock:
        sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": \"")
        probe_health(url)
        status, text = read_status(sock)
    assert status == 408 and "body did not arrive within 1 s" in text


def test_health_is_answered_while_every_worker_is_busy(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=4, max_waiting=8, kv_cache_tokens=4096))
    slow_down(service, 0.05)
    try:
        with serve_in_thread(service, threads=4) as base, ThreadPoolExecutor(8) as pool:
            body = {"messages": USER, "max_tokens": 40, "ignore_eos": True}
            busy = [pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=120) for _ in range(8)]
            # Four workers hold four requests; four more wait in line for a worker.
            assert wait_for(lambda: service.engine.running == 4, timeout=30)
            for _ in range(5):
                probe_health(base)
            # None of them can be done: 40 steps of at least 0.05 s each. A probe that waited for a worker
            # would be answered only after one of them was.
            none_done = not any(f.done() for f in busy)
            assert [f.result().status_code for f in busy] == [200] * 8
    finally:
        service.shutdown()
    assert none_done, "/health waited for a worker"


def test_prompt_tokens_waiting_for_the_engine_are_bounded(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=1, max_waiting=8, kv_cache_tokens=4096),
                           admission=AdmissionLimits(max_waiting_tokens=30))
    slow_down(service, 0.05)
    prompt = {"role": "user", "content": "hello world " * 4}  # about 20 tokens with the template
    try:
        with serve_in_thread(service) as base, ThreadPoolExecutor(2) as pool:
            body = {"messages": [prompt], "max_tokens": 30, "ignore_eos": True}
            running = pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=120)
            assert wait_for(lambda: service.engine.running == 1, timeout=30)
            waiting = pool.submit(httpx.post, base + "/v1/chat/completions", json=body, timeout=120)
            assert wait_for(lambda: service.engine.waiting == 1, timeout=30)
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 429 and r.headers["Retry-After"] == "1"
            assert r.json()["error"]["code"] == "too_many_waiting_tokens"
            probe_health(base)
            assert not waiting.done()  # answered beside the queued request, not after it
            assert running.result().status_code == 200 and waiting.result().status_code == 200
            assert service.admission.waiting_tokens() == 0
    finally:
        service.shutdown()


def test_a_burst_into_free_batch_slots_is_not_held_to_the_waiting_tokens_bound(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, max_waiting=8, kv_cache_tokens=4096),
                           admission=AdmissionLimits(max_waiting_tokens=30))
    prompt = {"role": "user", "content": "hello world " * 4}  # about 20 tokens: two of them are over 30
    try:
        with serve_in_thread(service) as base, ThreadPoolExecutor(6) as pool:
            body = {"messages": [prompt], "max_tokens": 4}
            statuses = list(pool.map(lambda _: httpx.post(base + "/v1/chat/completions", json=body,
                                                          timeout=60).status_code, range(6)))
    finally:
        service.shutdown()
    assert statuses == [200] * 6


def test_serve_flags_set_the_connection_limits(server_process, tiny_model):
    server = server_process("--model-path", str(tiny_model), "--dtype", "float32", "--max-client-connections", "2",
                            env={"LLMCTL_HEADER_TIMEOUT": "0.5"})
    server.wait_status("ready")
    socks = [flood_socket(server.port) for _ in range(3)]
    try:
        statuses = sorted(read_status(sock)[0] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert statuses == [408, 408, 429]
    assert server.stop() == 0


def test_health_stays_fast_while_a_huge_prompt_is_tokenized(service, url):
    r = while_health_answers(url, lambda: httpx.post(url + "/tokenize", json=big_body("/tokenize", 90 * 1024),
                                                     timeout=60))
    assert r.status_code == 200 and r.json()["count"] > 10_000


@REAL_MODEL[0]
@REAL_MODEL[1]
def test_smollm2_server_bounds_big_prompts_and_slow_clients(server_process):
    server = server_process("--max-preparing-bytes", str(1 << 20), "--max-client-connections", "8",
                            "--header-timeout", "1")
    server.wait_status("ready", timeout=300)
    body = json.dumps(big_body("/tokenize", 400 * 1024))
    transport = httpx.HTTPTransport(local_address=FLOOD_SOURCE)

    def flood() -> list[httpx.Response]:
        with httpx.Client(transport=transport, timeout=120) as client, ThreadPoolExecutor(6) as pool:
            return list(pool.map(lambda _: client.post(server.url + "/tokenize", content=body,
                                                       headers={"Content-Type": "application/json"}), range(6)))

    answers = while_health_answers(server.url, flood)
    statuses = [r.status_code for r in answers]
    # At most two 400 KB bodies fit the 1 MiB preparing budget at once: one arriving beyond them gets 429.
    assert set(statuses) <= {200, 429} and 200 in statuses, statuses
    assert all(r.headers["Retry-After"] == "1" for r in answers if r.status_code == 429)
    socks = [flood_socket(server.port, "127.0.0.3") for _ in range(12)]
    try:
        for sock in socks:
            sock.sendall(b"POST /tokenize HTTP/1.1\r\nHost: x\r\n")
        probe_health(server.url)
        assert any(unanswered(sock) for sock in socks)  # answered while they wait for their header timeout
        slow = sorted(read_status(sock)[0] for sock in socks)
    finally:
        for sock in socks:
            sock.close()
    assert slow == [408] * 8 + [429] * 4
    assert server.stop() == 0


@pytest.mark.parametrize("request_bytes", [
    b"\x00\x01 garbage\r\nHost: x\r\n\r\n",  # no method, path or version in the request line
    b"GET /health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",  # a header line without a colon
])
def test_a_malformed_request_gets_a_400_and_the_server_goes_on(url, request_bytes):
    port = int(url.rsplit(":", 1)[1])
    with flood_socket(port) as sock:
        sock.sendall(request_bytes)
        status, text = read_status(sock)
    assert status == 400, text
    probe_health(url)
