"""Every API validates numbers strictly and names a bad field by its path in the request, in its own envelope."""

from __future__ import annotations

import pytest

from llmctl.server.openapi import openapi_document

USER = [{"role": "user", "content": "Hello"}]
ROUTES = {"chat": ("/v1/chat/completions", {"messages": USER}), "completions": ("/v1/completions", {"prompt": "Hi"}),
          "responses": ("/v1/responses", {"input": "Hi"}),
          "messages": ("/v1/messages", {"messages": USER, "max_tokens": 2})}
MAX_TOKENS = {"chat": "max_tokens", "completions": "max_tokens", "responses": "max_output_tokens",
              "messages": "max_tokens"}


def openai_error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code", "request_id"}
    return error


def anthropic_error(r, status: int = 400) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    return body["error"]


def error_param(api: str, r) -> str:
    """The field an error names: OpenAI's `param`, or the quoted field in Anthropic's message (it has no param)."""
    if api == "messages":
        message = anthropic_error(r)["message"]
        return message.split("'")[1]
    return openai_error(r)["param"]


@pytest.mark.parametrize("api", list(ROUTES))
@pytest.mark.parametrize("value", [4.0, "10", True])
def test_integers_are_integers_on_every_api(client, api, value):
    path, body = ROUTES[api]
    field = MAX_TOKENS[api]
    assert error_param(api, client.post(path, json={**body, field: value})) == field
    assert client.post(path, json={**body, field: 2}).status_code == 200


@pytest.mark.parametrize("api", list(ROUTES))
def test_a_float_field_takes_an_integer(client, api):
    path, body = ROUTES[api]
    r = client.post(path, json={**body, "temperature": 1, "max_tokens": 2} if api != "responses"
                    else {**body, "temperature": 1, "max_output_tokens": 2})
    assert r.status_code == 200, r.text


def test_detokenize_takes_integer_token_ids_only(client):
    assert openai_error(client.post("/detokenize", json={"tokens": [1, 2.0]}))["param"] == "tokens[1]"


