"""The service's OpenAPI document, built from the same pydantic schemas that validate requests.

`python -m llmctl.server.openapi > docs/openapi.json` refreshes the copy in docs/; a test keeps
the two in step.
"""

from __future__ import annotations

import json

from llmctl import __version__
from llmctl.server.responses import RESPONSE_MODELS
from llmctl.server.schemas import ChatCompletionRequest

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
# A key is needed only when the server was started with --api-key: either alternative satisfies.
KEY = [{"bearer": []}, {}]


def _error_responses(*codes: int) -> dict:
    text = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown model or route",
            408: "Request timed out", 413: "Body too large", 415: "Body is not JSON", 429: "Queue full",
            500: "Server bug", 503: "Loading, failed, shutting down, or out of memory"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": ERROR}}} for c in codes}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict:
    """The request and response models as components, their nested models beside them."""
    found: dict = {}
    for model in (ChatCompletionRequest, *RESPONSE_MODELS):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def openapi_document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmctl OpenAI-compatible API", "version": __version__},
        "paths": {
            "/v1/chat/completions": {"post": {
                "operationId": "createChatCompletion", "security": KEY,
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": {"$ref": "#/components/schemas/ChatCompletionRequest"}}}},
                "responses": {
                    "200": {"description": "A completion, or server-sent events (ChatCompletionChunk, then "
                                           "[DONE]) when stream is true",
                            "content": {"application/json": {"schema": _ref("ChatCompletion")},
                                        "text/event-stream": {"schema": {"type": "string"}}}},
                    **_error_responses(400, 401, 404, 408, 413, 415, 429, 500, 503),
                },
            }},
            "/v1/models": {"get": {"operationId": "listModels", "security": KEY, "responses": {
                "200": {"description": "The served model", "content": {"application/json": {
                    "schema": _ref("ModelList")}}}, **_error_responses(401, 503)}}},
            "/v1/models/{model}": {"get": {
                "operationId": "retrieveModel", "security": KEY,
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "The served model", "content": {"application/json": {
                    "schema": _ref("Model")}}}, **_error_responses(401, 404, 503)}}},
            "/health": {"get": {"operationId": "health", "responses": {
                "200": {"description": "Ready", "content": {"application/json": {"schema": _ref("Health")}}},
                "503": {"description": "Loading, failed or shutting down",
                        "content": {"application/json": {"schema": _ref("Health")}}}}}},
            "/metrics": {"get": {"operationId": "metrics", "security": KEY, "responses": {
                "200": {"description": "JSON metrics, or Prometheus text with ?format=prometheus",
                        "content": {"application/json": {"schema": {"type": "object"}},
                                    "text/plain": {"schema": {"type": "string"}}}},
                **_error_responses(401)}}},
        },
        "components": {
            "schemas": {
                **_schemas(),
                "ErrorResponse": {
                    "type": "object", "required": ["error"],
                    "properties": {"error": {"type": "object", "required": ["message", "type", "param", "code"],
                                             "properties": {"message": {"type": "string"},
                                                            "type": {"type": "string"},
                                                            "param": {"type": ["string", "null"]},
                                                            "code": {"type": ["string", "null"]}}}},
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
