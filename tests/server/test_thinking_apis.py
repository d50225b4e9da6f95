"""Thinking bounded and constrained end to end, through HTTP with the openai and anthropic SDKs: a budget of N
thinking tokens ends the thinking at exactly N, a JSON schema or an enforced tool call constrains the answer
after free thinking, and each client's switch turns thinking off (the answer is then constrained from its start).

The tiny model has `<think>` and `</think>` tokens, and a bonus on one word's logit after each real forward pass
fixes what it thinks: that word, forever, unless the engine closes the thinking (a grammar still masks it). The
templates are the `<think>` families' (DeepSeek-R1's generation prompt opens the thinking; Qwen3's closes it when
`enable_thinking` is false).
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from llmctl.server.testing import build_tiny_model, serve_in_thread
from tests.conftest import make_service

THINK_TOKENS = ("<think>", "</think>")
WORD = " fox"  # what the model thinks, one token
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "ok", "schema": SCHEMA}}
TOOL = {"name": "answer", "description": "Give the answer.", "input_schema": SCHEMA}
# DeepSeek-R1's generation prompt ends inside the thinking; Qwen3's closes it when thinking is switched off.
OPENED = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
          "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n<think>{% endif %}")
HYBRID = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
          "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
          "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
          "{%- endif %}")
MESSAGES = [{"role": "user", "content": "Is it?"}]


def thinking_model(folder, **kwargs):
    """A tiny model whose vocabulary has the `<think>` family's tokens."""
    return build_tiny_model(folder, extra_specials=THINK_TOKENS, **kwargs)


def thinking_bias(tokenizer) -> dict[str, int]:
    """A logit_bias under which the model writes WORD wherever it is free to."""
    word, = tokenizer.encode(WORD, add_special_tokens=False)
    return {str(word): 100}


def steered_service(folder, template: str, **settings):
    """A service on a thinking model that writes WORD wherever it is free to."""
    service = make_service(thinking_model(folder), **settings)
    service.loaded.tokenizer.chat_template = template
    word, = service.loaded.tokenizer.encode(WORD, add_special_tokens=False)
    model = service.engine.model
    real = model.forward

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        out.logits[:, -1, word] += 100.0
        return out

    model.forward = forward
    return service


def split(message) -> tuple[str, str]:
    """The thinking (both fields clients read) and the answer of a chat message."""
    reasoning = getattr(message, "reasoning_content", None)
    assert getattr(message, "reasoning", None) == reasoning
    return reasoning or "", message.content or ""


def steered_server(folder, template: str, parser: str):
    """A served steered model (its service and URL), shut down when the module's tests end."""
    service = steered_service(folder / "tiny-llama", template, reasoning_parser=parser)
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server whose model thinks in `<think>`, with DeepSeek-R1's parser, on the template that opens thinking."""
    yield from steered_server(tmp_path_factory.mktemp("think"), OPENED, "deepseek_r1")


def test_a_budget_ends_the_thinking_at_exactly_n_tokens_and_the_schema_holds_the_answer(served):
    service, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for budget in (1, 6):
        out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=60,
                                             response_format=RESPONSE_FORMAT,
                                             extra_body={"thinking_token_budget": budget})
        thinking, answer = split(out.choices[0].message)
        assert thinking == WORD.strip() + WORD * (budget - 1)
        assert json.loads(answer) in ({"ok": True}, {"ok": False})
        assert out.choices[0].finish_reason == "stop"


def test_without_a_budget_the_thinking_runs_to_max_tokens(served):
    service, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=12,
                                         response_format=RESPONSE_FORMAT)
    # Free thinking under a JSON schema: the grammar waits for the thinking to end, which it never does here.
    assert out.choices[0].finish_reason == "length"
    assert split(out.choices[0].message) == (WORD.strip() + WORD * 11, "")


