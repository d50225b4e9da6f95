"""Property-based fuzzing of the chat endpoint: odd and bad requests never get a 5xx.

CI runs a short version; the full run is `LLMCTL_FUZZ_EXAMPLES=2000 pytest tests/server/test_fuzz.py -q -s`
(see docs/reliability.md). Traffic goes only to a server on 127.0.0.1.
"""

from __future__ import annotations

import json
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("LLMCTL_FUZZ_EXAMPLES", "150"))
FIELDS = ["model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "frequency_penalty",
          "presence_penalty", "stop", "seed", "logit_bias", "n", "stream", "stream_options", "timeout", "logprobs",
          "top_logprobs", "tools", "ignore_eos", "user", "response_format", "unknown_field"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.integers(-3, 10),
    st.floats(allow_nan=True, allow_infinity=True), st.floats(-3, 3), st.text(max_size=20),
)
odd = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                   max_leaves=8)
roles = st.one_of(st.sampled_from(["system", "developer", "user", "assistant", "tool"]), odd)
content = st.one_of(
    st.text(max_size=60),
    st.lists(st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=20)}),
                       st.fixed_dictionaries({"type": st.text(max_size=10)}), odd), max_size=3),
    odd,
)
message = st.one_of(st.fixed_dictionaries({"role": roles, "content": content}), odd)
messages = st.one_of(st.lists(message, min_size=0, max_size=4), odd)
field_values = {
    "max_tokens": st.one_of(st.integers(1, 6), odd),
    "stream": st.one_of(st.booleans(), odd),
    "logit_bias": st.one_of(st.dictionaries(st.one_of(st.integers(-5, 600).map(str), st.text(max_size=4)),
                                            st.one_of(st.floats(-200, 200), odd), max_size=3), odd),
    "stop": st.one_of(st.text(max_size=4), st.lists(st.text(max_size=4), max_size=5), odd),
}
body = st.one_of(
    st.fixed_dictionaries(
        {"messages": messages, "max_tokens": field_values["max_tokens"]},
        optional={f: field_values.get(f, odd) for f in FIELDS if f != "max_tokens"},
    ),
    odd,
)


# Mostly-valid requests with one odd field: a bad value deep in generation (a seed too big for
# torch, a token id no tokenizer has) is reached only when everything else in the request is valid.
VALID = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
edge_values = st.one_of(
    odd, st.integers(2**62, 2**66), st.integers(-2**66, -2**62),
    st.sampled_from(["\u00b2", "--5", "1e3", " 7", "\u0667"]),
    st.dictionaries(st.sampled_from(["\u00b2", "--5", "0", "1", "-1", "511", "512", "9" * 30]), odd, max_size=2),
)
one_odd_field = st.builds(lambda field, value: {**VALID, field: value}, st.sampled_from(FIELDS), edge_values)


def send(client: httpx.Client, payload) -> httpx.Response:
    raw = json.dumps(payload, allow_nan=True)  # NaN and Infinity too: Python clients can send them
    return client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(payload=st.one_of(body, one_odd_field))
def test_no_request_gets_a_5xx(base_url, payload):
    with httpx.Client(base_url=base_url, timeout=60) as client:
        r = send(client, payload)
        assert r.status_code < 500, (payload, r.status_code, r.text)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code", "request_id"}
            assert "Traceback" not in error["message"]
        elif r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.rstrip().endswith("data: [DONE]")


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"[]", b"null", b"1e999", b'"messages"', b"{" * 5000])
def test_raw_bodies(client, raw):
    r = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text


def test_lone_surrogate_is_replaced_not_fatal(client):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 2}'
    response = client.post("/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"})
    assert response.status_code == 200


