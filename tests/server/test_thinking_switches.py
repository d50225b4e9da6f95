"""Thinking switched per request the way each client does it: what reaches the chat template from chat's
`chat_template_kwargs` / `reasoning_effort`, Responses' `reasoning.effort` and Anthropic's `thinking`, and each
API's 400 (in its own envelope, naming the field) for a switch it cannot take."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service

# Qwen3's switch (an empty thinking block when enable_thinking is false) and gpt-oss' effort line, reduced.
SWITCH_TEMPLATE = (
    "{%- if reasoning_effort %}<|im_start|>system\nReasoning: {{ reasoning_effort }}<|im_end|>\n{% endif %}"
    "{%- for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n"
    "{%- if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{%- if custom %}{{ custom }}{% endif %}{%- if count %}{{ count + 1 }}{% endif %}{%- endif %}")
MESSAGES = [{"role": "user", "content": "Two and two?"}]


@pytest.fixture(scope="module")
def switched(tiny_model):
    service = make_service(tiny_model)
    service.loaded.tokenizer.chat_template = SWITCH_TEMPLATE
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


def rendered_size(service, **variables) -> int:
    """The prompt's tokens when the template gets ``variables``, rendered here as the server should."""
    tokenizer = service.loaded.tokenizer
    text = tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False, **variables)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_switches_reach_the_template(switched):
    service, url = switched
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)

    def prompt_tokens(**extra) -> int:
        out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=1, **extra)
        return out.usage.prompt_tokens

    default = prompt_tokens()
    assert default == rendered_size(service)
    off = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert off == rendered_size(service, enable_thinking=False) > default
    # reasoning_effort is the template's own variable, and "none" switches thinking off (as vLLM maps it).
    assert prompt_tokens(reasoning_effort="low") == rendered_size(service, reasoning_effort="low", enable_thinking=True)
    assert prompt_tokens(reasoning_effort="none") == rendered_size(service, reasoning_effort="none",
                                                                   enable_thinking=False)
    # chat_template_kwargs wins over what the effort implies.
    assert prompt_tokens(reasoning_effort="none", extra_body={"chat_template_kwargs": {"enable_thinking": True}}) \
        == rendered_size(service, reasoning_effort="none", enable_thinking=True)
    assert prompt_tokens(extra_body={"chat_template_kwargs": {"custom": "one two three"}}) \
        == rendered_size(service, custom="one two three") > default


def test_responses_effort_reaches_the_template(switched):
    service, url = switched
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for effort in ("high", "none"):
        out = client.responses.create(model="tiny-llama", input=MESSAGES, max_output_tokens=1, store=False,
                                      reasoning={"effort": effort})
        assert out.usage.input_tokens == rendered_size(service, reasoning_effort=effort,
                                                       enable_thinking=effort != "none")
    out = client.responses.create(model="tiny-llama", input=MESSAGES, max_output_tokens=1, store=False,
                                  extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert out.usage.input_tokens == rendered_size(service, enable_thinking=False)


def test_anthropic_thinking_switch_reaches_the_template(switched):
    service, url = switched
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)

    def input_tokens(**extra) -> int:
        return client.messages.create(model="tiny-llama", messages=MESSAGES, max_tokens=8, **extra).usage.input_tokens

    assert input_tokens() == rendered_size(service)
    assert input_tokens(thinking={"type": "disabled"}) == rendered_size(service, reasoning_effort="none",
                                                                        enable_thinking=False)
    assert input_tokens(thinking={"type": "enabled", "budget_tokens": 4}) == rendered_size(service,
                                                                                           enable_thinking=True)


@pytest.mark.parametrize(("body", "param"), [
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
    ({"thinking_token_budget": -2}, "thinking_token_budget"),
    ({"thinking_token_budget": 1.5}, "thinking_token_budget"),
    ({"chat_template_kwargs": ["enable_thinking"]}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs.add_generation_prompt"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
])
def test_chat_refuses_a_bad_switch_naming_it(switched, body, param):
    _, url = switched
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


@pytest.mark.parametrize(("body", "param"), [
    ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
    ({"reasoning": "high"}, "reasoning"),
    ({"chat_template_kwargs": {"tools": []}}, "chat_template_kwargs.tools"),
])
def test_responses_refuses_a_bad_switch_naming_it(switched, body, param):
    _, url = switched
    r = httpx.post(url + "/v1/responses", json={"input": "hi", "max_output_tokens": 1, "store": False, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(("thinking", "max_tokens", "words"), [
    ({"type": "enabled", "budget_tokens": 8}, 8, "greater than thinking.budget_tokens"),
    ({"type": "enabled"}, 8, "thinking.budget_tokens"),
    ({"type": "enabled", "budget_tokens": 0}, 8, "thinking.budget_tokens"),
    ({"type": "enabled", "budget_tokens": "4"}, 8, "thinking.budget_tokens"),
    ({"type": "sometimes"}, 8, "thinking.type"),
    ({"budget_tokens": 4}, 8, "thinking.type"),
])
def test_anthropic_refuses_a_bad_thinking_in_its_envelope(switched, thinking, max_tokens, words):
    _, url = switched
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as caught:
        client.messages.create(model="tiny-llama", messages=MESSAGES, max_tokens=max_tokens, thinking=thinking)
    body = caught.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error", body
    assert words in body["error"]["message"], body


def test_a_template_variable_that_breaks_the_template_is_the_request_s_400(switched):
    _, url = switched
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1,
                                                       "chat_template_kwargs": {"custom": {"a": 1}}})
    assert r.status_code == 200, r.text  # a variable of any JSON type renders
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1,
                                                       "chat_template_kwargs": {"raise_exception": 1}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs.raise_exception", r.text
    r = httpx.post(url + "/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1,
                                                       "chat_template_kwargs": {"count": "one"}})  # "one" + 1
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs", r.text


def test_anthropic_token_counting_renders_the_same_switch(switched):
    service, url = switched
    client = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    counted = client.messages.count_tokens(model="tiny-llama", messages=MESSAGES, thinking={"type": "disabled"})
    assert counted.input_tokens == rendered_size(service, reasoning_effort="none", enable_thinking=False)
