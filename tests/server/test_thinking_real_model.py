"""A thinking budget and a schema-constrained answer on the real embedded SmolLM2, through the openai SDK.

SmolLM2 is no reasoning model: a test template opens `<think>` in its generation prompt (as DeepSeek-R1's
does) and the server runs the `deepseek_r1` parser, so SmolLM2 writes free text as its thinking until the
engine closes it at the budget; the answer after it must match the schema.
"""

from __future__ import annotations

import json

import openai
import pytest

from tests.conftest import REAL_MODEL

pytestmark = [*REAL_MODEL, pytest.mark.timeout(900)]
MODEL = "SmolLM2-135M-Instruct"
OPENED = ("{%- for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n"
          "{%- endfor %}{%- if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")
SCHEMA = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
          "required": ["city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def served():
    from llmctl.core.loader import LoadOptions
    from llmctl.server.service import Service, ServiceSettings
    from llmctl.server.testing import serve_in_thread

    service = Service(ServiceSettings(load=LoadOptions(), request_timeout=300, reasoning_parser="deepseek_r1"))
    service.load()
    assert service.status == "ready", service.error
    service.loaded.tokenizer.chat_template = OPENED
    submitted = []
    submit = service.engine.submit

    def record(seq):  # the sequences, to read the tokens the engine produced
        submitted.append(seq)
        return submit(seq)

    service.engine.submit = record
    with serve_in_thread(service) as url:
        yield service, url, submitted
    service.shutdown()


def test_smollm2_thinks_exactly_the_budget_then_answers_in_the_schema(served):
    service, url, submitted = served
    tokenizer = service.loaded.tokenizer
    close = tokenizer.encode("\n</think>\n\n", add_special_tokens=False)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    budget = 4  # SmolLM2 thinks "The answer is: Paris" and ends (7 tokens): the budget must cut it
    out = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
        max_tokens=120, temperature=0, response_format={"type": "json_schema", "json_schema": {
            "name": "city", "schema": SCHEMA}}, extra_body={"thinking_token_budget": budget})
    message = out.choices[0].message
    tokens = submitted[-1].output_ids
    # The engine closed the thinking after exactly `budget` tokens, with the parser's closing text.
    assert tokens[budget:budget + len(close)] == close and "</think>" not in tokenizer.decode(tokens[:budget])
    assert message.reasoning_content == tokenizer.decode(tokens[:budget]).strip()
    answer = json.loads(message.content)
    assert set(answer) == {"city"} and out.choices[0].finish_reason == "stop"