def test_server_answers_normally_after_fuzzing(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert r.status_code == 200


# ---- the other routes: the same promise (never a 5xx, errors in the route's own envelope) ---------------
text_or_odd = st.one_of(st.text(max_size=30), odd)
token_ids = st.lists(st.one_of(st.integers(-5, 600), odd), min_size=0, max_size=5)
anthropic_block = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": text_or_odd}),
    st.fixed_dictionaries({"type": st.just("tool_use"), "id": text_or_odd, "name": text_or_odd,
                           "input": st.one_of(st.dictionaries(st.text(max_size=5), odd, max_size=2), odd)}),
    st.fixed_dictionaries({"type": st.just("tool_result"), "tool_use_id": text_or_odd,
                           "content": st.one_of(st.text(max_size=10), odd)}),
    st.fixed_dictionaries({"type": st.text(max_size=10)}), odd)
responses_item = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": st.one_of(st.text(max_size=20), st.lists(st.one_of(
        st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text"]), "text": text_or_odd}),
        odd), max_size=2), odd)}),
    st.fixed_dictionaries({"type": st.just("function_call"), "call_id": text_or_odd, "name": text_or_odd,
                           "arguments": text_or_odd}),
    st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": text_or_odd, "output": text_or_odd}),
    st.fixed_dictionaries({"type": st.text(max_size=12)}), odd)
small_tokens = st.one_of(st.integers(1, 4), odd)
ROUTE_BODIES = {
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": st.one_of(st.text(max_size=30), st.lists(st.text(max_size=10), max_size=3), token_ids,
                             st.lists(token_ids, max_size=2), odd), "max_tokens": small_tokens},
        optional={f: odd for f in ["model", "temperature", "top_p", "stop", "seed", "logit_bias", "logprobs",
                                   "echo", "n", "best_of", "suffix", "stream", "stream_options", "timeout"]}),
    "/v1/responses": st.fixed_dictionaries(
        {"input": st.one_of(st.text(max_size=30), st.lists(responses_item, max_size=4), odd),
         "max_output_tokens": small_tokens},
        optional={f: odd for f in ["model", "instructions", "temperature", "top_p", "tools", "tool_choice", "text",
                                   "stream", "store", "previous_response_id", "metadata", "timeout"]}),
    "/v1/messages": st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.one_of(
            st.sampled_from(["user", "assistant"]), odd), "content": st.one_of(
            st.text(max_size=20), st.lists(anthropic_block, max_size=3), odd)}), max_size=3), odd),
         "max_tokens": small_tokens},
        optional={f: odd for f in ["model", "system", "temperature", "top_p", "top_k", "stop_sequences", "tools",
                                   "tool_choice", "stream", "metadata", "timeout"]}),
    "/v1/messages/count_tokens": st.fixed_dictionaries(
        {"messages": st.one_of(st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant"]),
                                                                "content": st.one_of(st.text(max_size=20), odd)}),
                                        max_size=3), odd)},
        optional={f: odd for f in ["model", "system", "tools"]}),
    "/tokenize": st.fixed_dictionaries({}, optional={"prompt": text_or_odd, "messages": messages,
                                                     "add_special_tokens": odd, "return_token_strs": odd}),
    "/detokenize": st.fixed_dictionaries({"tokens": st.one_of(token_ids, odd)}),
}
STREAM_ENDS = {"/v1/completions": "data: [DONE]", "/v1/responses": "event: response.", "/v1/messages": "event: "}


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(route_and_body=st.sampled_from(list(ROUTE_BODIES)).flatmap(
    lambda route: st.tuples(st.just(route), st.one_of(ROUTE_BODIES[route], odd))))
def test_no_request_on_the_other_routes_gets_a_5xx(base_url, route_and_body):
    route, payload = route_and_body
    raw = json.dumps(payload, allow_nan=True)
    with httpx.Client(base_url=base_url, timeout=60) as client:
        r = client.post(route, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code < 500, (route, payload, r.status_code, r.text)
    if r.status_code >= 400:
        body = r.json()
        if route.startswith("/v1/messages"):
            assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        else:
            assert set(body["error"]) == {"message", "type", "param", "code", "request_id"}
        assert "Traceback" not in r.text
    elif r.headers["content-type"].startswith("text/event-stream"):
        last = [line for line in r.text.splitlines() if line.startswith(("data: ", "event: "))][-2:]
        assert any(line.startswith(STREAM_ENDS[route]) for line in last), (route, payload, r.text[-300:])
