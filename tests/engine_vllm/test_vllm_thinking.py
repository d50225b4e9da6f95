"""Thinking on vLLM's engine (its CPU build, for real): the server's reasoning parser is built into vLLM, so its
structured outputs start after the thinking, and its `thinking_token_budget` closes the thinking at N tokens.

The model is steered with `logit_bias` (vLLM applies it): it writes one word wherever it is free to, so it thinks
forever unless the budget ends the thinking, and the grammar alone decides the answer.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest

from llmctl.engine import EngineConfig
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service
from tests.server.test_thinking_apis import (
    HYBRID,
    MESSAGES,
    OPENED,
    RESPONSE_FORMAT,
    TOOL,
    WORD,
    split,
    thinking_bias,
    thinking_model,
)

pytestmark = pytest.mark.vllm


def vllm_serving(folder, parser: str, template: str):
    model = thinking_model(folder, hidden=256, context=1024)
    service = make_service(model, engine=EngineConfig(max_num_seqs=4, max_waiting=4, kv_cache_tokens=8192),
                           engine_options=VllmOptions(enforce_eager=True), reasoning_parser=parser)
    service.loaded.tokenizer.chat_template = template
    return service


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    service = vllm_serving(tmp_path_factory.mktemp("think-vllm") / "tiny-llama", "deepseek_r1", OPENED)
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


def test_vllm_closes_the_thinking_at_the_budget_and_the_schema_holds_the_answer(served):
    service, url = served
    assert service.engine.budgets
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    bias = thinking_bias(service.loaded.tokenizer)
    for budget in (1, 5):
        out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=60, logit_bias=bias,
                                             temperature=0.0, response_format=RESPONSE_FORMAT,
                                             extra_body={"thinking_token_budget": budget})
        thinking, answer = split(out.choices[0].message)
        assert thinking == WORD.strip() + WORD * (budget - 1)
        assert json.loads(answer) in ({"ok": True}, {"ok": False})


def test_vllm_holds_the_grammar_while_the_model_thinks(served):
    service, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = client.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=8, temperature=0.0,
                                         logit_bias=thinking_bias(service.loaded.tokenizer),
                                         response_format=RESPONSE_FORMAT)
    assert out.choices[0].finish_reason == "length"
    assert split(out.choices[0].message) == (WORD.strip() + WORD * 7, "")


def test_vllm_anthropic_budget_then_a_forced_tool_call(served):
    _, url = served
    out = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0).messages.create(
        model="tiny-llama", messages=MESSAGES, max_tokens=160, tools=[TOOL],
        tool_choice={"type": "tool", "name": "answer"}, thinking={"type": "enabled", "budget_tokens": 3},
        extra_body={"temperature": 0.0})
    calls = [block for block in out.content if block.type == "tool_use"]
    assert len(calls) == 1 and calls[0].input in ({"ok": True}, {"ok": False}), out


def test_vllm_constrains_from_the_start_when_the_switch_turns_thinking_off(tmp_path_factory):
    service = vllm_serving(tmp_path_factory.mktemp("hybrid-vllm") / "tiny-llama", "qwen3", HYBRID)
    try:
        with serve_in_thread(service) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
            for switch in ({"extra_body": {"chat_template_kwargs": {"enable_thinking": False}}},
                           {"reasoning_effort": "none"}):
                out = client.chat.completions.create(
                    model="tiny-llama", messages=MESSAGES, max_tokens=40, temperature=0.0,
                    logit_bias=thinking_bias(service.loaded.tokenizer), response_format=RESPONSE_FORMAT, **switch)
                thinking, answer = split(out.choices[0].message)
                assert thinking == "" and json.loads(answer) in ({"ok": True}, {"ok": False}), switch
    finally:
        service.shutdown()
