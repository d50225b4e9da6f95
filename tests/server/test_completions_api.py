"""POST /v1/completions (legacy text completions) against a real server on 127.0.0.1, with the openai SDK."""

from __future__ import annotations

import re

import openai
import pytest

from llmctl.server.api.completions import TextCompletion
from tests.conftest import sse_data


@pytest.fixture()
def sdk(base_url):
    return openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0)


def stream_events(client, **body) -> list:
    return sse_data(client, "/v1/completions", body)


def test_sdk_plain_completion(sdk, tiny_service):
    out = sdk.completions.create(model="tiny-llama", prompt="The capital of France is", max_tokens=5,
                                 temperature=0)
    assert out.object == "text_completion" and out.id.startswith("cmpl-")
    assert len(out.choices) == 1 and isinstance(out.choices[0].text, str)
    assert out.choices[0].finish_reason in ("stop", "length")
    prompt_ids = tiny_service.loaded.tokenizer("The capital of France is")["input_ids"]
    assert out.usage.prompt_tokens == len(prompt_ids)
    assert 1 <= out.usage.completion_tokens <= 5


def test_default_max_tokens_is_16(client):
    body = client.post("/v1/completions", json={"prompt": "Hello", "ignore_eos": True}).json()
    TextCompletion.model_validate(body)
    assert body["usage"]["completion_tokens"] == 16 and body["choices"][0]["finish_reason"] == "length"


def test_sdk_stream_matches_plain_and_ends_with_done(sdk, client):
    plain = sdk.completions.create(model="tiny-llama", prompt="Count to five:", max_tokens=10, temperature=0,
                                   extra_body={"ignore_eos": True})
    chunks = list(sdk.completions.create(model="tiny-llama", prompt="Count to five:", max_tokens=10,
                                         temperature=0, stream=True, stream_options={"include_usage": True},
                                         extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == plain.choices[0].text
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    events = stream_events(client, prompt="Count", max_tokens=3)
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        TextCompletion.model_validate(event)


def test_echo_puts_the_prompt_first(client):
    body = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3, "echo": True,
                                                "temperature": 0}).json()
    plain = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 3,
                                                 "temperature": 0}).json()
    assert body["choices"][0]["text"] == "Hello there" + plain["choices"][0]["text"]
    events = stream_events(client, prompt="Hello there", max_tokens=3, echo=True, temperature=0)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == body["choices"][0]["text"]


def test_legacy_logprobs_shape(client, tiny_service):
    body = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "logprobs": 2,
                                                "ignore_eos": True}).json()
    TextCompletion.model_validate(body)
    choice = body["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 4
    if "\ufffd" not in "".join(lp["tokens"]):  # a token holding part of a character shows as U+FFFD
        assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"][0] == 0 and lp["text_offset"][1] == len(lp["tokens"][0])
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=False):
        assert logprob <= 0 and top[token] == logprob and 1 <= len(top) <= 3
    events = stream_events(client, prompt="Hello", max_tokens=4, logprobs=1, ignore_eos=True)
    streamed = [t for e in events[:-1] for t in (e["choices"][0]["logprobs"] or {}).get("tokens", [])]
    assert len(streamed) == 4


def test_prompt_forms_and_choice_order(client):
    """A list of prompts gets n choices each, numbered prompt by prompt; token-id prompts work."""
    ids = client.post("/tokenize", json={"prompt": "Hello there"}).json()["tokens"]
    one = client.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 4, "temperature": 0}).json()
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0}).json()
    assert by_ids["choices"][0]["text"] == one["choices"][0]["text"]
    many = client.post("/v1/completions", json={"prompt": ["Hello there", "Count to five"], "n": 2,
                                                "max_tokens": 4, "temperature": 0}).json()
    assert [c["index"] for c in many["choices"]] == [0, 1, 2, 3]
    assert many["choices"][0]["text"] == many["choices"][1]["text"] == one["choices"][0]["text"]
    lists = client.post("/v1/completions", json={"prompt": [ids, ids], "max_tokens": 4, "temperature": 0}).json()
    assert [c["text"] for c in lists["choices"]] == [one["choices"][0]["text"]] * 2
    assert lists["usage"]["prompt_tokens"] == 2 * len(ids)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "suffix": "y"}, "suffix"),
    ({"prompt": "x", "best_of": 3, "n": 1}, "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [1, "a"]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({}, "prompt"),
])
def test_bad_fields_are_400_in_openai_envelope(client, body, param):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert re.split(r"[.\[]", error["param"])[0] == param


def test_sdk_raises_bad_request(sdk):
    with pytest.raises(openai.BadRequestError, match="suffix"):
        sdk.completions.create(model="tiny-llama", prompt="x", suffix="y")
