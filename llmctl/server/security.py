"""API keys and CORS for the service.

Keys are compared in constant time; a key comes as 'Authorization: Bearer <key>' or, as Anthropic's
clients send it, 'x-api-key: <key>'. /health and /get_load stay open so load balancers can probe them;
/metrics needs a key unless the operator makes it public (Prometheus can send a bearer token).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, request

from llmctl.errors import ConfigError, Unauthorized
from llmctl.keyfile import api_key_file_keys

# A router polls /get_load without the clients' key, as it does /health; it is a count and names nothing.
OPEN_PATHS = ("/health", "/get_load")
PROTECTED_PATHS = ("/metrics", "/openapi.json", "/tokenize", "/detokenize", "/get_model_info")
OWNER_ENV = "llmctl.owner"


def load_api_keys(keys: Iterable[str], key_file: Path | None) -> tuple[str, ...]:
    """Keys from flags/env (comma-separated allowed) and from a file (one per line, # comments).

    Asking for keys and getting none (an empty file, ``--api-key ,``) is an error, never an open server.
    """
    keys = list(keys)
    found = [k.strip() for value in keys for k in value.split(",") if k.strip()]
    if key_file is not None:
        found += api_key_file_keys(key_file)
    asked = any(value.strip() for value in keys) or key_file is not None  # LLMCTL_API_KEY="" means none
    if asked and not found:
        source = f"the API key file {key_file}" if key_file is not None else "--api-key"
        raise ConfigError(f"{source} holds no API key; the server would be open to anyone. "
                          "Give at least one key, or drop the option.")
    return tuple(dict.fromkeys(found))


def key_matches(presented: str, keys: tuple[str, ...]) -> bool:
    # Compare against every key, so the time taken does not reveal which one (if any) matched.
    results = [hmac.compare_digest(presented.encode(), key.encode()) for key in keys]
    return any(results)


def install_auth(app: Flask, keys: tuple[str, ...], public_metrics: bool) -> None:
    if not keys:
        return

    @app.before_request
    def _require_key():
        if request.method == "OPTIONS" or request.path in OPEN_PATHS:
            return None
        if request.path == "/metrics" and public_metrics:
            return None
        if not (request.path.startswith("/v1/") or request.path in PROTECTED_PATHS):
            return None
        token = presented_key()
        if not token:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>').")
        if not key_matches(token, keys):
            raise Unauthorized("Invalid API key.")
        # Stored responses belong to the key that created them (llmctl.server.api.stored).
        request.environ[OWNER_ENV] = hashlib.sha256(token.encode()).hexdigest()
        return None


def presented_key() -> str | None:
    """The key in 'Authorization: Bearer <key>', or in 'x-api-key' (what Anthropic's clients send)."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.headers.get("x-api-key", "").strip() or None


def install_cors(app: Flask, origins: tuple[str, ...]) -> None:
    if not origins:
        return
    from flask_cors import CORS

    # Any request header is allowed: the OpenAI JS SDK sends its own (x-stainless-*), and the
    # origin list, not the header list, is what guards the service.
    CORS(app, origins=list(origins), methods=["GET", "POST", "DELETE", "OPTIONS"],
         expose_headers=["Retry-After", "x-request-id"],
         max_age=600)

    @app.after_request
    def _vary(response):
        # The answer depends on the Origin header: shared caches must not hand it to another origin.
        response.vary.add("Origin")
        return response
