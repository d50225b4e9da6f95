"""The service's OpenAPI document, built from the same pydantic schemas that validate requests.

`python -m llmctl.server.openapi > docs/openapi.json` refreshes the copy in docs/; a test keeps
the two in step.
"""

from __future__ import annotations

import json

from llmctl import __version__
from llmctl.server.api import anthropic_models, chat_models, conversations, lora, responses_models, status
from llmctl.server.api.anthropic_models import CountTokensRequest, MessagesRequest
from llmctl.server.api.chat_models import ChatCompletionRequest
from llmctl.server.api.completions import CompletionRequest, TextCompletion
from llmctl.server.api.conversations import ConversationRequest, ConversationUpdate, ItemsRequest
from llmctl.server.api.lora import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from llmctl.server.api.responses_models import ResponsesRequest
from llmctl.server.api.tokenize import Detokenized, DetokenizeRequest, Tokenized, TokenizeRequest

REQUEST_MODELS = (ChatCompletionRequest, CompletionRequest, ResponsesRequest, MessagesRequest, CountTokensRequest,
                  TokenizeRequest, DetokenizeRequest, ConversationRequest, ConversationUpdate, ItemsRequest,
                  LoadLoraAdapterRequest, UnloadLoraAdapterRequest)
ANSWER_MODELS = (*chat_models.ANSWERS, TextCompletion, *responses_models.ANSWERS, *anthropic_models.ANSWERS, Tokenized,
                 Detokenized, *status.ANSWERS, *lora.ANSWERS, *conversations.ANSWERS)

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ANTHROPIC_ERROR = {"$ref": "#/components/schemas/AnthropicError"}
# A key is needed only when the server was started with --api-key: any alternative satisfies.
KEY: list[dict[str, list[str]]] = [{"bearer": []}, {"apiKey": []}, {}]
# One server-sent event of a stream (OpenAPI 3.2's itemSchema, which readers of 3.1 ignore): `data` is JSON, or
# [DONE] at the end of OpenAI's chat and legacy completion streams; `event` names Responses' and Anthropic's events.
EVENT = {"type": "object", "required": ["data"],
         "properties": {"event": {"type": "string"}, "data": {"type": "string"}}}


def _error_responses(*codes: int, schema: dict = ERROR) -> dict:
    text = {400: "Invalid request", 401: "Missing or invalid API key", 404: "Unknown model or route",
            408: "Request timed out", 413: "Body too large", 415: "Body is not JSON", 429: "Queue full",
            500: "Server bug", 503: "Loading, failed, shutting down, or out of memory"}
    return {str(c): {"description": text[c], "content": {"application/json": {"schema": schema}}} for c in codes}


GENERATION_ERRORS = (400, 401, 404, 408, 413, 415, 429, 500, 503)


def _post(operation: str, request: str, answer: str, description: str, *, stream: bool = True,
          errors: tuple[int, ...] = GENERATION_ERRORS, error_schema: dict = ERROR, security: bool = True) -> dict:
    """A POST route that takes the JSON body ``request`` and answers ``answer`` (or server-sent events)."""
    content = {"application/json": {"schema": _ref(answer)}}
    if stream:
        content["text/event-stream"] = {"itemSchema": EVENT}
    return {"post": {
        "operationId": operation, **({"security": KEY} if security else {}),
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {"200": {"description": description, "content": content},
                      **_error_responses(*errors, schema=error_schema)},
    }}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _schemas() -> dict:
    """The request and response models as components, their nested models beside them."""
    found: dict = {}
    for model in (*REQUEST_MODELS, *ANSWER_MODELS):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        found.update(schema.pop("$defs", {}))
        found[model.__name__] = schema
    return found


def _stored(operation: str, description: str, *, answer: str | None = None, request: str | None = None,
            parts: tuple[str, ...] = (), query: tuple[str, ...] = ()) -> dict:
    """A route over stored responses or conversations: path parts, query parameters, an optional body."""
    parameters = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}} for p in parts]
    parameters += [{"name": q, "in": "query", "required": False, "schema": {"type": "string"}} for q in query]
    content = {"application/json": {"schema": _ref(answer) if answer else {"type": "object"}}}
    op = {"operationId": operation, "security": KEY, "parameters": parameters,
          "responses": {"200": {"description": description, "content": content},
                        **_error_responses(400, 401, 404, 503)}}
    if request:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(request)}}}
    return op


PAGE = ("after", "limit", "order")


