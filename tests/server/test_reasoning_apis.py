"""Every reasoning parser end to end: the thinking a model writes comes back apart from the answer on all three
APIs, plain and streamed, through the openai and anthropic SDKs and LangChain; earlier thinking a client sends
back reaches the chat template.

The tiny model is scripted (its real forward pass runs, then its logits are set so that it writes a
family's output, see conftest.scripted_server) and carries the family's test chat template
(tests/server/templates/reasoning/), so `--reasoning-parser auto` finds the family from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from llmctl.server.testing import build_tiny_model
from tests.conftest import scripted_server

TEMPLATES = Path(__file__).parent / "templates" / "reasoning"
THOUGHT, ANSWER = "The user greets me.", "Hello there!"
# What each family's model writes after its template's generation prompt.
OUTPUTS = {
    "qwen3": f"<think>\n{THOUGHT}\n</think>\n\n{ANSWER}",
    "deepseek_r1": f"{THOUGHT}\n</think>\n\n{ANSWER}",  # the prompt opened <think>
    "openai_gptoss": f"<|channel|>analysis<|message|>{THOUGHT}<|end|><|start|>assistant<|channel|>final"
                     f"<|message|>{ANSWER}<|return|>",
}
MARKUP = ("<think>", "</think>", "<|channel|>", "<|message|>", "<|end|>")
USER = [{"role": "user", "content": "Hi"}]


def with_template(folder: Path, template: str) -> Path:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module", params=sorted(OUTPUTS))
def family(request, tmp_path_factory):
    name = request.param
    model = build_tiny_model(tmp_path_factory.mktemp(name) / "tiny-llama", context=512)
    with_template(model, (TEMPLATES / f"{name}.jinja").read_text())
    store = f"sqlite:///{tmp_path_factory.mktemp(name + '-store')}/responses.db"
    tool_format = "openai" if name == "openai_gptoss" else "hermes"
    # --reasoning-parser auto: the template tells the family.
    with scripted_server(model, store, tool_call_parser=tool_format) as (url, say):
        yield name, url, say


def plain(text: str | None) -> str:
    assert not any(mark in (text or "") for mark in MARKUP), text
    return text or ""


def test_chat_reasoning_plain_and_streamed(family):
    name, url, say = family
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(OUTPUTS[name])
    out = sdk.chat.completions.create(model="tiny-llama", messages=USER)
    message = out.choices[0].message
    assert plain(message.content) == ANSWER
    assert message.reasoning == message.reasoning_content == THOUGHT  # type: ignore[attr-defined]
    assert out.usage.completion_tokens_details.reasoning_tokens > 0
    assert out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens
    say(OUTPUTS[name])
    content = reasoning = reasoning_content = ""
    usage = None
    for chunk in sdk.chat.completions.create(model="tiny-llama", messages=USER, stream=True,
                                             stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += plain(delta.content)
        reasoning += getattr(delta, "reasoning", None) or ""
        reasoning_content += getattr(delta, "reasoning_content", None) or ""
    assert (content, reasoning, reasoning_content) == (ANSWER, THOUGHT, THOUGHT)
    assert usage.completion_tokens_details.reasoning_tokens == out.usage.completion_tokens_details.reasoning_tokens


def test_responses_reasoning_item_plain_and_streamed(family):
    name, url, say = family
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(OUTPUTS[name])
    out = sdk.responses.create(model="tiny-llama", input="Hi")
    assert [item.type for item in out.output] == ["reasoning", "message"]
    assert out.output[0].content[0].text == THOUGHT and out.output[0].summary == []
    assert plain(out.output_text) == ANSWER
    assert out.usage.output_tokens_details.reasoning_tokens > 0
    say(OUTPUTS[name])
    events = list(sdk.responses.create(model="tiny-llama", input="Hi", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    (done,) = [e for e in events if e.type == "response.reasoning_text.done"]
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert (deltas, done.text, plain(text)) == (THOUGHT, THOUGHT, ANSWER)
    assert [i.type for i in final.output] == ["reasoning", "message"] and final.output_text == ANSWER
    added = [e.output_index for e in events if e.type == "response.output_item.added"]
    assert added == [0, 1] and final.output[0].content[0].text == THOUGHT
    # The stored response keeps its reasoning item.
    assert [i.type for i in sdk.responses.retrieve(final.id).output] == ["reasoning", "message"]
    say(OUTPUTS[name])
    with sdk.responses.stream(model="tiny-llama", input="Hi") as stream:  # the SDK's own accumulating helper
        helped = stream.get_final_response()
    assert [i.type for i in helped.output] == ["reasoning", "message"] and helped.output_text == ANSWER


def test_anthropic_thinking_block_plain_and_streamed(family):
    name, url, say = family
    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    say(OUTPUTS[name])
    out = sdk.messages.create(model="tiny-llama", max_tokens=200, messages=USER)
    assert [b.type for b in out.content] == ["thinking", "text"]
    assert out.content[0].thinking == THOUGHT and out.content[0].signature
    assert plain(out.content[1].text) == ANSWER
    say(OUTPUTS[name])
    with sdk.messages.stream(model="tiny-llama", max_tokens=200, messages=USER) as stream:
        events = list(stream)
        final = stream.get_final_message()
    thinking = "".join(e.delta.thinking for e in events
                       if e.type == "content_block_delta" and e.delta.type == "thinking_delta")
    assert thinking == THOUGHT
    assert [b.type for b in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THOUGHT and final.content[0].signature == out.content[0].signature
    assert plain(final.content[1].text) == ANSWER


def test_langchain_sees_the_thinking_apart(family):
    from langchain_anthropic import ChatAnthropic
    from langchain_openai import ChatOpenAI

    name, url, say = family
    chat = ChatOpenAI(model="tiny-llama", base_url=url + "/v1", api_key="unused", use_responses_api=True,
                      max_retries=0)
    say(OUTPUTS[name])
    reply = chat.invoke("Hi")
    assert reply.text == ANSWER
    assert [b["type"] for b in reply.content_blocks] == ["reasoning", "text"]
    # Our reasoning item carries the raw thinking in `content` (summary stays empty, as vLLM's): LangChain
    # keeps it in the block's extras.
    assert reply.content_blocks[0]["extras"]["content"] == [{"type": "reasoning_text", "text": THOUGHT}]
    say(OUTPUTS[name])
    streamed = None
    for chunk in chat.stream("Hi"):
        streamed = chunk if streamed is None else streamed + chunk
    assert streamed.text == ANSWER and "reasoning" in [b["type"] for b in streamed.content_blocks]
    claude = ChatAnthropic(model="tiny-llama", base_url=url, api_key="unused", max_tokens=200, max_retries=0)
    say(OUTPUTS[name])
    reply = claude.invoke("Hi")
    assert [b["type"] for b in reply.content_blocks] == ["reasoning", "text"]
    assert reply.content_blocks[0]["reasoning"] == THOUGHT and reply.text == ANSWER
    say(OUTPUTS[name])
    streamed = None
    for chunk in claude.stream("Hi"):
        streamed = chunk if streamed is None else streamed + chunk
    # Streamed text comes as plain strings, which LangChain joins outside content_blocks.
    assert streamed.content_blocks[0]["type"] == "reasoning" and streamed.content_blocks[0]["reasoning"] == THOUGHT
    assert streamed.text == ANSWER


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}]
CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
# Thinking that mentions a call, then the call: only the answer's call is a call.
CALLS = {
    "qwen3": f"<think>\nMaybe <tool_call>{{\"name\": \"get_time\", \"arguments\": {{}}}}</tool_call>? No.\n</think>\n\n"
             f"<tool_call>\n{CALL}\n</tool_call>",
    "deepseek_r1": f"Maybe <tool_call>{{\"name\": \"get_time\", \"arguments\": {{}}}}</tool_call>? No.\n</think>\n\n"
                   f"<tool_call>\n{CALL}\n</tool_call>",
    "openai_gptoss": "<|channel|>analysis<|message|>Maybe get_time? No.<|end|>"
                     "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
                     '<|message|>{"city": "Paris"}<|call|>',
}


def test_tool_calls_come_from_the_answer_not_the_thinking(family):
    name, url, say = family
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(CALLS[name])
    out = sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS)
    message = out.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    assert "get_time" in message.reasoning and not message.content  # type: ignore[attr-defined]
    assert out.choices[0].finish_reason == "tool_calls"
    say(CALLS[name])
    reasoning, calls = "", []
    for chunk in sdk.chat.completions.create(model="tiny-llama", messages=USER, tools=TOOLS, stream=True):
        delta = chunk.choices[0].delta
        assert not delta.content
        reasoning += getattr(delta, "reasoning", None) or ""
        calls += [c.function.name for c in delta.tool_calls or []]
    assert reasoning == message.reasoning and calls == ["get_weather"]  # type: ignore[attr-defined]
    say(CALLS[name])
    response = sdk.responses.create(model="tiny-llama", input="Hi",
                                    tools=[{"type": "function", **TOOLS[0]["function"]}])
    assert [i.type for i in response.output] == ["reasoning", "function_call"]
    say(CALLS[name])
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    reply = claude.messages.create(model="tiny-llama", max_tokens=300, messages=USER, tools=[
        {"name": "get_weather", "input_schema": TOOLS[0]["function"]["parameters"]}])
    assert [b.type for b in reply.content] == ["thinking", "tool_use"] and reply.stop_reason == "tool_use"


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "x", "reasoning": 5},
                                           *USER]}, "messages[0].reasoning"),
    ("/v1/responses", {"input": [{"type": "reasoning", "content": [{"type": "reasoning_text", "text": 5}]},
                                 *USER]}, "input[0].content[0].text"),
    ("/v1/messages", {"max_tokens": 5, "messages": [*USER, {"role": "assistant", "content": [
        {"type": "thinking", "signature": "x"}]}]}, None),
])
def test_malformed_thinking_sent_back_is_a_400_naming_it(family, path, body, param):
    _, url, _ = family
    reply = httpx.post(url + path, json=body, timeout=60)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    if param is None:  # Anthropic's envelope names no field; its message does
        assert error["type"] == "invalid_request_error" and "thinking" in error["message"]
    else:
        assert error["param"] == param


def rendered(url: str, messages: list[dict]) -> str:
    with httpx.Client(base_url=url, timeout=60) as http:
        tokens = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
        return http.post("/detokenize", json={"tokens": tokens}).json()["prompt"]


def test_earlier_thinking_reaches_the_template_from_every_api(family):
    """The chat template gets a turn's earlier thinking as `reasoning_content` (and gpt-oss' `thinking`): chat's
    two fields, a Responses reasoning item, an Anthropic thinking block; none of them is refused."""
    name, url, say = family
    earlier = "Earlier I weighed two greetings."
    history = [*USER, {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "Again"}]
    for field in ("reasoning", "reasoning_content"):
        messages = [dict(m) for m in history]
        messages[1][field] = earlier
        shows = earlier in rendered(url, messages)
        assert shows == (name != "deepseek_r1")  # DeepSeek-R1's template leaves history's thinking out
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(OUTPUTS[name])
    bare = sdk.chat.completions.create(model="tiny-llama", messages=history).usage.prompt_tokens
    items = [{"type": "reasoning", "id": "rs_1", "summary": [],
              "content": [{"type": "reasoning_text", "text": earlier}]}]
    for with_thinking in (False, True):
        say(OUTPUTS[name])
        out = sdk.responses.create(model="tiny-llama", input=[
            history[0], *(items if with_thinking else []), history[1], history[2]])
        assert out.status == "completed"
        if with_thinking:
            assert (out.usage.input_tokens > bare) == (name != "deepseek_r1")
        else:
            bare_responses = out.usage.input_tokens
    claude = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    blocks = [{"type": "thinking", "thinking": earlier, "signature": "abc"},
              {"type": "redacted_thinking", "data": "c2VjcmV0"}, {"type": "text", "text": "Hi!"}]
    counted = claude.messages.count_tokens(model="tiny-llama", messages=[
        history[0], {"role": "assistant", "content": blocks}, history[2]]).input_tokens
    plain_count = claude.messages.count_tokens(model="tiny-llama", messages=history).input_tokens
    assert (counted > plain_count) == (name != "deepseek_r1") and bare_responses > 0


def test_a_response_continued_by_id_keeps_its_thinking_for_the_template(family):
    name, url, say = family
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(OUTPUTS[name])
    first = sdk.responses.create(model="tiny-llama", input="Hi")
    say(OUTPUTS[name])
    follow = sdk.responses.create(model="tiny-llama", input="Again", previous_response_id=first.id)
    say(OUTPUTS[name])
    replayed = sdk.responses.create(model="tiny-llama", input=[
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": ANSWER},
        {"role": "user", "content": "Again"}])
    # The thinking of the first answer is read again (not for DeepSeek-R1, whose template leaves it out).
    assert (follow.usage.input_tokens > replayed.usage.input_tokens) == (name != "deepseek_r1")
    assert json.loads(first.model_dump_json())["output"][0]["type"] == "reasoning"
    conversation = sdk.conversations.create()
    say(OUTPUTS[name])
    sdk.responses.create(model="tiny-llama", input="Hi", conversation=conversation.id)
    items = sdk.conversations.items.list(conversation.id, order="asc").data
    assert [i.type for i in items] == ["message", "reasoning", "message"]
    assert items[1].content[0].text == THOUGHT
