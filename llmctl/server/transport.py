"""waitress, guarded against slow and greedy clients: header and body deadlines, a per-client connection
cap, and /health served by threads of its own so that it answers when every request worker is busy.

waitress reads every connection on one event loop and hands a request to a worker thread only once it
has arrived in full, so a slow client costs a socket, never a worker (servers that read on their worker
threads, such as cheroot or gunicorn's gthread, give a slow client a thread). What waitress lacks is a
deadline for a request that trickles in, and a cap per client; both are added here on its own hooks
(`channel_class`, `maintenance`, `add_task`). docs/reliability.md has the measurements.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections import Counter
from dataclasses import dataclass

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.parser import HTTPRequestParser
from waitress.server import MultiSocketServer, TcpWSGIServer
from waitress.task import ThreadedTaskDispatcher

log = logging.getLogger(__name__)

HEALTH_THREADS = 2  # /health's own workers: a load balancer's probe never queues behind requests
MAINTENANCE_INTERVAL_S = 1  # how often deadlines are checked (waitress' default is every 30 s)
# Connections accepted past --max-connections, each of which evicts an older one; waitress stops accepting there.
EVICTION_HEADROOM = 64


@dataclass(frozen=True)
class TransportLimits:
    """How long a client may take to send a request, and how many connections it may hold."""

    header_timeout: float = 10.0  # from the connection (or the request's first byte) to the end of its headers
    body_timeout: float = 30.0  # from the end of the headers to the end of the body
    idle_timeout: float = 60.0  # a kept-alive connection with no request in progress
    max_connections: int = 1000  # beyond it a new connection evicts the oldest one with no complete request
    max_client_connections: int = 128  # per client address


def _plain_response(status: str, body: dict, extra: str = "") -> bytes:
    data = json.dumps(body).encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n{extra}"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def _error(message: str, err_type: str, code: str) -> dict:
    return {"error": {"message": message, "type": err_type, "param": None, "code": code}}


class _TimedParser(HTTPRequestParser):
    """waitress' request parser, noting when the request began and when its headers ended."""

    def __init__(self, adj: Adjustments) -> None:
        super().__init__(adj)
        self.started = time.monotonic()
        self.headers_done: float | None = None

    def received(self, data: bytes) -> int:
        consumed = super().received(data)
        if self.headers_finished and self.headers_done is None:
            self.headers_done = time.monotonic()
        return consumed


class GuardedChannel(HTTPChannel):
    """One client connection: counted per client address, refused beyond the cap, timed while it sends."""

    parser_class = _TimedParser
    served = False  # whether a complete request has arrived on this connection

    def __init__(self, server: GuardedServer, sock: socket.socket, addr, adj: Adjustments, map=None) -> None:
        self.opened = time.monotonic()
        self.client = addr[0] if isinstance(addr, tuple) else str(addr)
        super().__init__(server, sock, addr, adj, map)
        guard = server.guard
        guard.clients[self.client] += 1
        self.counted = True
        if guard.clients[self.client] > guard.limits.max_client_connections:
            guard.refused += 1
            self.answer_and_close("429 Too Many Requests", _error(
                f"This client already holds {guard.limits.max_client_connections} connections to the server, "
                "its limit; reuse them (keep-alive) or close some.", "rate_limit_error", "too_many_connections"),
                "Retry-After: 1\r\n")
        elif len(server.active_channels) > guard.limits.max_connections:
            self.make_room()

    def closing(self) -> bool:
        return bool(self.close_when_flushed or self.will_close)

    def waiting_for_request(self) -> bool:
        """No worker holds this connection and no complete request has arrived on it (idle or trickling)."""
        return not self.requests and not self.closing() and (self.request is None or not self.request.completed)

    def eviction_order(self) -> tuple[bool, float]:
        """Connections that never completed a request go first (a slow client's), oldest first; kept-alive
        ones that did (a load balancer's probe) only when no other is left."""
        return self.served, self.opened

    def make_room(self) -> None:
        """At the connection limit, close the oldest connection still waiting for its request (many slow
        clients cannot fill the server); with none to close, refuse this one."""
        others = [c for c in self.server.active_channels.values() if c is not self and isinstance(c, GuardedChannel)]
        if sum(not c.closing() for c in others) < self.server.guard.limits.max_connections:
            return
        idle = [c for c in others if c.waiting_for_request()]
        guard = self.server.guard
        if idle:
            guard.evicted += 1
            min(idle, key=GuardedChannel.eviction_order).answer_and_close("408 Request Timeout", _error(
                "The server is at its connection limit and closed this connection, the oldest without a complete "
                "request.", "timeout_error", "connection_evicted"))
        else:
            guard.refused += 1
            self.answer_and_close("503 Service Unavailable", _error(
                "The server is at its connection limit, every connection busy with a request; retry shortly.",
                "service_unavailable", "too_many_connections"), "Retry-After: 1\r\n")

    def answer_and_close(self, status: str, body: dict, extra: str = "") -> None:
        """Send a short error (from the event loop, while no worker holds this connection) and close."""
        data = _plain_response(status, body, extra)
        with self.outbuf_lock:
            self.request = None  # whatever else arrives is not read
            self.outbufs[-1].append(data)
            self.total_outbufs_len += len(data)
            self.close_when_flushed = True

    def overdue(self, now: float) -> str | None:
        """Which deadline this connection missed, if any (checked only while no worker holds it)."""
        if self.requests or self.closing():
            return None
        limits = self.server.guard.limits
        request = self.request
        if request is None:
            fresh = self.last_activity == self.creation_time  # nothing received or sent yet
            return "headers" if fresh and now - self.opened > limits.header_timeout else None
        if request.headers_done is None:
            return "headers" if now - request.started > limits.header_timeout else None
        return "body" if now - request.headers_done > limits.body_timeout else None

    def del_channel(self, map=None) -> None:
        if getattr(self, "counted", False):
            self.counted = False
            clients = self.server.guard.clients
            clients[self.client] -= 1
            if clients[self.client] <= 0:
                del clients[self.client]
        super().del_channel(map)


