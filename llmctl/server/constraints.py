"""What a request's output must match: `response_format`, vLLM's `structured_outputs`, enforced tool calls.

Every API route turns its request fields into one engine `Constraint` (or none) here, so the
rules are the same everywhere: a malformed or unsupported constraint is a 400 naming the field,
never unconstrained text in its place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast

from llmctl.engine.structured import Constraint, ConstraintKind
from llmctl.errors import InvalidRequest
from llmctl.server.tools import Function, HermesParser, ToolParser

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")
ANY_OBJECT: dict = {"type": "object"}
# Keywords whose values are one schema, a list of schemas, or a name -> schema map.
_ONE_SCHEMA = ("items", "additionalItems", "contains", "not", "if", "then", "else", "propertyNames",
               "additionalProperties", "unevaluatedItems")
_SCHEMA_LISTS = ("anyOf", "oneOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any) -> Any:
    """``schema`` with every object that lists its ``properties`` closed to other keys.

    JSON Schema allows unlisted keys unless ``additionalProperties`` says otherwise, and a small
    model given that freedom invents keys until max_tokens (seen with SmolLM2). Like vLLM's default
    grammar backend (xgrammar) and outlines, an object that names its properties and says nothing
    about others gets ``additionalProperties: false``. A schema that sets ``additionalProperties``,
    ``patternProperties`` or ``unevaluatedProperties`` keeps its choice; an object that lists no
    properties stays open, and so do the members of ``allOf`` (closing each would reject the union).
    """
    if not isinstance(schema, Mapping):
        return schema
    out = dict(schema)
    for key in _ONE_SCHEMA:
        if key in out:
            out[key] = closed_objects(out[key])
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [closed_objects(s) for s in out[key]]
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), Mapping):
            out[key] = {name: closed_objects(s) for name, s in out[key].items()}
    if isinstance(out.get("properties"), Mapping) and not any(
            k in out for k in ("additionalProperties", "patternProperties", "unevaluatedProperties")):
        out["additionalProperties"] = False
    return out


def output_constraint(from_format: Constraint | None, tools: ToolUse, parser: type[ToolParser] | None,
                      specials: frozenset[str] = frozenset()) -> Constraint | None:
    """A request's constraint. An enforced tool call comes first (the answer is the call); then the
    requested format (response_format, structured_outputs, text.format); then calls to strict tools
    under tool_choice "auto". ``specials``: the text of the vocabulary's special tokens (`tool_constraint`)."""
    from_tools = tool_constraint(tools, parser, specials)
    if tools.forced or from_format is None:
        return from_tools or from_format
    return from_format


def constraint_from_request(response_format: Any = None, structured_outputs: Any = None, *,
                            format_param: str = "response_format") -> Constraint | None:
    """The constraint of `response_format` (OpenAI) or `structured_outputs` (vLLM's extension); one at most."""
    from_format = _response_format(response_format, format_param)
    from_extension = _structured_outputs(structured_outputs)
    if from_format is not None and from_extension is not None:
        raise InvalidRequest(f"Give either '{format_param}' or 'structured_outputs', not both.",
                             param="structured_outputs")
    return from_format or from_extension


