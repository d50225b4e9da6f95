"""What a request's constraint may ask of the grammar compiler, checked before anything is compiled.

A few bytes of JSON schema or regex can ask llguidance for unbounded work: ``"minItems": 1000000000``
makes it allocate more than 8 GiB (and abort the process), ``a{1000}{1000}`` or a 1 MB regex runs
its lexer out of fuel on the first token, 10,000 ``choice`` strings exceed the 2,000 items a
grammar row may hold, and a required property that refers back to its own object (``$ref: "#"``)
has no finite instance at all. These checks read only the request's text, in time linear in its
size, and turn such a constraint into a 400 naming its field. What they cannot foresee is bounded
again when compiling (`grammar_sandbox`) and while generating (llguidance's parser limits).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class GrammarLimits:
    """The bounds; docs/api.md ("Limits on constraints") lists them for users."""

    max_bytes: int = 512 * 1024  # a JSON schema, grammar or choice list, as text (tool sets can be large)
    max_regex_bytes: int = 64 * 1024  # a regex (its lexer's work grows with its size, descriptions' does not)
    max_repeat: int = 10_000  # minItems/maxItems/minLength/..., a regex's nested {m,n} counts multiplied
    max_alternatives: int = 1_000  # choice strings, enum values, anyOf/oneOf/allOf members (llguidance: 2,000 a row)
    max_depth: int = 64  # nesting of the schema's JSON
    max_nodes: int = 10_000  # objects and arrays in the schema's JSON


LIMITS = GrammarLimits()
# Keywords whose integer value becomes a repetition in the grammar.
REPEAT_KEYWORDS = ("minItems", "maxItems", "minLength", "maxLength", "minProperties", "maxProperties",
                   "minContains", "maxContains")
_ALTERNATIVES = ("enum", "anyOf", "oneOf", "allOf")
_DATA_KEYWORDS = ("const", "default", "examples", "enum", "description", "title")  # values, not schemas
_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")
_LARK_RANGE = re.compile(r"~\s*(\d+)(?:\s*\.\.\s*(\d+))?")


class LimitExceeded(ValueError):
    """A constraint asks for more than `GrammarLimits` allow; the message says what and where."""


def check_constraint(kind: str, spec: str, limits: GrammarLimits | None = None) -> None:
    """LimitExceeded when a constraint ("json", "regex", "choice" or "grammar" text) is over a limit."""
    limits = limits or LIMITS
    size = len(spec.encode())
    if size > limits.max_bytes:
        raise LimitExceeded(f"it is {size:,} bytes long; the limit is {limits.max_bytes:,}")
    if kind == "regex":
        check_regex(spec, limits)
        return
    if kind == "grammar":
        check_grammar(spec, limits)
        return
    try:
        value = json.loads(spec)
    except ValueError:
        return  # not JSON: llguidance reports the syntax error itself
    except RecursionError:
        raise LimitExceeded(f"it nests deeper than {limits.max_depth} levels") from None
    if kind == "json":
        check_schema(value, limits)
    elif kind == "choice" and isinstance(value, list):
        count = len(value)
        if count > limits.max_alternatives:
            raise LimitExceeded(f"it has {count:,} strings; the limit is {limits.max_alternatives:,}")


def check_grammar(text: str, limits: GrammarLimits | None = None) -> None:
    """A Lark or GBNF grammar: its embedded ``%json`` schemas, its counted repetitions (``{m,n}``, ``~ m..n``)."""
    limits = limits or LIMITS
    rest = []
    position = 0
    decoder = json.JSONDecoder()
    for match in re.finditer(r"%json\s*", text):
        if match.start() < position:
            continue
        try:
            schema, end = decoder.raw_decode(text, match.end())
        except ValueError:
            continue  # not JSON: llguidance reports the syntax error itself
        except RecursionError:
            raise LimitExceeded(f"a %json schema in it nests deeper than {limits.max_depth} levels") from None
        rest.append(text[position:match.start()])
        check_schema(schema, limits)
        position = end
    rest.append(text[position:])
    body = "".join(rest)
    for match in _LARK_RANGE.finditer(body):
        _check_count(max(int(match.group(1)), int(match.group(2) or 0)), "a repetition", limits)
    _check_product(_repeat_product(body), limits)


def check_regex(pattern: str, limits: GrammarLimits | None = None) -> None:
    """Its size, and its counted repetitions, which multiply when nested (``(a{100}){100}`` is 10,000 ``a``)."""
    limits = limits or LIMITS
    size = len(pattern.encode())
    if size > limits.max_regex_bytes:
        raise LimitExceeded(f"it is {size:,} bytes long; the limit for a regex is {limits.max_regex_bytes:,}")
    _check_product(_repeat_product(pattern), limits)


def _check_product(worst: int, limits: GrammarLimits) -> None:
    if worst > limits.max_repeat:
        raise LimitExceeded(f"its nested repetition counts multiply to {worst:,}; the limit is {limits.max_repeat:,}")


def _repeat_product(pattern: str) -> int:
    """The largest product of counted repetitions around any one atom of a regex (1 without any)."""
    # One frame per open group: [the best product inside it, the product of its last atom or None].
    stack: list[list] = [[1, None]]
    i, n = 0, len(pattern)
    while i < n:
        char = pattern[i]
        frame = stack[-1]
        if char == "\\":
            if pattern[i + 1:i + 2] in ("p", "P", "x", "u") and pattern[i + 2:i + 3] == "{":
                i = (pattern.find("}", i) + 1) or n  # \p{Greek}, \x{263a}: a brace that is no repetition
            else:
                i += 2
            frame[1] = 1
            continue
        if char == "[":
            i = _class_end(pattern, i)
            frame[1] = 1
            continue
        if char == "(":
            stack.append([1, None])
        elif char == ")" and len(stack) > 1:
            inner = stack.pop()[0]
            stack[-1][1] = inner
            stack[-1][0] = max(stack[-1][0], inner)
        elif char == "|":
            frame[1] = None
        elif char == "{" and (match := _REPEAT.match(pattern, i)):
            if frame[1] is not None:
                frame[1] *= max(int(match.group(1)), int(match.group(2) or 0), 1)
                frame[0] = max(frame[0], frame[1])
            i = match.end()
            continue
        elif char not in "*+?":
            frame[1] = 1
        i += 1
    while len(stack) > 1:  # unbalanced: llguidance rejects it; still report what it asked for
        inner = stack.pop()[0]
        stack[-1][0] = max(stack[-1][0], inner)
    return stack[0][0]


def _class_end(pattern: str, start: int) -> int:
    """The index after the character class opening at ``start`` (nested classes, escapes, a leading ``]``)."""
    i, depth = start + 1, 1
    if i < len(pattern) and pattern[i] == "^":
        i += 1
    if i < len(pattern) and pattern[i] == "]":
        i += 1
    while i < len(pattern) and depth:
        if pattern[i] == "\\":
            i += 1
        elif pattern[i] == "[":
            depth += 1
        elif pattern[i] == "]":
            depth -= 1
        i += 1
    return i


def check_schema(schema: Any, limits: GrammarLimits | None = None) -> None:
    """Size, depth, repetition counts, alternatives and regexes of a JSON schema, and that it has an instance
    at all when a required property refers back to an object being defined (``$ref: "#"``)."""
    limits = limits or LIMITS
    for path, node in _schemas(schema, limits):
        for key in REPEAT_KEYWORDS:
            value = node.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                _check_count(value, f"'{key}' at {_render(path)}", limits)
        for key in _ALTERNATIVES:
            value = node.get(key)
            if isinstance(value, list) and len(value) > limits.max_alternatives:
                raise LimitExceeded(f"'{key}' at {_render(path)} has {len(value):,} members; the limit is "
                                    f"{limits.max_alternatives:,}")
        patterns = [node.get("pattern")]
        if isinstance(node.get("patternProperties"), Mapping):
            patterns += list(node["patternProperties"])
        for pattern in patterns:
            if isinstance(pattern, str):
                try:
                    check_regex(pattern, limits)
                except LimitExceeded as exc:
                    raise LimitExceeded(f"the pattern at {_render(path)}: {exc}") from None
    try:
        finite = _Instances(schema).exists(schema)
    except RecursionError:  # only a chain of thousands of $refs, each to the next, gets this deep
        raise LimitExceeded("its $ref chains are longer than the server follows") from None
    if not finite:
        raise LimitExceeded("no finite JSON value matches it: a required property refers back to an object "
                            "that contains it ($ref)")


def _check_count(value: float, what: str, limits: GrammarLimits) -> None:
    if value > limits.max_repeat:
        raise LimitExceeded(f"{what} is {value:,}; the limit is {limits.max_repeat:,}")


def _schemas(schema: Any, limits: GrammarLimits) -> Iterator[tuple[tuple, Mapping]]:
    """Every object in ``schema`` that may be a schema, with its path; bounds depth and node count on the way.
    A path is (parent's path, key), made into text only for a message: keys may be long, and deep."""
    nodes = 0
    todo: list[tuple[Any, tuple, int, bool]] = [(schema, (), 0, True)]
    while todo:
        value, path, depth, is_schema = todo.pop()
        if not isinstance(value, (Mapping, list)):
            continue
        nodes += 1
        if nodes > limits.max_nodes:
            raise LimitExceeded(f"it has more than {limits.max_nodes:,} objects and arrays")
        if depth > limits.max_depth:
            raise LimitExceeded(f"it nests deeper than {limits.max_depth} levels (at {_render(path)})")
        if isinstance(value, list):
            todo.extend((v, (path, i), depth + 1, is_schema) for i, v in enumerate(value))
            continue
        if is_schema:
            yield path, value
        for key, child in value.items():
            todo.append((child, (path, key), depth + 1, is_schema and key not in _DATA_KEYWORDS))


def _render(path: tuple, limit: int = 120) -> str:
    """A JSON pointer to ``path`` of at most about ``limit`` characters (its end kept: it says where)."""
    keys = []
    while path:
        path, key = path
        keys.append(str(key)[:40])
    text = "/".join(["#", *reversed(keys)])
    return text if len(text) <= limit else "#/.../" + text[-limit:]


class _Instances:
    """Whether a schema has a finite instance, as far as required properties, minItems and local $refs say.

    The least fixpoint over the schemas reached: a schema whose every way out leads back to itself
    (a required property, an item of a non-empty array, every anyOf member) has none. Anything this
    does not model (types, bounds, not) counts as satisfiable: llguidance reports those itself.
    """

    def __init__(self, root: Any) -> None:
        self.root = root
        self.known: set[int] = set()  # ids of schemas shown to have an instance
        self.visiting: set[int] = set()

    def exists(self, schema: Any) -> bool:
        while True:
            before = len(self.known)
            self.visiting.clear()
            if self._check(schema):
                return True
            if len(self.known) == before:
                return False

    def _check(self, schema: Any) -> bool:
        if not isinstance(schema, Mapping):
            return True  # `false` has no instance either, but llguidance says so itself
        key = id(schema)
        if key in self.known:
            return True
        if key in self.visiting:
            return False  # assumed to have none until a later pass shows otherwise
        self.visiting.add(key)
        try:
            found = self._evaluate(schema)
        finally:
            self.visiting.discard(key)
        if found:
            self.known.add(key)
        return found

    def _evaluate(self, schema: Mapping) -> bool:
        ref = schema.get("$ref")
        if isinstance(ref, str) and (target := self._resolve(ref)) is not None and not self._check(target):
            return False
        if isinstance(schema.get("allOf"), list) and not all(self._check(s) for s in schema["allOf"]):
            return False
        for key in ("anyOf", "oneOf"):
            if isinstance(schema.get(key), list) and schema[key] and not any(self._check(s) for s in schema[key]):
                return False
        properties = found if isinstance(found := schema.get("properties"), Mapping) else {}
        for name in schema.get("required") or ():
            if isinstance(name, str) and name in properties and not self._check(properties[name]):
                return False
        min_items = schema.get("minItems")
        if isinstance(min_items, int) and min_items > 0:
            prefix = found if isinstance(found := schema.get("prefixItems"), list) else []
            if not all(self._check(s) for s in prefix[:min_items]):
                return False
            if len(prefix) < min_items and "items" in schema and not self._check(schema["items"]):
                return False
        return True

    def _resolve(self, ref: str) -> Any:
        """A local reference ("#", "#/$defs/x") in the root; None for anything else."""
        if not ref.startswith("#"):
            return None
        node = self.root
        for part in ref[1:].lstrip("/").split("/") if ref[1:] else []:
            part = part.replace("~1", "/").replace("~0", "~")
            if isinstance(node, Mapping) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node
