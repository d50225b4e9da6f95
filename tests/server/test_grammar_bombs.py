"""Constraints that ask the grammar compiler for too much, and what the server does with them, on a real server:
a 400 naming the field before any generation (or a clean error in the request's own answer), /health not held
up meanwhile, and the server still serving afterwards."""

from __future__ import annotations

import concurrent.futures
import json
import logging

import httpx
import pytest

from llmctl.engine import grammar_limits, grammar_sandbox
from llmctl.engine.grammar_limits import GrammarLimits
from llmctl.engine.grammar_sandbox import CompileSandbox
from tests.conftest import while_health_answers

USER = [{"role": "user", "content": "Hello there"}]
MIN_ITEMS = {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000}
SELF_REF = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
CHOICES = [f"option{i}" for i in range(10_000)]


def _tool(parameters: dict) -> list[dict]:
    return [{"type": "function", "function": {"name": "f", "parameters": parameters}}]


# (route, body fields, the field a 400 names)
BOMBS = [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": MIN_ITEMS}}}, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": {**MIN_ITEMS, "minItems": 0, "maxItems": 1_000_000_000}}}},
     "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"structured_outputs": {"json": {"type": "string", "minLength": 10**9}}},
     "structured_outputs.json"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a{1000}{1000}"}}, "structured_outputs.regex"),
    ("/v1/chat/completions", {"structured_outputs": {"regex": "a" * 1_000_000}}, "structured_outputs.regex"),
    ("/v1/chat/completions", {"structured_outputs": {"choice": CHOICES}}, "structured_outputs.choice"),
    ("/v1/chat/completions", {"structured_outputs": {"json": SELF_REF}}, "structured_outputs.json"),
    ("/v1/chat/completions", {"structured_outputs": {"grammar": "start: %json " + json.dumps(MIN_ITEMS)}},
     "structured_outputs.grammar"),
    ("/v1/chat/completions", {"tools": _tool(SELF_REF), "tool_choice": "required"}, "tools[0].function.parameters"),
    ("/v1/chat/completions", {"tools": _tool({"type": "object", "properties": {"x": MIN_ITEMS}}),
                              "tool_choice": {"type": "function", "function": {"name": "f"}}},
     "tools[0].function.parameters"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "a", "schema": MIN_ITEMS}}},
     "text.format.schema"),
    ("/v1/responses", {"text": {"format": {"type": "json_schema", "name": "a", "schema": SELF_REF}}},
     "text.format.schema"),
]


def _body(route: str, fields: dict, max_tokens: int = 20) -> dict:
    if route == "/v1/responses":
        return {"input": "Hello there", "max_output_tokens": max_tokens, **fields}
    return {"messages": USER, "max_tokens": max_tokens, **fields}


@pytest.mark.parametrize(("route", "fields", "param"), BOMBS)
def test_a_constraint_over_the_limits_is_a_400_before_generation(base_url, tiny_service, route, fields, param):
    before = tiny_service.engine.stats.tokens_generated
    r = while_health_answers(base_url, lambda: httpx.post(base_url + route, json=_body(route, fields), timeout=60))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert "limits" in error["message"] and len(error["message"]) < 1000, error["message"]
    assert tiny_service.engine.stats.tokens_generated == before  # refused before any generation
    ok = httpx.post(base_url + "/v1/chat/completions", json=_body("/v1/chat/completions", {}, 4), timeout=60)
    assert ok.status_code == 200


@pytest.mark.parametrize(("route", "fields", "param"), [
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": SELF_REF}], "tool_choice": {"type": "any"}},
     "tools[0].input_schema"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {"type": "object", "properties": {"x": MIN_ITEMS}}}],
                      "tool_choice": {"type": "tool", "name": "f"}}, "tools[0].input_schema"),
    ("/v1/responses", {"tools": [{"type": "function", "name": "f", "parameters": SELF_REF}],
                       "tool_choice": "required"}, "tools[0].parameters"),
])
def test_enforced_tools_on_the_other_apis_get_the_same_400(base_url, tiny_service, route, fields, param):
    body = {"messages": USER, "max_tokens": 20} if route == "/v1/messages" else _body(route, {})
    before = tiny_service.engine.stats.tokens_generated
    r = while_health_answers(base_url, lambda: httpx.post(base_url + route, json={**body, **fields}, timeout=60))
    assert r.status_code == 400, r.text
    if route == "/v1/messages":  # Anthropic's envelope has no param: the message names the field
        assert r.json()["type"] == "error" and f"'{param}'" in r.json()["error"]["message"], r.text
    else:
        assert r.json()["error"]["param"] == param, r.text
    assert tiny_service.engine.stats.tokens_generated == before


