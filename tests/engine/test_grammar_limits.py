"""The checks before compiling a constraint, and the capped worker processes that validate what passes them."""

from __future__ import annotations

import json

import pytest

from llmctl.engine.grammar_limits import GrammarLimits, LimitExceeded, check_constraint, check_schema
from llmctl.engine.grammar_sandbox import CompileSandbox
from llmctl.engine.structured import Constraint, serialize

SELF = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}
LINKED = {"$defs": {"node": {"type": "object", "properties": {"next": {"$ref": "#/$defs/node"}},
                             "required": ["next"]}}, "$ref": "#/$defs/node"}


@pytest.mark.parametrize(("kind", "spec", "words"), [
    ("json", {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000}, "'minItems' at # is"),
    ("json", {"type": "array", "maxItems": 1_000_000_000}, "'maxItems'"),
    ("json", {"properties": {"s": {"type": "string", "minLength": 10**9}}}, "'minLength' at #/properties/s"),
    ("json", {"type": "string", "maxLength": 10**6}, "'maxLength'"),
    ("json", {"type": "string", "pattern": "^(a{1000}){1000}$"}, "multiply to 1,000,000"),
    ("json", {"enum": list(range(5000))}, "'enum' at # has 5,000"),
    ("json", {"anyOf": [{"const": i} for i in range(2000)]}, "'anyOf'"),
    ("json", SELF, "no finite JSON value"),
    ("json", LINKED, "no finite JSON value"),
    ("json", {"type": "array", "items": {"$ref": "#"}, "minItems": 1}, "no finite JSON value"),
    ("regex", "a{1000}{1000}", "multiply to 1,000,000"),
    ("regex", "(x{100}){101}", "10,100"),
    ("regex", "a" * 100_000, "100,000 bytes long; the limit for a regex is 65,536"),
    ("json", {"type": "string", "pattern": "a" * 70_000}, "the limit for a regex"),
    ("grammar", "start: %json " + json.dumps({"description": "x" * 600_000}), "the limit is 524,288"),
    ("choice", [str(i) for i in range(2_000)], "2,000 strings"),
    ("choice", [f"option{i}" for i in range(10_000)], "10,000 strings"),
    ("choice", ["x" * 1000 for i in range(600)], "602,400 bytes long"),
    ("grammar", "start: %json " + json.dumps(SELF), "no finite JSON value"),
    ("grammar", 'start: item ~ 100000\nitem: "a"', "repetition is 100,000"),
    ("grammar", "start: /a{200}{200}/", "40,000"),
])
def test_over_a_limit(kind, spec, words):
    text = spec if isinstance(spec, str) else json.dumps(spec)
    with pytest.raises(LimitExceeded) as caught:
        check_constraint(kind, text)
    assert words in str(caught.value)


@pytest.mark.parametrize(("kind", "spec"), [
    ("json", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 10_000}),
    ("json", {"type": "object", "properties": {"a": {"$ref": "#"}}}),  # recursion that may stop
    ("json", {"anyOf": [SELF, {"type": "null"}]}),
    ("json", {"$defs": {"node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"]}},
        "$ref": "#/$defs/node"}),
    ("json", {"properties": {"maxItems": {"type": "string"}}, "default": {"maxItems": 10**9}}),  # names, data
    ("json", {"properties": {"a": False}, "required": ["a"]}),  # unsatisfiable, but no cycle: llguidance says so
    ("regex", r"[a-c]{2}-\d{1,3}(\.\d{1,3}){3}\p{L}{2}[{]{4}"),
    ("choice", ["yes", "no"]),
    ("grammar", 'start: "a"{3} b\nb: /[0-9]{1,10}/'),
    ("json", "not json: llguidance reports it"),
])
def test_within_the_limits(kind, spec):
    check_constraint(kind, spec if isinstance(spec, str) else json.dumps(spec))


def test_a_large_tool_set_is_within_the_limits():
    """Agents send dozens of tools with long descriptions: a 300 KB schema is not refused."""
    properties = {f"field_{i}": {"type": "string", "description": "x" * 300, "maxLength": 100} for i in range(800)}
    check_constraint("json", json.dumps({"type": "object", "properties": properties}))


def test_depth_and_size():
    deep: dict = {"type": "string"}
    for _ in range(80):
        deep = {"type": "array", "items": deep}
    with pytest.raises(LimitExceeded, match="deeper than 64"):
        check_schema(deep)
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(200)}}
    check_schema(wide)
    with pytest.raises(LimitExceeded, match="more than 100 objects"):
        check_schema(wide, GrammarLimits(max_nodes=100))


@pytest.mark.parametrize("kind", ["json", "grammar"])
def test_json_too_deep_for_python_is_over_the_limit_too(kind):
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(LimitExceeded, match="deeper than 64"):
        check_constraint(kind, deep if kind == "json" else f"start: %json {deep}")
    check_constraint("regex", "[[]" * 10 + "]")  # a regex is never read as JSON


def test_a_long_chain_of_refs_is_over_the_limit_not_a_crash():
    defs = {f"d{i}": {"type": "object", "properties": {"x": {"$ref": f"#/$defs/d{i + 1}"}}, "required": ["x"]}
            for i in range(2_000)}
    defs["d2000"] = {"type": "integer"}
    with pytest.raises(LimitExceeded, match=r"\$ref chains"):
        check_schema({"$defs": defs, "$ref": "#/$defs/d0"})


def test_a_message_quotes_a_bounded_path_however_long_the_keys():
    deep: dict = {"type": "string"}
    for _ in range(70):
        deep = {"type": "object", "properties": {"k" * 5_000: deep}}
    with pytest.raises(LimitExceeded, match="deeper than 64") as caught:
        check_constraint("json", json.dumps(deep))
    assert len(str(caught.value)) < 300 and "#/.../" in str(caught.value)


def test_the_sandbox_survives_a_grammar_that_exhausts_its_memory():
    # Past the checks (limits raised), minItems 1e9 makes llguidance allocate gigabytes and abort the process.
    bomb = {"type": "array", "items": {"type": "integer"}, "minItems": 1_000_000_000}
    import llguidance

    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(bomb))
    box = CompileSandbox(memory_bytes=256 << 20, timeout_s=120)  # time enough on a busy machine
    try:
        with pytest.raises(LimitExceeded, match="more than the 256 MiB"):
            box.validate(grammar)
        ok = serialize(Constraint.json_schema({"type": "object"}))
        assert box.validate(ok) == ""  # a fresh worker takes over
        assert "undefined_rule" in box.validate(llguidance.LLMatcher.grammar_from_lark("start: undefined_rule"))
    finally:
        box.close()


def test_the_sandbox_gives_up_on_a_slow_validation():
    box = CompileSandbox(timeout_s=0.001)  # a new worker needs longer than this just to start
    try:
        with pytest.raises(LimitExceeded, match="longer than the 0.001 s"):
            box.validate(serialize(Constraint.json_schema({"type": "object"})))
    finally:
        box.close()