def _response_format(value: Any, param: str) -> Constraint | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest(f"'{param}' must be an object such as {{\"type\": \"json_object\"}}.", param=param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint.json_schema(ANY_OBJECT, param)
    if kind == "json_schema":
        spec = value.get("json_schema")
        # The Responses API puts name/schema/strict next to "type"; Chat Completions nests them.
        flat = spec is None and "schema" in value
        spec = value if flat else spec
        where = param if flat else f"{param}.json_schema"
        if not isinstance(spec, Mapping):
            raise InvalidRequest(f"'{param}.json_schema' must be an object with a 'name' and a 'schema'.",
                                 param=f"{param}.json_schema")
        schema = spec.get("schema", ANY_OBJECT)
        if not isinstance(schema, (Mapping, bool)):
            raise InvalidRequest(f"'{where}.schema' must be a JSON schema object.", param=f"{where}.schema")
        return Constraint.json_schema(closed_objects(schema), f"{where}.schema")
    raise InvalidRequest(f"Invalid value for '{param}.type': {kind!r}; expected 'text', 'json_object' or "
                         "'json_schema'.", param=f"{param}.type")


def _structured_outputs(value: Any) -> Constraint | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise InvalidRequest("'structured_outputs' must be an object with one of: " + ", ".join(STRUCTURED_KEYS)
                             + ".", param="structured_outputs")
    # null and false mean not set; 0 (which equals False in Python) is set, and a 400 for its type.
    given = [key for key in STRUCTURED_KEYS if value.get(key) is not None and value.get(key) is not False]
    if len(given) != 1:
        raise InvalidRequest("'structured_outputs' must set exactly one of: " + ", ".join(STRUCTURED_KEYS)
                             + (f" (got {', '.join(given)})." if given else "."), param="structured_outputs")
    key = given[0]
    param, spec = f"structured_outputs.{key}", value[key]
    if key == "json_object":
        return Constraint.json_schema(ANY_OBJECT, param)
    if key == "json":
        if isinstance(spec, str):  # vLLM takes the schema as an object or as JSON text
            try:
                spec = json.loads(spec)
            except ValueError:
                raise InvalidRequest(f"'{param}' is not valid JSON.", param=param) from None
        if not isinstance(spec, (Mapping, bool)):
            raise InvalidRequest(f"'{param}' must be a JSON schema object.", param=param)
        return Constraint.json_schema(closed_objects(spec), param)
    if key == "choice":
        if not isinstance(spec, list) or not spec or not all(isinstance(c, str) for c in spec):
            raise InvalidRequest(f"'{param}' must be a non-empty list of strings.", param=param)
        return Constraint("choice", json.dumps(spec, ensure_ascii=False), param)
    if not isinstance(spec, str) or not spec:
        raise InvalidRequest(f"'{param}' must be a non-empty string.", param=param)
    return Constraint(cast(ConstraintKind, key), spec, param)  # "regex" or "grammar" by now


# ---- tool calls ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FunctionTool:
    """A function the model may call, whatever API's shape it came in; ``param`` locates it in the request."""

    name: str
    parameters: Mapping
    strict: bool = False
    param: str = "tools"


ToolMode = Literal["none", "auto", "required"]
TOOL_MODES: dict[str, ToolMode] = {"none": "none", "auto": "auto", "required": "required"}  # each API's, typed


@dataclass(frozen=True)
class ToolUse:
    """A request's tools and what its tool_choice asks of them, in one shape for every API.

    ``mode`` "required" with a ``name`` is a call to that function; ``parallel`` false allows one
    call per answer (chat's parallel_tool_calls, Anthropic's disable_parallel_tool_use).
    """

    functions: tuple[FunctionTool, ...] = ()
    mode: ToolMode = "auto"
    name: str | None = None
    parallel: bool = True

    @property
    def forced(self) -> bool:
        """The answer must be a call (tool_choice "required", a named function, Anthropic's "any" or "tool")."""
        return self.mode == "required" and bool(self.functions)


def function_tool(name: str, parameters: Any, strict: Any, param: str) -> FunctionTool:
    """One function tool; ``param`` names its parameters' place in the request (a 400 when not a schema)."""
    if parameters is None:
        parameters = {"type": "object", "properties": {}}
    if not isinstance(parameters, Mapping):
        raise InvalidRequest(f"'{param}' must be a JSON schema object.", param=param)
    return FunctionTool(name, parameters, strict is True, param)


def tool_use(functions: list[FunctionTool], mode: str, name: str | None = None, parallel: bool = True, *,
             param: str = "tool_choice") -> ToolUse:
    """``functions`` and a tool_choice already mapped to a mode (and a name), checked against each other."""
    if mode == "required" and not functions:
        raise InvalidRequest("tool_choice asks for a tool call but the request has no 'tools'.", param=param)
    if name is not None and not any(f.name == name for f in functions):
        raise InvalidRequest(f"tool_choice names the function '{name}', which is not in 'tools'.", param=param)
    return ToolUse(tuple(functions), TOOL_MODES[mode], name, parallel)


def chat_tool_use(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None) -> ToolUse:
    """Chat Completions' tools and tool_choice ("none", "auto", "required", or
    {"type": "function", "function": {"name": ...}})."""
    functions = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                                 param=f"tools[{i}]")
        functions.append(function_tool(function["name"], function.get("parameters"), function.get("strict"),
                                       f"tools[{i}].function.parameters"))
    parallel = parallel_tool_calls is not False
    if tool_choice in (None, "auto", "none", "required"):
        return tool_use(functions, tool_choice or "auto", parallel=parallel)
    name = None
    if isinstance(tool_choice, Mapping) and tool_choice.get("type") == "function":
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(name, str):
        raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                             "{\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
    return tool_use(functions, "required", name, parallel)


def tool_constraint(tools: ToolUse, parser: type[ToolParser] | None,
                    specials: frozenset[str] = frozenset()) -> Constraint | None:
    """The grammar of the tool calls a request must (or, with strict tools, may) make, in ``parser``'s format.

    - A forced call ("required", a named function, Anthropic's "any" or "tool"): the answer is one
      or more calls (one for a named function, or when parallel calls are off) in the format of the
      server's parser, with arguments valid against the tool's `parameters`. Without a parser, the
      call is written (and parsed) in the Hermes format, `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`.
    - "auto" (the default with tools) when some tool is `strict: true` and the server has a parser:
      free text, but a call the model starts must name a tool and, for a strict tool, have valid
      arguments (a non-strict tool's arguments are any JSON object).
    - "none", or "auto" without strict tools: nothing is enforced.

    A marker of the format that is one of ``specials`` (the vocabulary's special tokens, e.g. harmony's
    `<|channel|>` in gpt-oss) is written in the grammar as that token, not as text no token sequence spells.
    """
    if tools.forced:
        chosen = [f for f in tools.functions if tools.name in (None, f.name)]
        return _calls_grammar(parser or HermesParser, chosen, strict_only=False,
                              single=tools.name is not None or not tools.parallel, specials=specials)
    if tools.mode != "auto" or parser is None or not any(f.strict for f in tools.functions):
        return None
    return _calls_grammar(parser, list(tools.functions), strict_only=True, single=not tools.parallel, free_text=True,
                          specials=specials)


def _calls_grammar(parser: type[ToolParser], functions: list[FunctionTool], *, strict_only: bool, single: bool,
                   free_text: bool = False, specials: frozenset[str] = frozenset()) -> Constraint | None:
    """The parser's grammar of calls to ``functions``; a non-strict tool under "auto" takes any JSON object."""
    chosen = [Function(f.name, closed_objects(f.parameters) if f.strict or not strict_only else ANY_OBJECT)
              for f in functions]
    grammar = parser.grammar(chosen, single=single, free_text=free_text, specials=specials)
    if grammar is None:
        return None
    return Constraint("grammar", grammar, functions[0].param if len(functions) == 1 else "tools")
