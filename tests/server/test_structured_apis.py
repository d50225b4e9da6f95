"""Structured outputs beyond one chat choice: n > 1, the Responses API's text.format, the vllm engine's 400."""

from __future__ import annotations

import json

import jsonschema
import pytest

from llmctl.engine.sampling import SamplingParams
from llmctl.engine.structured import Constraint
from llmctl.errors import InvalidRequest

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "size": {"type": "integer", "minimum": 0,
                                                                        "maximum": 99}},
    "required": ["name", "size"], "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA, "strict": True}}


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices_each_follow_the_schema_with_their_own_grammar_state(client, stream):
    body = {"messages": [{"role": "user", "content": "A thing"}], "n": 3, "seed": 5, "temperature": 1.0,
            "max_tokens": 120, "response_format": FORMAT, "stream": stream}
    texts, finishes = ["", "", ""], [None, None, None]
    if stream:
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    texts[choice["index"]] += choice["delta"].get("content") or ""
                    finishes[choice["index"]] = choice["finish_reason"] or finishes[choice["index"]]
    else:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        for choice in r.json()["choices"]:
            texts[choice["index"]], finishes[choice["index"]] = choice["message"]["content"], choice["finish_reason"]
    assert finishes == ["stop"] * 3, (finishes, texts)
    for text in texts:  # a shared matcher would have advanced three times per step and broken these
        jsonschema.validate(json.loads(text), SCHEMA)


def test_responses_text_format_is_enforced(client):
    fmt = {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}
    body = {"input": "A thing", "max_output_tokens": 120, "temperature": 1.0, "text": {"format": fmt}}
    r = client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "completed", out
    jsonschema.validate(json.loads(out["output"][0]["content"][0]["text"]), SCHEMA)
    # Any object: a random model may still be inside one when max_output_tokens runs out.
    r = client.post("/v1/responses", json={**body, "text": {"format": {"type": "json_object"}}})
    assert r.status_code == 200, r.text
    out = r.json()
    text = out["output"][0]["content"][0]["text"]
    if out["status"] == "completed":
        assert isinstance(json.loads(text), dict)
    else:
        assert out["status"] == "incomplete" and text.startswith("{"), out


def test_the_vllm_engine_checks_a_constraint_before_queueing_it():
    # vLLM compiles constraints itself (its guidance backend); llmctl checks them first, so a bad one is
    # a 400 naming the field. The check needs no vLLM install (tests/engine_vllm runs the constraints).
    from llmctl.engine.vllm import check_supported

    check_supported(SamplingParams(max_tokens=4, constraint=Constraint.json_schema(SCHEMA, "response_format")))
    params = SamplingParams(max_tokens=4, constraint=Constraint("regex", "[a-", "structured_outputs.regex"))
    with pytest.raises(InvalidRequest, match="regex") as info:
        check_supported(params)
    assert info.value.param == "structured_outputs.regex" and info.value.status == 400


def test_responses_echo_the_requested_text_format(client):
    fmt = {"type": "json_schema", "name": "thing", "schema": SCHEMA, "strict": True}
    for text in ({"format": fmt}, {"format": {"type": "json_object"}}, None):
        body = {"input": "A thing", "max_output_tokens": 5, **({"text": text} if text else {})}
        out = client.post("/v1/responses", json=body).json()
        assert out["text"] == (text or {"format": {"type": "text"}}), out["text"]


def test_json_keys_follow_the_schema_order_not_sorted(client):
    # "reasoning" before "answer" on purpose: the order is the point (sorted, "answer" would come first).
    schema = {"type": "object", "properties": {"reasoning": {"type": "string", "maxLength": 10},
                                               "answer": {"enum": ["yes", "no"]},
                                               "confidence": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["reasoning", "answer", "confidence"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    for seed in range(3):
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Yes?"}], "seed": seed,
                                                      "max_tokens": 60, "response_format": fmt})
        assert list(json.loads(r.json()["choices"][0]["message"]["content"])) == ["reasoning", "answer", "confidence"]
    r = client.post("/v1/responses", json={"input": "Yes?", "max_output_tokens": 60, "text": {"format": {
        "type": "json_schema", "name": "verdict", "schema": schema}}})
    assert list(json.loads(r.json()["output"][0]["content"][0]["text"])) == ["reasoning", "answer", "confidence"]
