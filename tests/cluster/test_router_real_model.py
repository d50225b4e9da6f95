"""The real embedded SmolLM2 on two replicas (127.0.0.1) behind vLLM's router, started by `llmctl router`."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import httpx
import openai
import pytest

from llmctl.core.loader import LoadOptions
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import free_port, serve_in_thread
from tests.cluster.test_router_cli import ROUTER_MISSING
from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.skipif(ROUTER_MISSING, reason="the cluster extra is not installed")]
# Long enough (over 128 tokens) that the first turn's prompt fills one of the chunks whose KV the prefix
# cache keeps exact, so the second turn reads it back.
SYSTEM = ("You are a concise geography assistant. Answer with the city's name and one short sentence. "
          "Never add lists, never add greetings, never repeat the question. "
          "The people who ask you are travellers planning short trips in Europe: they want the capital of a "
          "country, said plainly, so that they can book a train or a flight. Keep every answer to one line. "
          "Do not explain history, do not describe monuments, do not suggest hotels or restaurants, and do "
          "not ask questions back. If a question names a country, give its capital city and nothing else "
          "that the traveller did not ask for.")


@pytest.fixture(scope="module")
def routed():
    replicas = [Service(ServiceSettings(load=LoadOptions(device="cpu"))) for _ in range(2)]
    for service in replicas:
        service.load()
        assert service.status == "ready", service.error
    with contextlib.ExitStack() as stack:
        urls = [stack.enter_context(serve_in_thread(service)) for service in replicas]
        port = free_port()
        router = subprocess.Popen(
            [sys.executable, "-m", "llmctl", "router", "--host", "127.0.0.1", "--port", str(port),
             "--prometheus-port", str(free_port()), "--health-check-interval", "1",
             *(arg for url in urls for arg in ("--worker-url", url))],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        stack.callback(router.wait, 10)
        stack.callback(router.kill)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        yield url, replicas
    for service in replicas:
        service.shutdown()


def test_smollm2_answers_through_the_router_and_a_conversation_stays_on_its_replica(routed):
    url, replicas = routed
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": "What is the capital of France?"}]
    first = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                           max_tokens=30)
    assert "Paris" in first.choices[0].message.content
    messages += [{"role": "assistant", "content": first.choices[0].message.content},
                 {"role": "user", "content": "And the capital of Italy?"}]
    second = client.chat.completions.create(model="SmolLM2-135M-Instruct", messages=messages, temperature=0,
                                            max_tokens=30)
    assert "Rome" in second.choices[0].message.content
    # Cache-aware routing sent the second turn where the first one's prompt is cached.
    served = [s.metrics.snapshot()["requests_by_route"].get("/v1/chat/completions", 0) for s in replicas]
    assert sorted(served) == [0, 2]
    assert first.usage.prompt_tokens > 128
    assert second.usage.prompt_tokens_details.cached_tokens >= 128