def _stored_paths() -> dict:
    """The routes that read stored responses and conversations (docs/api.md, "Stored responses")."""
    rid, cid = ("response_id",), ("conversation_id",)
    return {
        "/v1/responses/{response_id}": {
            "get": _stored("retrieveResponse", "The stored response; with stream=true, a background response's "
                           "events after starting_after", answer="Response", parts=rid,
                           query=("stream", "starting_after")),
            "delete": _stored("deleteResponse", "The response deleted", answer="ResponseDeleted", parts=rid)},
        "/v1/responses/{response_id}/cancel": {
            "post": _stored("cancelResponse", "The background response, cancelled", answer="Response", parts=rid)},
        "/v1/responses/{response_id}/input_items": {
            "get": _stored("listInputItems", "A list page of the request's input items", answer="ItemList", parts=rid,
                           query=PAGE)},
        "/v1/conversations": {
            "post": _stored("createConversation", "The conversation", answer="Conversation",
                            request="ConversationRequest")},
        "/v1/conversations/{conversation_id}": {
            "get": _stored("retrieveConversation", "The conversation", answer="Conversation", parts=cid),
            "post": _stored("updateConversation", "The conversation, with the new metadata",
                            answer="Conversation", parts=cid, request="ConversationUpdate"),
            "delete": _stored("deleteConversation", "The conversation deleted", answer="ConversationDeleted",
                              parts=cid)},
        "/v1/conversations/{conversation_id}/items": {
            "get": _stored("listConversationItems", "A list page of the items", answer="ItemList", parts=cid,
                           query=PAGE),
            "post": _stored("createConversationItems", "The items added", answer="ItemList", parts=cid,
                            request="ItemsRequest")},
        "/v1/conversations/{conversation_id}/items/{item_id}": {
            "get": _stored("retrieveConversationItem", "The item", parts=(*cid, "item_id")),
            "delete": _stored("deleteConversationItem", "The conversation", answer="Conversation",
                              parts=(*cid, "item_id"))},
    }


# Each request's limit on generated tokens: what --max-tokens-cap bounds.
MAX_TOKENS_FIELDS = {"ChatCompletionRequest": ("max_tokens", "max_completion_tokens"),
                     "CompletionRequest": ("max_tokens",),
                     "ResponsesRequest": ("max_output_tokens",), "MessagesRequest": ("max_tokens",)}


def openapi_document(max_tokens_cap: int | None = None) -> dict:
    """The document; a server started with --max-tokens-cap serves it with that cap as the fields' maximum."""
    document = _document()
    if max_tokens_cap is not None:
        schemas = document["components"]["schemas"]
        for model, fields in MAX_TOKENS_FIELDS.items():
            for field in fields:
                schema = schemas[model]["properties"][field]
                for branch in schema.get("anyOf", [schema]):
                    if branch.get("type") == "integer":
                        branch["maximum"] = max_tokens_cap
    return document


def _document() -> dict:
    return {
        "openapi": "3.1.0",
        "info": {"title": "llmctl OpenAI- and Anthropic-compatible API", "version": __version__},
        "paths": {
            "/v1/chat/completions": _post(
                "createChatCompletion", "ChatCompletionRequest", "ChatCompletion",
                "A completion, or server-sent events (ChatCompletionChunk, then [DONE]) when stream is true"),
            "/v1/completions": _post(
                "createCompletion", "CompletionRequest", "TextCompletion",
                "A text completion, or server-sent events (TextCompletion chunks, then [DONE]) when stream is true"),
            "/v1/responses": _post(
                "createResponse", "ResponsesRequest", "Response",
                "A response, or its named server-sent events when stream is true (see Response)"),
            **_stored_paths(),
            "/v1/messages": _post(
                "createMessage", "MessagesRequest", "AnthropicMessage",
                "An Anthropic message, or Anthropic's server-sent events when stream is true; errors in "
                "Anthropic's envelope", error_schema=ANTHROPIC_ERROR),
            "/v1/messages/count_tokens": _post(
                "countMessageTokens", "CountTokensRequest", "AnthropicTokenCount",
                "The prompt's tokens, as /v1/messages would count them", stream=False,
                errors=(400, 401, 404, 413, 415, 500, 503), error_schema=ANTHROPIC_ERROR),
            "/tokenize": _post("tokenize", "TokenizeRequest", "Tokenized",
                               "The token ids of a prompt, or of chat messages through the chat template",
                               stream=False, errors=(400, 401, 404, 413, 415, 500, 503)),
            "/detokenize": _post("detokenize", "DetokenizeRequest", "Detokenized", "The text of token ids",
                                 stream=False, errors=(400, 401, 404, 413, 415, 500, 503)),
            "/v1/load_lora_adapter": _post("loadLoraAdapter", "LoadLoraAdapterRequest", "LoraAdapter",
                                           "The adapter is loaded and served as a model of its own", stream=False,
                                           errors=(400, 401, 413, 415, 500, 503)),
            "/v1/unload_lora_adapter": _post("unloadLoraAdapter", "UnloadLoraAdapterRequest", "LoraAdapter",
                                             "The adapter takes no new request; it goes when its running ones end",
                                             stream=False, errors=(400, 401, 413, 415, 500, 503)),
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
            "/get_load": {"get": {"operationId": "getLoad", "responses": {
                "200": {"description": "Sequences running and waiting on this replica",
                        "content": {"application/json": {"schema": _ref("WorkerLoad")}}}}}},
            "/get_model_info": {"get": {"operationId": "getModelInfo", "security": KEY, "responses": {
                "200": {"description": "The served model", "content": {"application/json": {
                    "schema": _ref("ModelInfo")}}}, **_error_responses(401, 503)}}},
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
                                                            "code": {"type": ["string", "null"]},
                                                            "request_id": {"type": "string"}}}},
                },
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"}},
        },
    }


if __name__ == "__main__":
    print(json.dumps(openapi_document(), indent=2, sort_keys=True))
