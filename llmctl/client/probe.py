"""Ask a running llmctl service how it is: GET /health and GET /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from llmctl.client.providers import Endpoint, ProviderError, message_of, raise_for_status, reason

# The statuses llmctl's own /health reports; other servers say "ok" (llama.cpp) or send an empty 200 (vLLM).
LLMCTL_STATUSES = ("ready", "loading", "error", "shutting_down")
NOT_A_SERVICE = "answers, but /health is not an llmctl/OpenAI-compatible service's"


@dataclass
class Health:
    """The answer of GET /health. ``status``: ready, loading, error, shutting_down or unreachable."""

    url: str
    status: str
    body: dict = field(default_factory=dict)
    http_status: int | None = None
    error: str | None = None
    exception: Exception | None = field(default=None, repr=False, compare=False)
    """The error when no answer came (refused, timed out, undecodable), for callers that tell them apart."""

    @property
    def ready(self) -> bool:
        return self.status == "ready"

    @property
    def reachable(self) -> bool:
        return self.status != "unreachable"

    @property
    def from_llmctl(self) -> bool:
        """Whether the answer is llmctl's own (it names one of llmctl's statuses)."""
        return self.body.get("status") in LLMCTL_STATUSES


def get_health(url: str, *, timeout: float = 10.0) -> Health:
    """Ask the service at ``url`` how it is; never raises for a service that is down or is not one."""
    try:
        response = httpx.get(url.rstrip("/") + "/health", timeout=timeout)
    except httpx.TransportError as exc:
        return Health(url, "unreachable", error=reason(exc), exception=exc)
    except httpx.HTTPError as exc:  # e.g. a body that cannot be decoded: someone answered, but not sensibly
        return Health(url, "error", error=f"{url} {NOT_A_SERVICE} ({reason(exc)})", exception=exc)
    code = response.status_code
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        if code == 200 and not response.content.strip():  # vLLM and TGI answer an empty 200 when they are up
            return Health(url, "ready", {}, 200)
        # Anything else (a web server's "It works" page, a proxy's error page) is not a model service.
        kind = response.headers.get("content-type", "").split(";")[0].strip() or "no content type"
        return Health(url, "error", http_status=code, error=f"{url} {NOT_A_SERVICE} (HTTP {code}, {kind})")
    status = str(body.get("status") or ("ready" if code == 200 else "error"))
    if code == 200 and status == "ok":  # llama.cpp's server
        status = "ready"
    error = body.get("error")
    if "status" not in body and code != 200:
        said = message_of(body) if error else None
        error = f"{url} {NOT_A_SERVICE} (HTTP {code}{': ' + said[:200] if said else ''})"
    return Health(url, status, body, code, error if error is None else str(error))


def wait_for_health(url: str, wait_s: float, *, interval: float = 0.5, timeout: float = 10.0,
                    on_poll: Callable[[Health, float], None] | None = None) -> Health:
    """Poll /health until the service is ready or ``wait_s`` seconds have passed; returns the last answer."""
    deadline = time.monotonic() + wait_s
    while True:
        left = deadline - time.monotonic()
        health = get_health(url, timeout=max(0.5, min(timeout, left)))
        left = deadline - time.monotonic()
        if health.ready or left <= 0:
            return health
        if on_poll is not None:
            on_poll(health, left)
        time.sleep(min(interval, left))


def get_metrics(url: str, *, timeout: float = 10.0, api_key: str | None = None) -> dict:
    """GET /metrics as JSON; raises ProviderError when the service cannot be asked."""
    ep = Endpoint("self", url.rstrip("/") + "/v1", api_key)
    try:
        response = httpx.get(url.rstrip("/") + "/metrics", timeout=timeout,
                             headers={"Accept": "application/json", **ep.headers()})
    except httpx.TransportError as exc:
        raise ProviderError(f"{ep.label} is not reachable ({reason(exc)}).", provider="self",
                            retryable=True) from None
    raise_for_status(response, ep)
    try:
        return response.json()
    except ValueError:
        raise ProviderError(f"{ep.label} answered /metrics without JSON; is this an llmctl service?",
                            provider="self") from None
