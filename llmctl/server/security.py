"""API keys and CORS for the service.

Keys are compared in constant time. /health stays open so load balancers can probe it; /metrics
needs a key unless the operator makes it public (Prometheus can send a bearer token).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from pathlib import Path

from flask import Flask, request

from llmctl.errors import ConfigError, Unauthorized

OPEN_PATHS = ("/health",)


def load_api_keys(keys: Iterable[str], key_file: Path | None) -> tuple[str, ...]:
    """Keys from flags/env (comma-separated allowed) and from a file (one per line, # comments)."""
    found = [k.strip() for value in keys for k in value.split(",") if k.strip()]
    if key_file is not None:
        try:
            lines = key_file.expanduser().read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(f"Cannot read the API key file {key_file}: {exc.strerror}.") from exc
        found += [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
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
        if not (request.path.startswith("/v1/") or request.path in ("/metrics", "/openapi.json")):
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        if not key_matches(token.strip(), keys):
            raise Unauthorized("Invalid API key.")
        return None


def install_cors(app: Flask, origins: tuple[str, ...]) -> None:
    if not origins:
        return
    from flask_cors import CORS

    CORS(app, origins=list(origins), allow_headers=["Authorization", "Content-Type"],
         methods=["GET", "POST", "OPTIONS"], max_age=600)
