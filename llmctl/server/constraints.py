"""What a request's output must match: `response_format`, vLLM's `structured_outputs`, enforced tool calls.

Every API route turns its request fields into one engine `Constraint` (or none) here, so the
rules are the same everywhere: a malformed or unsupported constraint is a 400 naming the field,
never unconstrained text in its place.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from llmctl.engine.structured import Constraint
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


def request_constraint(req, tool_call_parser: type[ToolParser] | None) -> Constraint | None:
    """A chat request's constraint. An enforced tool call comes first (the answer is the call);
    then response_format / structured_outputs; then calls to strict tools under tool_choice "auto"."""
    from_format = constraint_from_request(req.response_format, req.structured_outputs)
    tools = tool_constraint(req.tools, req.tool_choice, req.parallel_tool_calls, tool_call_parser)
    if forced_tool(req.tool_choice) or from_format is None:
        return tools or from_format
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
    given = [key for key in STRUCTURED_KEYS if value.get(key) not in (None, False)]
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
    return Constraint(key, spec, param)


# ---- tool calls ------------------------------------------------------------------------------------
def forced_tool(tool_choice: Any) -> bool:
    """tool_choice asks for a call: "required", or a named function."""
    return tool_choice == "required" or isinstance(tool_choice, Mapping)


def tool_constraint(tools: list[dict] | None, tool_choice: Any, parallel_tool_calls: bool | None,
                    parser: type[ToolParser] | None) -> Constraint | None:
    """The grammar of the tool calls a request must (or, with strict tools, may) make, in ``parser``'s format.

    - "required" or a named function: the answer is one or more calls (one for a named function,
      or when parallel_tool_calls is false) in the format of the server's parser, with arguments
      valid against the tool's `parameters`. Without a parser, the call is written (and parsed) in
      the Hermes format, `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>`.
    - "auto" (the default with tools) when some tool is `strict: true` and the server has a parser:
      free text, but a call the model starts must name a tool and, for a strict tool, have valid
      arguments (a non-strict tool's arguments are any JSON object).
    - "none", or "auto" without strict tools: nothing is enforced.
    """
    if tool_choice == "none":
        return None
    if forced_tool(tool_choice) and not tools:
        raise InvalidRequest("tool_choice asks for a tool call but the request has no 'tools'.", param="tool_choice")
    functions = _functions(tools or [])
    forced = parser or HermesParser
    if tool_choice == "required":
        return _calls_grammar(forced, functions, strict_only=False, single=parallel_tool_calls is False)
    if isinstance(tool_choice, Mapping):
        name = (tool_choice.get("function") or {}).get("name") if tool_choice.get("type") == "function" else None
        if not isinstance(name, str):
            raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}.", param="tool_choice")
        chosen = [f for f in functions if f["name"] == name]
        if not chosen:
            raise InvalidRequest(f"tool_choice names the function '{name}', which is not in 'tools'.",
                                 param="tool_choice")
        return _calls_grammar(forced, chosen, strict_only=False, single=True)
    if tool_choice not in (None, "auto"):
        raise InvalidRequest(f"Invalid value for 'tool_choice': {tool_choice!r}.", param="tool_choice")
    if parser is None or not any(f.get("strict") for f in functions):
        return None
    return _calls_grammar(parser, functions, strict_only=True, single=parallel_tool_calls is False, free_text=True)


def _functions(tools: list[dict]) -> list[dict]:
    functions = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}.",
                                 param=f"tools[{i}]")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, Mapping):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object.",
                                 param=f"tools[{i}].function.parameters")
        functions.append({"name": function["name"], "parameters": parameters, "strict": function.get("strict") is True,
                          "index": i})
    return functions


def _calls_grammar(parser: type[ToolParser], functions: list[dict], *, strict_only: bool, single: bool,
                  free_text: bool = False) -> Constraint | None:
    """The parser's grammar of calls to ``functions``; a non-strict tool under "auto" takes any JSON object."""
    chosen = [Function(f["name"], closed_objects(f["parameters"]) if f["strict"] or not strict_only else ANY_OBJECT)
              for f in functions]
    grammar = parser.grammar(chosen, single=single, free_text=free_text)
    if grammar is None:
        return None
    param = f"tools[{functions[0]['index']}].function.parameters" if len(functions) == 1 else "tools"
    return Constraint("grammar", grammar, param)
