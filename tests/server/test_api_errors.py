"""Every client mistake gets OpenAI's error envelope with the right status; never a 500 or a traceback."""

from __future__ import annotations

import pytest

USER = [{"role": "user", "content": "Hello"}]


def assert_error(r, status: int, *, param=None, code=None, contains: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    assert error["message"] and "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if contains:
        assert contains in error["message"]
    return error


def post(client, body=None, **kwargs):
    return client.post("/v1/chat/completions", json=body, **kwargs)


def test_invalid_json(client):
    r = client.post("/v1/chat/completions", content=b"{nope", headers={"Content-Type": "application/json"})
    assert_error(r, 400, contains="not valid JSON")


def test_empty_body(client):
    r = client.post("/v1/chat/completions", content=b"", headers={"Content-Type": "application/json"})
    assert_error(r, 400, contains="empty")


def test_body_not_an_object(client):
    assert_error(post(client, [1, 2]), 400, contains="JSON object")


def test_non_json_content_type(client):
    r = client.post("/v1/chat/completions", content=b"messages=hi",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert_error(r, 415, code="unsupported_media_type")


def test_oversized_body(client):
    big = {"messages": [{"role": "user", "content": "x" * (5 * 1024 * 1024)}]}
    assert_error(post(client, big), 413)


def test_huge_body_is_cut_off_before_it_is_buffered(client):
    """Far over the limit, the HTTP layer refuses the body itself (plain text) rather than spooling it."""
    r = client.post("/v1/chat/completions", content=b"x" * (40 * 1024 * 1024),
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    assert not r.headers["content-type"].startswith("application/json")  # waitress answered, not the app
    assert post(client, {"messages": USER, "max_tokens": 2}).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": USER, "temperature": "hot"}, "temperature"),
    ({"messages": USER, "temperature": 3}, "temperature"),
    ({"messages": USER, "top_p": -0.1}, "top_p"),
    ({"messages": USER, "max_tokens": "10"}, "max_tokens"),  # numeric strings are not numbers either
    ({"messages": USER, "temperature": "0.5"}, "temperature"),
    ({"messages": USER, "seed": "5"}, "seed"),
    ({"messages": USER, "max_tokens": 0}, "max_tokens"),
    ({"messages": USER, "max_tokens": "ten"}, "max_tokens"),
    ({"messages": USER, "presence_penalty": 9}, "presence_penalty"),
    ({"messages": USER, "stop": 5}, "stop"),
    ({"messages": USER, "timeout": 1000}, "timeout"),
    ({"messages": USER, "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"1": 500}}, "logit_bias.1"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages[0].role"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    # Booleans are not numbers, and strings are not booleans (pydantic's lax mode would take both).
    ({"messages": USER, "max_tokens": True}, "max_tokens"),
    ({"messages": USER, "max_tokens": 4.0}, "max_tokens"),  # integers are integers, as OpenAI has it
    ({"messages": USER, "n": 2.0}, "n"),
    ({"messages": USER, "temperature": True}, "temperature"),
    ({"messages": USER, "stream": "yes"}, "stream"),
    ({"messages": USER, "stream": 1}, "stream"),
    ({"messages": USER, "logit_bias": {"--5": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"\u00b2": 1}}, "logit_bias"),
    ({"messages": USER, "logit_bias": {"9" * 5000: 1}}, "logit_bias"),
    ({"messages": USER, "seed": 2**64}, "seed"),
    ({"messages": USER, "seed": -(2**63) - 1}, "seed"),
])
def test_wrong_type_or_range_names_the_param(client, body, param):
    assert_error(post(client, body), 400, param=param)


def test_seed_at_the_ends_of_its_range_works(client):
    for seed in (-(2**63), 2**64 - 1):
        r = post(client, {"messages": USER, "seed": seed, "max_tokens": 2, "temperature": 1})
        assert r.status_code == 200, r.text


@pytest.mark.parametrize(("raw", "contains"), [
    (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),  # over Python's int limit
    (b"[" * 10000 + b"]" * 10000, "nested too deeply"),
])
def test_json_python_cannot_parse_is_a_400(client, raw, contains):
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 400, contains=contains)


def test_lone_surrogate_in_model_name_is_a_clean_404(client):
    raw = b'{"model": "\\ud800", "messages": [{"role": "user", "content": "hi"}]}'
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert_error(r, 404, code="model_not_found")


def test_text_part_without_text_says_so(client):
    body = {"messages": [{"role": "user", "content": [{"type": "text"}]}]}
    error = assert_error(post(client, body), 400)
    assert error["param"] == "messages[0].content[0].text" and "not supported" not in error["message"]


def test_too_many_stop_strings_says_how_many(client):
    error = assert_error(post(client, {"messages": USER, "stop": ["x"] * 17}), 400, param="stop")
    assert "16" in error["message"]


def test_compressed_body_is_refused(client):
    import gzip
    import json

    r = client.post("/v1/chat/completions", content=gzip.compress(json.dumps({"messages": USER}).encode()),
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"})
    assert_error(r, 415, contains="gzip")


def test_missing_messages(client):
    assert_error(post(client, {"model": "x"}), 400, param="messages", contains="Missing required parameter")


def test_empty_messages(client):
    assert_error(post(client, {"messages": []}), 400, param="messages", contains="at least one")


def test_image_content_is_rejected(client):
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    assert_error(post(client, body), 400, param="messages", contains="image_url")


def test_logit_bias_outside_vocabulary(client):
    assert_error(post(client, {"messages": USER, "logit_bias": {"999999": 1}}), 400, param="logit_bias")


def test_n_more_than_the_batch_holds(client):
    assert_error(post(client, {"messages": USER, "n": 17}), 400, param="n", contains="max-num-seqs")


def test_unknown_model(client):
    assert_error(post(client, {"messages": USER, "model": "gpt-4o"}), 404, code="model_not_found",
                 contains="tiny-llama")


def test_unknown_route_and_method(client):
    assert_error(client.get("/v1/nothing"), 404, code="not_found")
    r = client.get("/v1/chat/completions")
    assert_error(r, 405)
    assert "POST" in r.headers["allow"]
    assert_error(client.delete("/health"), 405)


def test_context_length_exceeded_with_max_tokens(client):
    # The tiny model's context is 256 tokens.
    error = assert_error(post(client, {"messages": USER, "max_tokens": 250}), 400, code="context_length_exceeded",
                         param="max_tokens")
    assert "256" in error["message"] and "250 in the completion" in error["message"]


def test_context_length_exceeded_by_prompt(client):
    long = [{"role": "user", "content": "capital of France " * 200}]
    error = assert_error(post(client, {"messages": long}), 400, code="context_length_exceeded", param="messages")
    assert "256" in error["message"]


def test_omitted_max_tokens_defaults_to_what_fits(client):
    body = post(client, {"messages": USER, "ignore_eos": True, "temperature": 0}).json()
    usage = body["usage"]
    assert body["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == 256


def test_server_still_answers_after_errors(client):
    for _ in range(3):
        post(client, {"messages": "bad"})
    assert post(client, {"messages": USER, "max_tokens": 2}).status_code == 200
