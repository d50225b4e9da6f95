"""Tool calls on the Responses and Anthropic Messages routes (`serve --tool-call-parser hermes`).

As in test_tools.py, the tiny model is scripted (its real forward pass runs, then its logits are set
so that it writes a given answer); the engine, parser, API layers and the SDKs are the real code.
"""

from __future__ import annotations

import anthropic
import openai

from llmctl.server.api import anthropic as anthropic_api
from llmctl.server.api import responses_models

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}]
ANTHROPIC_TOOLS = [{"name": "get_weather", "input_schema": {
    "type": "object", "properties": {"city": {"type": "string"}}}}]


def test_responses_function_call_plain_and_streamed(scripted):
    url, say = scripted
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say("Checking. " + CALL)
    out = sdk.responses.create(model="tiny-llama", input="Weather in Paris?", tools=RESPONSES_TOOLS)
    assert [item.type for item in out.output] == ["message", "function_call"]
    assert out.output_text == "Checking."
    call = out.output[1]
    assert call.name == "get_weather" and call.arguments == '{"city": "Paris"}' and call.call_id.startswith("call_")
    responses_models.Response.model_validate(out.model_dump(exclude_unset=True))
    say(CALL)
    events = list(sdk.responses.create(model="tiny-llama", input="Weather?", tools=RESPONSES_TOOLS, stream=True))
    final = events[-1].response
    assert [item.type for item in final.output] == ["function_call"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == final.output[0].arguments == '{"city": "Paris"}'
    say(CALL)  # tool_choice none: the answer stays text
    out = sdk.responses.create(model="tiny-llama", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="none")
    assert out.output_text == CALL


def test_responses_agent_loop_sends_the_call_and_its_output_back(scripted):
    url, say = scripted
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    say(CALL)
    first = sdk.responses.create(model="tiny-llama", input="Weather in Paris?", tools=RESPONSES_TOOLS)
    call = first.output[0]
    say("It is 18 C in Paris.")
    second = sdk.responses.create(model="tiny-llama", tools=RESPONSES_TOOLS, input=[
        {"role": "user", "content": "Weather in Paris?"}, call.model_dump(exclude_none=True),
        {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}])
    assert second.output_text == "It is 18 C in Paris."


def test_anthropic_tool_use_plain_and_streamed(scripted):
    url, say = scripted
    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    say("Checking. " + CALL)
    out = sdk.messages.create(model="tiny-llama", max_tokens=100, messages=USER, tools=ANTHROPIC_TOOLS)
    assert out.stop_reason == "tool_use"
    assert [b.type for b in out.content] == ["text", "tool_use"] and out.content[0].text == "Checking."
    use = out.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris"} and use.id.startswith("toolu_")
    anthropic_api.AnthropicMessage.model_validate(out.model_dump(exclude_unset=True))
    say(CALL)
    with sdk.messages.stream(model="tiny-llama", max_tokens=100, messages=USER, tools=ANTHROPIC_TOOLS) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and [b.type for b in final.content] == ["tool_use"]
    assert final.content[0].input == {"city": "Paris"}
    say("It is 18 C.")
    answer = sdk.messages.create(model="tiny-llama", max_tokens=100, tools=ANTHROPIC_TOOLS, messages=[
        *USER, {"role": "assistant", "content": [b.model_dump() for b in final.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": final.content[0].id,
                                      "content": "18 C"}]}])
    assert answer.content[0].text == "It is 18 C." and answer.stop_reason == "end_turn"
