"""Every API on the real embedded model (SmolLM2-135M-Instruct): they all answer that Paris is the capital."""

from __future__ import annotations

import pytest

from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(request):
    from tests.conftest import ServerProcess

    proc = ServerProcess([])  # the embedded default model
    try:
        proc.wait_status("ready", timeout=600)  # the first start converts the GGUF file (minutes on a busy CPU)
        yield proc
    finally:
        proc.stop()


def test_completions_continue_with_paris(server):
    import openai

    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = sdk.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "Paris" in out.choices[0].text


def test_responses_answer_paris(server):
    import openai

    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = sdk.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=30)
    assert "Paris" in out.output_text
    events = sdk.responses.create(model=MODEL, input=QUESTION, temperature=0, max_output_tokens=30, stream=True)
    assert "Paris" in "".join(e.delta for e in events if e.type == "response.output_text.delta")


def test_anthropic_messages_answer_paris(server):
    import anthropic

    sdk = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    # Newer anthropic SDKs have no temperature argument; the server still reads it from the body.
    out = sdk.messages.create(model=MODEL, max_tokens=30, extra_body={"temperature": 0},
                              messages=[{"role": "user", "content": QUESTION}])
    assert "Paris" in out.content[0].text and out.stop_reason == "end_turn"
    with sdk.messages.stream(model=MODEL, max_tokens=30, extra_body={"temperature": 0},
                             messages=[{"role": "user", "content": QUESTION}]) as stream:
        assert "Paris" in "".join(stream.text_stream)
