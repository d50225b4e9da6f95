"""Doctor checks of the network side: whether the port is free, and whether a service at a URL answers."""

from __future__ import annotations

import errno
import socket

from llmctl.doctor.modelcheck import Check


def check_port(port: int, host: str = "0.0.0.0") -> Check:
    """Whether `llmctl serve --port PORT` can listen, and what holds the port if not."""
    from llmctl.client.probe import get_health

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The server sets SO_REUSEADDR too, so a closing connection in TIME_WAIT does not block it.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return Check("Port", "ok", f"Port {port} is free for llmctl serve", details={"port": port})
        except OSError as exc:
            error = exc
    if error.errno == errno.EACCES:
        return Check("Port", "failure", f"Port {port} needs root privileges to listen on",
                     "Use a port above 1023: llmctl serve --port 8080", {"port": port})
    health = get_health(f"http://127.0.0.1:{port}", timeout=2.0)
    if health.from_llmctl:
        return Check("Port", "warning", f"Port {port} is in use by a running llmctl service (status "
                     f"{health.status!r}); a second `llmctl serve --port {port}` would fail",
                     f"Talk to that one (llmctl doctor --url http://127.0.0.1:{port}), or serve on another "
                     "--port.", {"port": port, "health": health.body})
    return Check("Port", "failure", f"Port {port} is taken by another program ({error.strerror}); "
                 f"llmctl serve --port {port} would fail",
                 f"Serve on another --port, or find the program with `ss -ltnp 'sport = :{port}'` and stop "
                 "it.", {"port": port})


def valid_url(url: str) -> str:
    """``url`` as the config takes SELF_HOSTED_LLM_URL (host:port, or a pasted .../v1 base URL, is fine);
    raises ValueError with the config's words when it is not a usable http(s) URL."""
    from pydantic import ValidationError

    from llmctl.client.config import LLMSettings, normalize_url

    try:
        return LLMSettings(self_hosted_url=normalize_url(url)).self_hosted_url
    except ValidationError as exc:
        raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def check_service(url: str, timeout: float = 5.0) -> Check:
    """Whether the service at ``url`` answers /health, and what its status says."""
    import httpx

    from llmctl.client.probe import get_health

    try:
        url = valid_url(url)
    except ValueError as exc:
        return Check("Service", "failure", f"--url: {exc}", "Give the service's URL: http(s)://, a "
                     "host, and a port from 1 to 65535, e.g. http://127.0.0.1:8080.", {"url": url})
    health = get_health(url, timeout=timeout)
    details: dict = {"url": url}
    if isinstance(health.exception, httpx.ConnectError):
        return Check("Service", "failure", f"Connection refused at {url}: nothing listens there",
                     "Start it (llmctl serve --port N) and check host and port; for clients on other "
                     "machines or containers serve with --host 0.0.0.0, publish the port, and open the "
                     "firewall.", details)
    if isinstance(health.exception, httpx.TimeoutException):
        return Check("Service", "failure", f"{url} did not answer /health within {timeout:g} s",
                     "The host may be unreachable (a firewall dropping packets) or the server stuck; check "
                     "its log, and that long generations are not holding every worker thread (--threads).",
                     details)
    if not health.reachable:
        return Check("Service", "failure", f"{url}: {health.error}",
                     "Check the URL (scheme, host, port), e.g. http://127.0.0.1:8080.", details)
    details["http_status"] = health.http_status
    if health.status == "error" and not health.from_llmctl:
        return Check("Service", "failure", health.error or f"{url} /health answered {health.http_status}",
                     "Check the port: another program answers there.", details)
    details["health"] = health.body
    body = health.body
    shown = ", ".join(f"{name} {body[key]}" for key, name in (("model", "model"), ("device", "device"), (
        "dtype", "dtype"), ("context_length", "context")) if body.get(key) is not None)
    if health.ready:
        what = shown or "an OpenAI-compatible server that does not report its model or device"
        return Check("Service", "ok", f"{url} is ready: {what}", details=details)
    if health.status == "loading":
        return Check("Service", "warning", f"{url} is still loading the model", "Wait: requests get 503 "
                     "with Retry-After until it is ready (llmctl health --wait 300 waits for you).", details)
    if health.status == "error":
        return Check("Service", "failure", f"{url} failed to load its model: {health.error}",
                     "Run llmctl doctor --model-path <the same path> on the server machine, fix what it "
                     "reports, and restart the service.", details)
    if health.status == "shutting_down":
        return Check("Service", "warning", f"{url} is shutting down", "Restart the service.", details)
    return Check("Service", "warning", f"{url}: status {health.status!r}" + (f", {shown}" if shown else ""),
                 "Check the service's log.", details)
