"""The request limits every API shares (llmctl/server/limits.py): --max-messages and n within
--max-num-seqs, each refused with a 400 in the API's own envelope, naming the API's field."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest

from llmctl.engine import EngineConfig
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service

USER = {"role": "user", "content": "Hello there"}
LIMIT = 3  # --max-messages
SLOTS = 2  # --max-num-seqs


@pytest.fixture(scope="module")
def url(tiny_model):
    service = make_service(tiny_model, max_messages=LIMIT,
                           engine=EngineConfig(max_num_seqs=SLOTS, max_waiting=8, kv_cache_tokens=4096))
    try:
        with serve_in_thread(service) as base:
            yield base
    finally:
        service.shutdown()


def openai_sdk(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def anthropic_sdk(url: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key="unused", max_retries=0)


def chat(url, count):
    return openai_sdk(url).chat.completions.create(model="tiny-llama", messages=[USER] * count, max_tokens=1)


def responses(url, count):
    return openai_sdk(url).responses.create(model="tiny-llama", input=[USER] * count, max_output_tokens=1)


def messages(url, count):
    return anthropic_sdk(url).messages.create(model="tiny-llama", messages=[USER] * count, max_tokens=1)


def count_tokens(url, count):
    return anthropic_sdk(url).messages.count_tokens(model="tiny-llama", messages=[USER] * count)


def tokenize(url, count):
    r = httpx.post(url + "/tokenize", json={"messages": [USER] * count})
    r.raise_for_status()
    return r.json()


@pytest.mark.parametrize(("call", "param", "unit"), [
    (chat, "messages", "messages"), (responses, "input", "input items"), (messages, "messages", "messages"),
    (count_tokens, "messages", "messages"), (tokenize, "messages", "messages"),
], ids=lambda v: getattr(v, "__name__", None))
def test_every_api_refuses_more_messages_than_the_limit(url, call, param, unit):
    assert call(url, LIMIT)  # at the limit: answered
    with pytest.raises((openai.BadRequestError, anthropic.BadRequestError, httpx.HTTPStatusError)) as caught:
        call(url, LIMIT + 1)
    response = caught.value.response
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["message"] == f"{LIMIT + 1} {unit} is more than this server's limit of {LIMIT}."
    if call in (messages, count_tokens):  # Anthropic's envelope names no field
        assert response.json()["type"] == "error" and error["type"] == "invalid_request_error"
    else:
        assert error["param"] == param


def test_n_beyond_the_batch_is_refused_on_chat_and_completions(url):
    sdk = openai_sdk(url)
    out = sdk.chat.completions.create(model="tiny-llama", messages=[USER], max_tokens=1, n=SLOTS)
    assert len(out.choices) == SLOTS
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="tiny-llama", messages=[USER], max_tokens=1, n=SLOTS + 1)
    assert caught.value.body["param"] == "n" and "--max-num-seqs" in caught.value.body["message"]
    # Legacy completions: n choices for each prompt, all of them side by side.
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model="tiny-llama", prompt=["a", "b"], max_tokens=1, n=SLOTS)
    assert caught.value.body["message"].startswith(f"n is {2 * SLOTS},")
