"""`logprobs` / `top_logprobs`: each token's log-probability as the model gives it, plain and streamed."""

from __future__ import annotations

import concurrent.futures

import pytest
import torch

from llmctl.engine.text import TokenText
from llmctl.server.api import chat_models
from llmctl.server.api.prompts import build_prompt
from llmctl.server.api.validation import parse_body
from tests.server.test_api import USER, chat, stream_events

ASK = dict(messages=USER, max_tokens=6, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=5)


def test_logprobs_are_the_models_own(client, tiny_service):
    body = chat(client, **ASK).json()
    chat_models.ChatCompletion.model_validate(body)
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 6 == body["usage"]["completion_tokens"]
    # The bytes of the tokens make up the answer (a random model may emit invalid UTF-8: replaced in both).
    answer = bytes(b for e in content for b in e["bytes"]).decode("utf-8", "replace")
    assert answer == body["choices"][0]["message"]["content"]
    for entry in content:
        top = entry["top_logprobs"]
        assert len(top) == 5 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert (entry["token"], entry["logprob"]) == (top[0]["token"], top[0]["logprob"])
        assert entry["logprob"] <= 0
    # The first token's alternatives are those of a forward pass over the prompt, done here by hand.
    loaded = tiny_service.loaded
    prompt = build_prompt(loaded, parse_body(chat_models.ChatCompletionRequest, ASK))
    with torch.inference_mode():
        logits = loaded.model(input_ids=torch.tensor([prompt])).logits[0, -1].float()
    values, ids = torch.log_softmax(logits, -1).topk(5)
    text = TokenText(loaded.tokenizer)
    assert [t["token"] for t in content[0]["top_logprobs"]] == [text.text_of(i) for i in ids.tolist()]
    assert [t["logprob"] for t in content[0]["top_logprobs"]] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_do_not_depend_on_sampling_settings(client):
    """They describe the model's distribution, before temperature, top_p and logit_bias."""
    greedy = chat(client, **ASK).json()["choices"][0]["logprobs"]["content"][0]
    sampled = chat(client, **{**ASK, "temperature": 1.8, "top_p": 0.5, "seed": 7,
                              "logit_bias": {"5": 50}}).json()["choices"][0]["logprobs"]["content"][0]
    assert [t["token"] for t in sampled["top_logprobs"]] == [t["token"] for t in greedy["top_logprobs"]]
    assert [t["logprob"] for t in sampled["top_logprobs"]] == pytest.approx(
        [t["logprob"] for t in greedy["top_logprobs"]], abs=1e-5)


def test_streamed_logprobs_equal_the_plain_ones(client):
    plain = chat(client, **ASK).json()["choices"][0]["logprobs"]["content"]
    events = stream_events(client, **ASK)
    streamed = [e for ev in events[:-1] if ev["choices"] and ev["choices"][0]["logprobs"]
                for e in ev["choices"][0]["logprobs"]["content"]]
    assert streamed == plain
    for event in events[:-1]:
        chat_models.ChatCompletionChunk.model_validate(event)


def test_requests_with_and_without_logprobs_side_by_side(base_url, client):
    """Each gets what it asked for when they run at the same time."""
    import httpx

    def ask(with_logprobs: bool):
        body = {**ASK, "max_tokens": 20} if with_logprobs else {**ASK, "max_tokens": 20, "logprobs": False,
                                                                 "top_logprobs": None}
        with httpx.Client(base_url=base_url, timeout=60) as c:
            return chat(c, **body).json()["choices"][0]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        choices = list(pool.map(ask, [True, False] * 3))
    for with_logprobs, choice in zip([True, False] * 3, choices, strict=False):
        if with_logprobs:
            assert len(choice["logprobs"]["content"]) == 20
        else:
            assert choice["logprobs"] is None


def test_openai_sdk_reads_logprobs(base_url):
    openai = pytest.importorskip("openai")
    sdk = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    r = sdk.chat.completions.create(model="tiny-llama", messages=USER, max_tokens=3, logprobs=True, top_logprobs=2,
                                    extra_body={"ignore_eos": True})
    entries = r.choices[0].logprobs.content
    assert len(entries) == 3 and len(entries[0].top_logprobs) == 2 and entries[0].logprob <= 0


@pytest.mark.parametrize("body, param", [
    ({"top_logprobs": 3}, "top_logprobs"),  # without logprobs: true, as OpenAI's API says
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ({"logprobs": "yes"}, "logprobs"),
])
def test_bad_logprobs_requests(client, body, param):
    r = chat(client, max_tokens=2, **body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == param


def test_token_bytes_rebuild_multibyte_text(tiny_service):
    """Tokens that split a character still carry its exact bytes (byte-level BPE)."""
    tokenizer = tiny_service.loaded.tokenizer
    text = "éàüß 你好 <|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    token_text = TokenText(tokenizer)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # decoding alone would lose them
    assert b"".join(token_text.bytes_of(i) for i in ids) == text.encode()