class Guard:
    """What the listeners of one server share: its limits, connections per client, /health's workers."""

    def __init__(self, limits: TransportLimits) -> None:
        self.limits = limits
        self.clients: Counter[str] = Counter()
        self.refused = 0  # connections answered 429 (per-client cap) or 503 (every connection busy)
        self.evicted = 0  # connections closed at the connection limit to make room
        self.timed_out = 0  # connections answered 408 for a missed deadline
        self.health = ThreadedTaskDispatcher()
        self.health.set_thread_count(HEALTH_THREADS)


class GuardedServer(TcpWSGIServer):
    """waitress' TCP listener with deadlines, the per-client cap and /health on its own workers."""

    channel_class = GuardedChannel

    def __init__(self, application, guard: Guard, **kw) -> None:
        self.guard = guard
        super().__init__(application, **kw)

    def add_task(self, task) -> None:
        if isinstance(task, GuardedChannel):
            task.served = True
        request = task.requests[0] if getattr(task, "requests", None) else None
        # A request waitress could not parse has an error and no command: it goes to the workers, which answer 400.
        if (request is not None and request.error is None and request.command in ("GET", "HEAD")
                and request.path == "/health"):
            self.guard.health.add_task(task)
        else:
            super().add_task(task)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # waitress' idle timeout for kept-alive connections
        mono = time.monotonic()
        for channel in list(self.active_channels.values()):
            missed = channel.overdue(mono) if isinstance(channel, GuardedChannel) else None
            if missed is None:
                continue
            self.guard.timed_out += 1
            limit = self.guard.limits.header_timeout if missed == "headers" else self.guard.limits.body_timeout
            channel.answer_and_close("408 Request Timeout", _error(
                f"The request's {missed} did not arrive within {limit:g} s.", "timeout_error", "request_timeout"))


def create_guarded_server(app, host: str, port: int, threads: int, limits: TransportLimits,
                          max_request_body_size: int):
    """Listen on ``host``:``port`` (every address it resolves to) and return the server to ``run()``."""
    adj = Adjustments(
        host=host, port=port, threads=threads, connection_limit=limits.max_connections + EVICTION_HEADROOM,
        channel_timeout=limits.idle_timeout, cleanup_interval=MAINTENANCE_INTERVAL_S,
        # Lets a handler notice that its client went away (waitress.client_disconnected).
        channel_request_lookahead=1, asyncore_use_poll=True, ident="llmctl", clear_untrusted_proxy_headers=True,
        max_request_body_size=max_request_body_size,
        # Bodies beyond 64 KiB wait for their worker in a temporary file, not in memory (waitress: 512 KiB).
        inbuf_overflow=65536,
    )
    guard = Guard(limits)
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(threads)
    socket_map: dict = {}
    servers = [GuardedServer(app, guard, map=socket_map, dispatcher=dispatcher, adj=adj, sockinfo=info)
               for info in adj.listen]
    if len(servers) == 1:
        return servers[0]
    listening = [(s.effective_host, s.effective_port) for s in servers]
    return MultiSocketServer(socket_map, adj, listening, dispatcher, servers[-1].log_info)


def open_channels(server) -> list[HTTPChannel]:
    """The client connections of ``server`` (one listener or several)."""
    socket_map = getattr(server, "_map", None) or getattr(server, "map", {})
    while True:
        try:
            return [c for c in socket_map.values() if isinstance(c, HTTPChannel)]
        except RuntimeError:  # the event loop changed the map while we read it
            continue
