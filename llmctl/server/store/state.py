"""What a server does with its store besides reading and writing: background jobs, leases and retention.

A background response runs in a thread of the server that accepted it. That server renews a lease on
its unfinished responses every `lease_s`; any server that finds a lease expired (its holder crashed
or was killed) marks the response failed, so a poller never waits on a response nobody is computing.
A cancel that reached another replica is seen here through the same loop. Expired responses and
conversations, and the oldest responses beyond the size bound, are deleted every `sweep_s`.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field

from llmctl.server.store.sql import UNFINISHED, SQLStore, StoredResponse

log = logging.getLogger(__name__)

CRASHED = ("The server running this background response stopped (it crashed or was restarted) before it "
           "finished; create the response again.")
SHUT_DOWN = "The server shut down before this background response finished; create the response again."
DEFAULT_TTL_S = 30 * 24 * 3600.0  # OpenAI keeps responses for 30 days
DEFAULT_MAX_BYTES = 1024 * 1024 * 1024
DEFAULT_LEASE_S = 10.0


@dataclass
class Job:
    """A background response running in this process, and the events it has sent so far."""

    id: str
    events: list[dict] = field(default_factory=list)
    done: bool = False
    cancelled: bool = False
    changed: threading.Condition = field(default_factory=threading.Condition)

    def add(self, event: dict) -> None:
        with self.changed:
            self.events.append(event)
            self.changed.notify_all()

    def end(self) -> None:
        with self.changed:
            self.done = True
            self.changed.notify_all()

    def after(self, seq: int, timeout: float) -> tuple[list[dict], bool]:
        """The events numbered above ``seq`` (waiting up to ``timeout`` for one), and whether the job ended."""
        with self.changed:
            self.changed.wait_for(lambda: self.done or (self.events and self.events[-1]["sequence_number"] > seq),
                                  timeout)
            return [e for e in self.events if e["sequence_number"] > seq], self.done


class ResponseState:
    """A store plus this server's background jobs, lease renewal and retention sweeps."""

    def __init__(self, store: SQLStore, ttl: float = DEFAULT_TTL_S, max_bytes: int = DEFAULT_MAX_BYTES,
                 lease_s: float = DEFAULT_LEASE_S, sweep_s: float = 60.0) -> None:
        self.store, self.ttl, self.max_bytes = store, ttl, max_bytes
        self.lease_s, self.sweep_s = lease_s, sweep_s
        self.instance = secrets.token_hex(8)
        self.jobs: dict[str, Job] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="llmctl-responses", daemon=True)
        self._thread.start()

    def lease_until(self) -> float:
        # Three renewals' worth: a busy moment that delays one renewal does not fail live responses.
        return time.time() + 3 * self.lease_s

    def fail(self, response: StoredResponse, message: str) -> bool:
        body = {**response.body, "status": "failed", "error": {"code": "server_error", "message": message}}
        return self.store.finish_response(response.id, body)

    def tend(self) -> None:
        """One round: renew this server's leases, stop jobs cancelled elsewhere, fail orphans."""
        now = time.time()
        self.store.renew_leases(self.instance, self.lease_until())
        jobs = dict(self.jobs)
        for rid, status in self.store.statuses(list(jobs)).items():
            if status not in UNFINISHED:
                jobs[rid].cancelled = True
        for orphan in self.store.orphans(now):
            if orphan.id not in self.jobs and self.fail(orphan, CRASHED):
                log.warning("Background response %s was left unfinished by a stopped server: marked failed",
                            orphan.id)

    def sweep(self) -> int:
        gone = self.store.sweep(time.time(), self.max_bytes)
        if gone:
            log.info("Deleted %d expired or over-size stored responses and conversations", gone)
        return gone

    def _loop(self) -> None:
        next_sweep = 0.0
        while not self._stop.is_set():
            try:
                self.tend()
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + self.sweep_s
                    self.sweep()
            except Exception:  # a database hiccup must not end the loop: the next round retries
                log.exception("Tending the response store failed")
            self._stop.wait(self.lease_s)

    def close(self) -> None:
        """Stop the loop; this server's unfinished background responses end failed (nobody will finish them)."""
        self._stop.set()
        self._thread.join(timeout=5)
        for response in self.store.orphans(time.time(), instance=self.instance):
            self.fail(response, SHUT_DOWN)
        for job in list(self.jobs.values()):  # after the above, so their end cannot read as a cancel
            job.cancelled = True
        self.store.close()


def event_rows(events: list[dict]) -> list[tuple[int, str]]:
    return [(e["sequence_number"], json.dumps(e)) for e in events]
