"""Serve the app with waitress (guarded by `transport`) and shut down gracefully on SIGINT/SIGTERM."""

from __future__ import annotations

import errno
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from llmctl.errors import LLMCtlError
from llmctl.server.transport import TransportLimits, create_guarded_server, open_channels

if TYPE_CHECKING:  # `llmctl serve` imports this module (ServeError) before torch is loaded
    from llmctl.server.service import Service

log = logging.getLogger(__name__)


class ServeError(LLMCtlError):
    """The server cannot start (the port is taken, the address does not exist)."""


def transport_body_limit(app) -> int:
    """What waitress may buffer of one body before the app sees it (its own default is 1 GB, spooled to
    disk). Twice the app's limit: a body a little too large still gets the app's JSON 413, a huge one is
    cut off early with waitress' plain one."""
    return 2 * app.config["MAX_CONTENT_LENGTH"]


def run_server(app, service: Service, host: str, port: int, threads: int, grace_period: float,
               limits: TransportLimits | None = None, on_listening: Callable[[], None] | None = None) -> int:
    """Open the port at once, load the model behind it, serve until a signal, then drain and exit 0.
    ``on_listening`` runs once the port is bound (warnings that only matter for a server that started)."""
    try:
        server = create_guarded_server(app, host, port, threads, limits or TransportLimits(),
                                       transport_body_limit(app))
    except OSError as exc:
        hint = (" Another program (perhaps another llmctl serve) listens there: stop it or pick another --port;"
                " `llmctl doctor --port N` tells whether a port is free.") if exc.errno == errno.EADDRINUSE else ""
        raise ServeError(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.{hint}") from None
    stop = threading.Event()

    def _on_signal(signum, _frame) -> None:
        log.info("Received %s: shutting down", signal.Signals(signum).name)
        stop.set()

    previous = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    log.info("Listening on http://%s:%d (%d HTTP threads)", host, port, threads)
    if on_listening is not None:
        on_listening()
    service.load_in_background()
    loop = threading.Thread(target=server.run, name="llmctl-http", daemon=True)
    loop.start()
    try:
        while not stop.wait(0.5):
            if not loop.is_alive():
                log.error("The HTTP server stopped unexpectedly")
                return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    service.begin_drain()
    inflight = service.inflight
    if inflight:
        log.info("Waiting up to %.0f s for %d request(s) in flight", grace_period, inflight)
    if not service.wait_idle(grace_period):
        log.warning("Grace period over with %d request(s) still running; stopping them", service.inflight)
    _wait_for_responses(server, timeout=2.0)
    service.shutdown()
    server.close()
    log.info("Stopped")
    return 0


def _wait_for_responses(server, timeout: float) -> None:
    """Let the answers of the last requests reach their clients before the process exits: a handler
    has returned once the service is idle, but waitress still has to build and send what it returned."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        channels = open_channels(server)
        if not any(channel.requests or channel.total_outbufs_len for channel in channels):
            return
        time.sleep(0.02)
