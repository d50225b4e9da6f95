"""Flask app factory: thin routes over a `Service` and its API modules, and one place that maps errors to
each API's envelope (OpenAI's, or Anthropic's on /v1/messages)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Flask, Response, g, request
from prometheus_client.exposition import choose_encoder
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from llmctl.errors import InvalidRequest, LLMCtlError, UnsupportedMediaType
from llmctl.server.admission import DEFAULT_MAX_BODY_BYTES
from llmctl.server.api import anthropic, chat, completions, conversations, lora, responses_api, status, stored, tokenize
from llmctl.server.api.common import with_request_id
from llmctl.server.openapi import openapi_document
from llmctl.server.security import install_auth, install_cors
from llmctl.server.service import Service

log = logging.getLogger(__name__)

ANTHROPIC_PREFIX = "/v1/messages"
REQUEST_ID_HEADER = "x-request-id"
# A client's id is kept when it is printable and short, so that it cannot forge or flood log lines.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:/+=@-]{1,128}")
HTTP_ERROR_TYPES = {400: ("invalid_request_error", None), 404: ("invalid_request_error", "not_found"),
                    405: ("invalid_request_error", "method_not_allowed"),
                    413: ("invalid_request_error", "request_too_large"),
                    415: ("invalid_request_error", "unsupported_media_type")}


def json_response(body: dict, status: int = 200, headers: dict | None = None) -> Response:
    # Error messages may quote the client's text, lone surrogates included: never fail to encode it.
    data = json.dumps(body, ensure_ascii=False).encode("utf-8", "replace")
    return Response(data, status=status, headers=headers, mimetype="application/json")


def error_response(exc: LLMCtlError) -> Response:
    status = exc.status or 500  # every error the server raises has one; only a client's may have none
    return json_response(error_body(status, exc.to_body()), status, exc.headers())


def error_body(status: int, body: dict) -> dict:
    """An OpenAI error body as the route's API spells errors (Anthropic's envelope on /v1/messages), with the
    request's id, so that a client's error report names the server's log line."""
    if request.path.startswith(ANTHROPIC_PREFIX):
        return {**anthropic.error_body(status, body["error"]["message"]), "request_id": request_id()}
    return {"error": {**body["error"], "request_id": request_id()}}


def request_id() -> str:
    """This request's id: the client's own x-request-id when it sent a usable one, else a new one."""
    if "request_id" not in g:
        sent = request.headers.get(REQUEST_ID_HEADER, "")
        g.request_id = sent if REQUEST_ID_PATTERN.fullmatch(sent) else f"req_{uuid.uuid4().hex}"
    return g.request_id


def wants_prometheus() -> bool:
    if request.args.get("format") == "prometheus":
        return True
    accept = request.headers.get("Accept", "")
    return "application/openmetrics-text" in accept or "text/plain" in accept and "version=" in accept