def test_anthropic_budget_tokens_close_the_thinking_and_a_forced_tool_is_called(served):
    service, url = served
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    out = client.messages.create(model="tiny-llama", messages=MESSAGES, max_tokens=160, tools=[TOOL],
                                 tool_choice={"type": "tool", "name": "answer"},
                                 thinking={"type": "enabled", "budget_tokens": 4})
    calls = [block for block in out.content if block.type == "tool_use"]
    assert [block.thinking for block in out.content if block.type == "thinking"] == [WORD.strip() + WORD * 3]
    assert out.stop_reason == "tool_use" and len(calls) == 1, out
    assert calls[0].name == "answer" and calls[0].input in ({"ok": True}, {"ok": False})


@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    """A server whose model thinks in `<think>` with Qwen3's parser and Qwen3's switch."""
    yield from steered_server(tmp_path_factory.mktemp("hybrid"), HYBRID, "qwen3")


def test_each_client_s_switch_turns_thinking_off_and_the_answer_is_constrained_from_its_start(hybrid):
    service, url = hybrid
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for switch in ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
                   {"reasoning_effort": "none"}):
        out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=40,
                                             response_format=RESPONSE_FORMAT, **switch)
        thinking, answer = split(out.choices[0].message)
        assert thinking == "" and json.loads(answer) in ({"ok": True}, {"ok": False}), switch
    # On: the model's first token opens the thinking (free, up to the budget) or is the answer's (constrained).
    out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=60,
                                         response_format=RESPONSE_FORMAT,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": True},
                                                     "thinking_token_budget": 3})
    thinking, answer = split(out.choices[0].message)
    assert thinking in ("", WORD.strip() + WORD * 2) and json.loads(answer) in ({"ok": True}, {"ok": False})
    messages = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=160, tools=[TOOL],
        tool_choice={"type": "tool", "name": "answer"}, thinking={"type": "disabled"})
    calls = [block for block in messages.content if block.type == "tool_use"]
    assert [block.type for block in messages.content if block.type == "thinking"] == []
    assert len(calls) == 1 and calls[0].input in ({"ok": True}, {"ok": False}), messages
    responses = client.responses.create(model="tiny-llama", input=MESSAGES, max_output_tokens=40, store=False,
                                        reasoning={"effort": "none"},
                                        text={"format": {"type": "json_schema", "name": "ok", "schema": SCHEMA}})
    assert json.loads(responses.output_text) in ({"ok": True}, {"ok": False})
    assert [item.type for item in responses.output] == ["message"]


def test_legacy_completions_take_the_budget_for_a_prompt_that_opens_thinking(served):
    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.completions.create(model="tiny-llama", prompt="Is it?<think>", max_tokens=12,
                                    extra_body={"thinking_token_budget": 3})
    assert out.choices[0].text.startswith(WORD * 3 + "\n</think>\n\n"), out.choices[0].text


def test_a_streamed_budget_and_schema_come_as_reasoning_then_answer_deltas(served):
    _, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    stream = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=60, stream=True,
                                            response_format=RESPONSE_FORMAT, extra_body={"thinking_token_budget": 4})
    thinking, answer = "", ""
    for chunk in stream:
        if chunk.choices:
            delta = chunk.choices[0].delta
            thinking += getattr(delta, "reasoning_content", None) or ""
            answer += delta.content or ""
    assert thinking == WORD.strip() + WORD * 3 and json.loads(answer) in ({"ok": True}, {"ok": False})
    events = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=160, tools=[TOOL], stream=True,
        tool_choice={"type": "tool", "name": "answer"}, thinking={"type": "enabled", "budget_tokens": 2})
    deltas = [event.delta for event in events if event.type == "content_block_delta"]
    assert "".join(d.thinking for d in deltas if d.type == "thinking_delta") == WORD.strip() + WORD
    arguments = "".join(d.partial_json for d in deltas if d.type == "input_json_delta")
    assert json.loads(arguments) in ({"ok": True}, {"ok": False})
