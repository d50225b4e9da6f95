"""Every API on the real embedded model (SmolLM2-135M-Instruct): they all answer that Paris is the capital."""

from __future__ import annotations

import json

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


def test_forced_tool_calls_on_responses_and_messages(server):
    """SmolLM2 forced to call a tool on both APIs: a valid call, named as asked, with a city it read."""
    import anthropic
    import jsonschema
    import openai

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    oai = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    out = oai.responses.create(model=MODEL, input="What is the weather in Paris?", temperature=0,
                               max_output_tokens=60, tool_choice={"type": "function", "name": "get_weather"},
                               extra_body={"timeout": 300},  # the first constrained request indexes the vocabulary
                               tools=[{"type": "function", "name": "get_weather", "parameters": schema}])
    (call,) = out.output
    assert out.status == "completed" and call.type == "function_call" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), schema)
    claude = anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0)
    message = claude.messages.create(model=MODEL, max_tokens=60, extra_body={"temperature": 0, "timeout": 300},
                                     messages=[{"role": "user", "content": "What is the weather in Paris?"}],
                                     tools=[{"name": "get_weather", "input_schema": schema}],
                                     tool_choice={"type": "any", "disable_parallel_tool_use": True})
    assert message.stop_reason == "tool_use" and message.content[0].name == "get_weather"
    jsonschema.validate(message.content[0].input, schema)


def test_a_stored_response_continues_by_id_as_the_whole_history_does(server):
    """Greedy SmolLM2: continuing by previous_response_id gives, token for token, what the whole history gives;
    a background response is polled to the same answer."""
    import time

    import openai

    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 20}
    first = sdk.responses.create(input=QUESTION, **settings)
    assert "Paris" in first.output_text and sdk.responses.retrieve(first.id).output_text == first.output_text
    by_id = sdk.responses.create(input="And of Italy?", previous_response_id=first.id, **settings)
    history = [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": first.output_text},
               {"role": "user", "content": "And of Italy?"}]
    full = sdk.responses.create(input=history, store=False, **settings)
    assert by_id.output_text == full.output_text and "Rome" in by_id.output_text
    assert by_id.usage.input_tokens == full.usage.input_tokens
    job = sdk.responses.create(input=history, background=True, **settings)
    deadline = time.monotonic() + 120
    while sdk.responses.retrieve(job.id).status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert sdk.responses.retrieve(job.id).output_text == full.output_text


def test_a_cut_call_and_an_agent_history_on_the_real_template(server):
    """SmolLM2's own template: a forced call that max_tokens cuts is no call, and a history of calls and
    results sent as Responses items is the prompt the chat route renders for the same messages."""
    import httpx

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
    with httpx.Client(base_url=server.url, timeout=330) as client:
        choice = client.post("/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [tool],
            "tool_choice": "required", "max_tokens": 6, "temperature": 0, "timeout": 300}).json()["choices"][0]
        assert choice["finish_reason"] == "length" and not choice["message"].get("tool_calls")
        assert "<tool_call>" not in (choice["message"]["content"] or "")
        call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                 "arguments": '{"city": "Paris"}'}}
        chat = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
        tokens = client.post("/tokenize", json={"messages": chat, "tools": [tool]}).json()["count"]
        out = client.post("/v1/responses", json={
            "model": MODEL, "max_output_tokens": 20, "temperature": 0, "store": False, "timeout": 300,
            "tools": [{"type": "function", **tool["function"]}],
            "input": [chat[0], {"type": "function_call", "call_id": "call_1", "name": "get_weather",
                                "arguments": '{"city": "Paris"}'},
                      {"type": "function_call_output", "call_id": "call_1", "output": "18 C"}]}).json()
        assert out["usage"]["input_tokens"] == tokens and out["output"][0]["type"] == "message"