@dataclass(frozen=True)
class HTTPOptions:
    """How the HTTP layer guards the service."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    api_keys: tuple[str, ...] = ()
    public_metrics: bool = False
    allowed_origins: tuple[str, ...] = ()


def create_app(service: Service, options: HTTPOptions | None = None) -> Flask:
    """Build the Flask app for ``service``."""
    options = options or HTTPOptions()
    max_body_bytes = options.max_body_bytes
    app = Flask("llmctl")
    app.config["MAX_CONTENT_LENGTH"] = max_body_bytes
    install_cors(app, options.allowed_origins)
    install_auth(app, options.api_keys, options.public_metrics)

    @app.errorhandler(LLMCtlError)
    def _known(exc: LLMCtlError):
        return error_response(exc)

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException):
        err_type, code = HTTP_ERROR_TYPES.get(exc.code or 500, ("invalid_request_error", None))
        message = {
            404: f"Unknown route: {request.method} {request.path}.",
            405: f"Method {request.method} is not allowed for {request.path}.",
            413: f"The request body is larger than this server's limit of {max_body_bytes} bytes.",
        }.get(exc.code or 0, exc.description or exc.name)
        body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
        # Keep the exception's own headers (Allow on a 405), not its HTML content type.
        headers = {k: v for k, v in exc.get_headers() if k.lower() != "content-type"}
        return json_response(error_body(exc.code or 500, body), exc.code or 500, headers)

    @app.before_request
    def _start():
        g.started = time.perf_counter()
        request_id()

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("Unhandled error on %s %s (request %s)", request.method, request.path, request_id())
        body = {"error": {"message": "Internal server error; see the server log.", "type": "server_error",
                          "param": None, "code": "internal_error"}}
        return json_response(error_body(500, body), 500)

    @app.after_request
    def _count(response: Response):
        response.headers[REQUEST_ID_HEADER] = request_id()
        if request.path.startswith(ANTHROPIC_PREFIX):  # the header Anthropic's API and SDK use
            response.headers["request-id"] = request_id()
        if request.method == "OPTIONS":  # CORS preflights are not requests to the API
            return response
        if request.path.startswith("/v1/"):  # probes of /health and /metrics would drown the API's lines
            log.info("%s %s %d %.3fs%s request_id=%s", request.method, request.path, response.status_code,
                     time.perf_counter() - g.get("started", time.perf_counter()),
                     " (stream)" if response.is_streamed else "", request_id())
        route = request.url_rule.rule if request.url_rule else "unmatched"
        service.metrics.count_request(route, response.status_code)
        return response

    # Each API is a module with a handler that takes the decoded body; generation handlers also take the
    # client-disconnected check and may answer a stream.
    for path, generate in GENERATION_ROUTES.items():
        app.add_url_rule(path, path, _generation_view(service, generate), methods=["POST"])
    for path, answer in JSON_ROUTES.items():
        app.add_url_rule(path, path, _json_view(service, answer), methods=["POST"])
    for path, methods in STATE_ROUTES.items():
        for method, handle in methods.items():
            reads_body = method == "POST" and handle is not stored.cancel
            app.add_url_rule(path, f"{method} {path}", _state_view(service, handle, reads_body), methods=[method])

    @app.get("/v1/models")
    def models():
        return json_response(status.models(service))

    @app.get("/v1/models/<path:model_id>")
    def model(model_id: str):
        return json_response(status.model(service, model_id))

    @app.get("/openapi.json")
    def openapi():
        return json_response(openapi_document(service.settings.max_tokens_cap))

    @app.get("/health")
    def health():
        body, code = status.health(service)
        headers = {"Retry-After": "5"} if body["status"] == "loading" else None
        return json_response(body, code, headers)

    # What request routers in front of several replicas ask of each (docs/scaling.md).
    @app.get("/get_load")
    def get_load():
        return json_response(status.load(service))

    @app.get("/get_model_info")
    def get_model_info():
        return json_response(status.model_info(service))

    @app.get("/metrics")
    def metrics():
        if wants_prometheus():
            service.refresh_gauges()
            # The format the scraper asked for: OpenMetrics or the classic text format.
            encode, content_type = choose_encoder(request.headers.get("Accept", ""))
            return Response(encode(service.metrics.registry), content_type=content_type)
        return json_response(service.metrics_json())

    return app


# (service, body, client-disconnected check) -> a JSON body or server-sent events
GenerationHandler = Callable[[Service, object, Callable[[], bool] | None], dict | Iterator[str]]
GENERATION_ROUTES: dict[str, GenerationHandler] = {
    "/v1/chat/completions": chat.handle, "/v1/completions": completions.handle,
    "/v1/responses": responses_api.handle, "/v1/messages": anthropic.handle}
JSON_ROUTES: dict[str, Callable[[Service, object], dict]] = {
    "/v1/messages/count_tokens": anthropic.count_tokens, "/tokenize": tokenize.tokenize,
    "/detokenize": tokenize.detokenize, "/v1/load_lora_adapter": lora.load, "/v1/unload_lora_adapter": lora.unload}


# Stored responses and conversations: rule -> method -> handler. A handler takes the JSON body (POSTs but
# cancel, which has none) or None, the query string and the rule's parts.
STATE_ROUTES: dict[str, dict[str, Callable[..., dict | Iterator[str]]]] = {
    "/v1/responses/<response_id>": {"GET": stored.retrieve, "DELETE": stored.delete},
    "/v1/responses/<response_id>/cancel": {"POST": stored.cancel},
    "/v1/responses/<response_id>/input_items": {"GET": stored.input_items},
    "/v1/conversations": {"POST": conversations.create},
    "/v1/conversations/<conversation_id>": {
        "GET": conversations.retrieve, "POST": conversations.update, "DELETE": conversations.delete},
    "/v1/conversations/<conversation_id>/items": {"GET": conversations.list_items, "POST": conversations.add_items},
    "/v1/conversations/<conversation_id>/items/<item_id>": {
        "GET": conversations.retrieve_item, "DELETE": conversations.delete_item},
}


def _answer(result) -> Response:
    """A handler's answer: a JSON body, or server-sent events."""
    if isinstance(result, dict):
        return json_response(result)
    return Response(with_request_id(result, request_id()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def _generation_view(service: Service, handle: GenerationHandler) -> Callable[[], Response]:
    def view():
        with _preparing(service):
            result = handle(service, read_json_body(), request.environ.get("waitress.client_disconnected"))
        return _answer(result)

    return view


def _state_view(service: Service, handle, reads_body: bool):
    def view(**parts: str):
        if not reads_body:
            return _answer(handle(service, None, request.args, **parts))
        with _preparing(service):
            return _answer(handle(service, read_json_body(), request.args, **parts))

    return view


def _json_view(service: Service, handle: Callable[[Service, object], dict]) -> Callable[[], Response]:
    def view():
        with _preparing(service):
            return json_response(handle(service, read_json_body()))

    return view


def _preparing(service: Service):
    """Admit the request's body for reading, parsing and tokenizing: 413 when it is over the body limit, 429 when
    the server prepares too much already. Held until its prompt is in the engine's queue (Service.start)."""
    length = request.content_length or 0
    if request.max_content_length is not None and length > request.max_content_length:
        raise RequestEntityTooLarge()
    return service.admission.preparing_request(length)


def read_json_body() -> object:
    """The request's JSON body, or a 4xx that says what is wrong with it."""
    encoding = request.headers.get("Content-Encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedMediaType(f"Content-Encoding '{encoding}' is not supported; send the body uncompressed.")
    if not request.is_json:
        raise UnsupportedMediaType(
            f"Content-Type must be application/json, got '{request.content_type or 'none'}'. "
            "With curl, add -H 'Content-Type: application/json'.")
    raw = request.get_data(cache=False)
    if not raw.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # bad JSON or UTF-8, 4300+ digit integers, deep nesting
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise InvalidRequest(f"The request body is not valid JSON: {reason}.") from None