@pytest.mark.parametrize(("api", "path", "body", "param"), [
    ("chat", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content[0].text"),
    ("chat", "/v1/chat/completions", {"messages": [USER[0], {"role": "user", "content": [{"type": "text"}]}]},
     "messages[1].content[0].text"),
    ("completions", "/v1/completions", {"prompt": "Hi", "logprobs": 1.5}, "logprobs"),
    ("responses", "/v1/responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": 3}]}]},
     "input[0].content[0].text"),
    ("responses", "/v1/responses", {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
     "input[0].call_id"),
    ("responses", "/v1/responses", {"input": "Hi", "tools": [{"type": "function"}]}, "tools[0].name"),
    ("messages", "/v1/messages", {"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "tool_use", "id": "t1", "input": {}}]}]}, "messages[0].content[0].name"),
    ("messages", "/v1/messages/count_tokens", {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
     "messages[0].content[0].text"),
    ("messages", "/v1/messages", {"max_tokens": 2, "messages": USER, "tools": [{"input_schema": {}}]},
     "tools[0].name"),
    ("tokenize", "/tokenize", {"messages": [{"role": "user", "content": [{"type": "text", "text": None}]}]},
     "messages[0].content[0].text"),
])
def test_param_is_the_field_path_in_the_request(client, api, path, body, param):
    """Never pydantic's internal location (messages.0.content.0.TextPart.text)."""
    assert error_param(api, client.post(path, json=body)) == param


def test_openapi_bounds_are_json_schema_keywords():
    """minimum/maximum/exclusiveMinimum, which validators, client generators and fuzzers read; not ge/le/gt/lt."""
    found: dict[str, int] = {}

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("ge", "le", "gt", "lt", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum") \
                        and isinstance(value, int | float):
                    found[key] = found.get(key, 0) + 1
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(openapi_document())
    assert not {"ge", "le", "gt", "lt"} & set(found), found
    assert found["minimum"] > 20 and found["maximum"] > 10 and found["exclusiveMinimum"] >= 3
    chat = openapi_document()["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"type": "integer", "minimum": 1} in chat["max_tokens"]["anyOf"]


@pytest.mark.parametrize(("model", "body", "valid"), [
    ("TokenizeRequest", {"prompt": "Hi"}, True),
    ("TokenizeRequest", {"messages": USER}, True),
    ("TokenizeRequest", {}, False),
    ("TokenizeRequest", {"prompt": None}, False),
    ("TokenizeRequest", {"prompt": "Hi", "messages": USER}, False),
    ("CompletionRequest", {"prompt": ""}, False),
    ("CompletionRequest", {"prompt": [-1]}, False),
    ("CompletionRequest", {"prompt": "x", "echo": True, "logprobs": 1}, False),
    ("ChatCompletionRequest", {"messages": USER, "tools": [{"type": "function", "function": {}}]}, False),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "required"}, False),
    ("ChatCompletionRequest", {"messages": USER, "tool_choice": "sometimes"}, False),
    ("ChatCompletionRequest", {"messages": USER, "structured_outputs": {}}, False),
    ("ChatCompletionRequest", {"messages": USER, "structured_outputs": {"regex": "a+", "choice": ["a"]}}, False),
    ("ChatCompletionRequest", {"messages": USER, "structured_outputs": {"regex": "a+", "choice": None}}, True),
    ("ChatCompletionRequest", {"messages": USER, "structured_outputs": {"choice": []}}, False),
    ("ChatCompletionRequest", {"messages": USER, "response_format": {"type": "xml"}}, False),
    ("ChatCompletionRequest", {"messages": USER, "top_logprobs": 2}, False),
    ("ChatCompletionRequest", {"messages": USER, "logit_bias": {"abc": 1}}, False),
    ("ChatCompletionRequest", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, False),
    ("ResponsesRequest", {"input": [{"role": "system", "content": "x"}]}, False),
    ("ResponsesRequest", {"input": "x", "tools": [{"type": "function"}]}, False),
    ("MessagesRequest", {"max_tokens": 2, "messages": USER, "tools": [{"input_schema": {}}]}, False),
])
def test_the_document_carries_the_rules_the_server_enforces(client, model, body, valid):
    """A request valid against the document is accepted; one the server refuses is invalid against it."""
    from jsonschema import Draft202012Validator

    document = openapi_document()
    validator = Draft202012Validator({"$ref": f"#/components/schemas/{model}", "components": document["components"]})
    assert validator.is_valid(body) == valid
    path = {"TokenizeRequest": "/tokenize", "CompletionRequest": "/v1/completions",
            "ChatCompletionRequest": "/v1/chat/completions", "ResponsesRequest": "/v1/responses",
            "MessagesRequest": "/v1/messages"}[model]
    extra = {} if model in ("TokenizeRequest", "MessagesRequest") else \
        {"max_output_tokens": 2} if model == "ResponsesRequest" else {"max_tokens": 2}
    assert (client.post(path, json={**extra, **body}).status_code == 200) == valid


def test_structured_outputs_zero_is_not_unset(client):
    """0 equals False in Python, but it is not JSON's false: a key set to 0 is set (and a 400 for its type)."""
    body = {"messages": USER, "max_tokens": 2, "structured_outputs": {"grammar": 0, "choice": ["a"]}}
    assert openai_error(client.post("/v1/chat/completions", json=body))["param"] == "structured_outputs"
    body["structured_outputs"] = {"grammar": False, "choice": ["a"]}
    assert client.post("/v1/chat/completions", json=body).status_code == 200


def test_tool_choice_function_that_is_not_an_object_is_a_400(client):
    """It was a 500 (found by schemathesis)."""
    body = {"messages": USER, "max_tokens": 2, "tool_choice": {"type": "function", "function": [None, None]}}
    assert openai_error(client.post("/v1/chat/completions", json=body))["param"] == "tool_choice"


@pytest.mark.parametrize(("body", "valid"), [
    ({"tool_choice": {"type": "auto"}}, True),
    ({"tool_choice": {"type": "any"}}, False),  # asks for a call: needs tools
    ({"tool_choice": {"type": "sometimes"}}, False),
    ({"tool_choice": {"type": "tool", "name": "f"}, "tools": [{"name": "f", "input_schema": {"type": "object"}}]},
     True),
])
def test_anthropic_tool_choice_is_documented(client, body, valid):
    from jsonschema import Draft202012Validator

    document = openapi_document()
    validator = Draft202012Validator({"$ref": "#/components/schemas/MessagesRequest",
                                      "components": document["components"]})
    request = {"max_tokens": 2, "messages": USER, **body}
    assert validator.is_valid(request) == valid
    assert (client.post("/v1/messages", json=request).status_code == 200) == valid