def test_legacy_completions_take_no_constraint_and_are_not_hurt_by_one(base_url):
    fields = {"structured_outputs": {"json": MIN_ITEMS}, "response_format": {"type": "json_schema", "json_schema": {
        "name": "a", "schema": MIN_ITEMS}}}
    r = while_health_answers(base_url, lambda: httpx.post(base_url + "/v1/completions", json={
        "prompt": "Hello", "max_tokens": 4, **fields}, timeout=60))
    assert r.status_code == 200, r.text


@pytest.fixture()
def no_limits(monkeypatch):
    """The checks before compiling turned off, as if a bomb slipped past them."""
    monkeypatch.setattr(grammar_limits, "LIMITS", GrammarLimits(max_bytes=10**8, max_repeat=10**12,
                                                                max_alternatives=10**9))


def test_what_slips_past_the_checks_is_a_400_from_the_capped_compiler(base_url, tiny_service, no_limits,
                                                                      monkeypatch):
    # A smaller cap than the server's 1 GiB, and more time: the compiler reaches the cap first on a busy machine.
    box = CompileSandbox(memory_bytes=256 << 20, timeout_s=120)
    monkeypatch.setattr(grammar_sandbox, "_sandbox", box)
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": MIN_ITEMS}}}
    route = "/v1/chat/completions"
    r = while_health_answers(base_url, lambda: httpx.post(base_url + route, json=_body(route, fields), timeout=60))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema" and error["code"] == "grammar_too_large"
    assert "256 MiB of memory" in error["message"], error["message"]  # the worker aborted, not the server
    assert httpx.get(base_url + "/health", timeout=5).json()["status"] == "ready"
    box.close()


def test_a_grammar_that_fails_while_generating_ends_only_its_request(base_url, tiny_service, no_limits, caplog):
    """10,000 choices compile, then exceed the 2,000 items llguidance's parser allows a row at the first token."""
    route, fields = "/v1/chat/completions", {"structured_outputs": {"choice": CHOICES}}
    caplog.set_level(logging.WARNING, logger="llmctl.engine.structured")
    r = while_health_answers(base_url, lambda: httpx.post(base_url + route, json=_body(route, fields), timeout=60))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "structured_outputs.choice" and error["code"] == "grammar_failed", error
    assert "failed during generation" in error["message"] and len(error["message"]) < 1000

    lines = []
    with httpx.Client(base_url=base_url, timeout=60) as client, \
            client.stream("POST", route, json={**_body(route, fields), "stream": True}) as streamed:
        assert streamed.status_code == 200
        lines = [line for line in streamed.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][len("data: "):])["error"]["code"] == "grammar_failed"
    logged = [rec.getMessage() for rec in caplog.records if "failed during generation" in rec.getMessage()]
    assert logged and all(len(message) < 1000 for message in logged)  # an excerpt, never the grammar
    assert httpx.post(base_url + route, json=_body(route, {}, 4), timeout=60).status_code == 200


def test_concurrent_bombs_leave_the_server_serving(base_url):
    """A handful of bombs at once beside a normal request: all refused, the normal one answered."""
    route = "/v1/chat/completions"
    bodies = [_body(r, f) for r, f, _ in BOMBS if r == route]

    def send(body):
        return httpx.post(base_url + route, json=body, timeout=60).status_code

    def burst():
        with concurrent.futures.ThreadPoolExecutor(len(bodies) + 1) as pool:
            return list(pool.map(send, [*bodies, _body(route, {}, 4)]))

    statuses = while_health_answers(base_url, burst)
    assert statuses == [400] * len(bodies) + [200]


def test_a_matcher_that_fails_computing_its_mask_is_an_error_not_an_empty_answer(base_url, monkeypatch):
    """llguidance's per-token lexer fuel (ParserLimits.step_lexer_fuel) cut to 1: the first mask fails and
    allows only end of sequence, which must not pass for a complete answer."""
    import llguidance

    from llmctl.engine import structured

    monkeypatch.setattr(structured, "parser_limits",
                        lambda: llguidance.LLParserLimits(step_lexer_fuel=1, verbose_errors=False))
    route, fields = "/v1/chat/completions", {"structured_outputs": {"regex": "[a-z]+x{3}q-fuel-test"}}
    r = while_health_answers(base_url, lambda: httpx.post(base_url + route, json=_body(route, fields), timeout=60))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "grammar_failed" and error["param"] == "structured_outputs.regex", error
    assert "lexer" in error["message"]
