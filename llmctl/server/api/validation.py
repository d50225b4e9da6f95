"""What every API's request and answer models share: lenient requests, strict answers, and `parse_body`,
which turns the first problem in a request into a 400 that names the field.

Fields a request model does not know are accepted and ignored: the openai SDK, LangChain and LiteLLM send
fields a given server may not implement, and rejecting them breaks those clients. Answer models forbid
unknown fields, so what the server sends is what the OpenAPI document says.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from llmctl.errors import InvalidRequest

MAX_TIMEOUT_S = 300.0
# Numbers are strict (StrictInt, StrictFloat): pydantic's lax mode reads true as 1, "10" as 10 and 4.0 as 4;
# OpenAI's API rejects all three, and so do we. Bounds go in Field() so the JSON schema says minimum/maximum.


class Lenient(BaseModel):
    """A request model: fields it does not know are ignored."""

    model_config = ConfigDict(extra="ignore")


class Strict(BaseModel):
    """An answer model, which the handler builds and sends as ``model_dump()``; unknown fields are an error.

    An optional field (one that defaults to None) left out when the answer was built stays out of the body;
    given as None, it is null (OpenAI's bodies have both: `usage` only in a stream's last chunk, a null `logprobs`)."""

    model_config = ConfigDict(extra="forbid")

    @model_serializer(mode="wrap")
    def _given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        body = handler(self)
        for name, info in type(self).model_fields.items():
            if info.default is None and name not in self.model_fields_set:
                body.pop(name, None)
        return body


CATCH_ALL = "known_type_in_catch_all"


def other_type(known: tuple[str, ...], what: str) -> AfterValidator:
    """For the catch-all member of a union of typed parts: a known type that reaches it is a known part
    with a bad field, and must fail as one (not pass as 'some other type')."""

    def check(value: str) -> str:
        if value in known:
            # Its own error type, so that parse_body prefers the known part's error (which names the field).
            raise PydanticCustomError(CATCH_ALL, f"a '{value}' {what} is missing a field or has one of the wrong type")
        return value

    return AfterValidator(check)


def valid_unicode(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that no tokenizer accepts; replace them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


RequestT = TypeVar("RequestT", bound=BaseModel)

# pydantic's type errors, and the kinds of JSON value a value of that type is near to.
NEAR_KINDS: dict[str, type | tuple[type, ...]] = {
    "string_type": str, "int_type": (int, float), "float_type": (int, float), "list_type": list,
    "dict_type": dict, "model_type": dict, "bool_type": bool}


def parse_body(model: type[RequestT], body: object) -> RequestT:
    """Validate a decoded JSON body against ``model``, turning the first problem into a 400 that names the field."""
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        errors = exc.errors()
        # In a union (stop: str | list[str], or typed parts) pydantic reports each branch it tried. A part
        # whose "type" is another part's is the wrong branch; of the rest, the one that got furthest into
        # the body explains best, a bad field beats a wrong type, and a known type that fell through to the
        # catch-all part comes last.
        wrong = [e["loc"][:-1] for e in errors if e["type"] == "literal_error" and e["loc"][-1] == "type"]

        def rank(error: ErrorDetails) -> tuple:
            loc = error["loc"]
            found = _walk(loc, body, missing=error["type"] == "missing")
            mismatch = error["type"].endswith("_type") or error["type"] == "literal_error"
            # A branch of the input's own kind (a number for an integer: 4.0) explains better than another.
            near = isinstance(error.get("input"), NEAR_KINDS.get(error["type"], ()))
            return (error["type"] == CATCH_ALL, any(loc[:len(w)] == w for w in wrong), -len(found),
                    mismatch and not near, mismatch)

        error = min(errors, key=rank)
        param = field_path(error["loc"], body, missing=error["type"] == "missing")
        if error["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        elif param in ("messages", "prompt", "input") and error["type"] == "too_short":
            message = f"'{param}' must contain at least one item."
        else:
            message = f"Invalid value for '{param}': {error['msg']}."
        raise InvalidRequest(message, param=param) from None


def field_path(loc: tuple[int | str, ...], body: object, *, missing: bool = False) -> str | None:
    """pydantic's error location as the API spells the field: ``messages[0].content[0].text``."""
    path = ""
    for part in _walk(loc, body, missing=missing):
        path = f"{path}[{part}]" if isinstance(part, int) else f"{path}.{part}" if path else part
    return path or None


def _walk(loc: tuple[int | str, ...], body: object, *, missing: bool) -> list[int | str]:
    """The keys and indexes of ``loc`` found along ``body`` (a missing field's own name ends it).

    pydantic puts the union branch it tried in the location (``str``, ``list[...]``, ``TextPart``); those
    are not fields of the request, and are left out.
    """
    found: list[int | str] = []
    value = body
    for depth, part in enumerate(loc):
        if isinstance(part, int) and isinstance(value, list) and -len(value) <= part < len(value):
            found.append(part)
            value = value[part]
        elif isinstance(part, str) and isinstance(value, dict) and (
                part in value or missing and depth == len(loc) - 1):
            found.append(part)
            value = value.get(part)
    return found
