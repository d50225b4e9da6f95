"""The real embedded SmolLM2 with reasoning parsers: `auto` finds no thinking markers in its template and
vocabulary (answers stay as they are); a named parser with a template that opens `<think>` in the
prompt splits the thinking from the answer, the engine closing the thinking at a budget.
"""

from __future__ import annotations

import openai
import pytest

from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"
USER = [{"role": "user", "content": "What is the capital of France?"}]
# SmolLM2's ChatML, with a generation prompt that opens the thinking as DeepSeek-R1's templates do.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
MARKUP = ("<think>", "</think>")


def test_auto_finds_no_thinking_in_smollm2(real_service):
    from llmctl.server.reasoning import resolve_reasoning

    service, url = real_service
    assert service.reasoning_format is None
    why = resolve_reasoning("auto", service.loaded.tokenizer)[1]
    assert "has thinking markers; any thinking stays in the answer" in why
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    out = sdk.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=12)
    assert out.choices[0].message.content and getattr(out.choices[0].message, "reasoning", None) is None
    assert out.usage.completion_tokens_details.reasoning_tokens == 0


def test_a_named_parser_splits_the_thinking_the_template_opens(real_service, monkeypatch):
    from llmctl.server.reasoning import PARSERS

    service, url = real_service
    monkeypatch.setattr(service.loaded.tokenizer, "chat_template", THINKING_TEMPLATE)
    monkeypatch.setattr(service, "reasoning_format", PARSERS["deepseek_r1"])  # as `--reasoning-parser` sets it
    sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    budget = {"thinking_token_budget": 3}  # SmolLM2 does not close a thinking by itself: the engine does
    out = sdk.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40, extra_body=budget)
    message = out.choices[0].message
    thought = message.reasoning  # type: ignore[attr-defined]
    assert thought and thought == message.reasoning_content  # type: ignore[attr-defined]
    assert not any(mark in thought + (message.content or "") for mark in MARKUP)
    assert message.content, (thought, out.usage)
    assert 3 <= out.usage.completion_tokens_details.reasoning_tokens < out.usage.completion_tokens
    reasoning = content = ""
    for chunk in sdk.chat.completions.create(model=MODEL, messages=USER, temperature=0, max_tokens=40,
                                             extra_body=budget, stream=True):
        delta = chunk.choices[0].delta
        reasoning += getattr(delta, "reasoning", None) or ""
        content += delta.content or ""
    # The thinking is the same tokens (the budget ends it); the answer after it may differ in the last digits
    # of a cached prompt's numbers, so only its shape is compared.
    assert reasoning == thought and content and not any(mark in content for mark in MARKUP)
    kinds, texts = zip(*anthropic_blocks(url), strict=True)
    assert kinds == ("thinking", "text") and texts[0] == thought


def anthropic_blocks(url: str) -> list[tuple[str, str]]:
    import anthropic

    sdk = anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)
    out = sdk.messages.create(model=MODEL, messages=USER, max_tokens=40, extra_body={"temperature": 0},
                              thinking={"type": "enabled", "budget_tokens": 3})
    return [(b.type, b.thinking if b.type == "thinking" else b.text) for b in out.content]
