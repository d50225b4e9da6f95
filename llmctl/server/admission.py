"""Memory admission: how many requests (and body bytes) are read, parsed and tokenized at once, how many
tokenizations run at once, and how many prompt tokens may wait for the engine; beyond a bound, 429.

A prompt costs far more memory while it is prepared than its body's size (tokenizing 1 MB of text peaks at
about 110 MB), and a queue limit counted in requests does not see it: so a request's body bytes are
admitted before the body is read and held until its prompt reaches the engine (or its answer is built, on
/tokenize and count_tokens).
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from llmctl.errors import QueueFull

if TYPE_CHECKING:  # `llmctl serve` reads this module's defaults before torch is loaded
    from llmctl.engine import Sequence

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
RETRY_AFTER_S = 1
# Tokenization runs on a few threads of its own: the Rust tokenizer runs without the GIL, so more at once
# than cores only adds memory; and glibc keeps a freed peak in the arena of the thread that allocated it,
# so tokenizing on each request's worker thread left about 110 MB per 1 MB prompt in each of up to 16 arenas.
TOKENIZER_THREADS = max(2, os.cpu_count() or 2)
TOKENIZER_POOL = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="llmctl-tokenizer")


@dataclass(frozen=True)
class AdmissionLimits:
    """The bounds; `None` where a default is derived from the engine's (see `derive`)."""

    max_preparing: int | None = None  # requests being read, parsed and tokenized at once
    max_preparing_bytes: int | None = None  # the bytes of their bodies
    max_waiting_tokens: int | None = None  # prompt tokens submitted and not yet admitted to the batch

    def derive(self, *, max_num_seqs: int, max_waiting: int, kv_cache_tokens: int,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> AdmissionLimits:
        """Fill in the defaults: as many preparing requests as the engine can hold (running + waiting), twice
        the body limit in bytes, and one KV budget of prompt tokens waiting."""
        return AdmissionLimits(self.max_preparing or max_num_seqs + max_waiting,
                               self.max_preparing_bytes or 2 * max_body_bytes,
                               self.max_waiting_tokens or kv_cache_tokens)


def encode(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """``text``'s token ids, tokenized on one of the tokenizer threads (in turn when all are busy)."""
    return TOKENIZER_POOL.submit(lambda: tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]).result()


class _Ticket:
    def __init__(self, admission: Admission, nbytes: int) -> None:
        self.admission, self.nbytes, self.held = admission, nbytes, True

    def release(self) -> None:
        self.admission._release(self)


class _Queued:
    """Prompt tokens on their way into the engine's queue, counted until every sequence is admitted."""

    def __init__(self, tokens: int) -> None:
        self.tokens = tokens
        self.seqs: list[Sequence] | None = None  # set once submitted
        self.dropped = False

    def settled(self) -> bool:
        if self.dropped:
            return True
        return self.seqs is not None and all(s.admitted is not None or s.done or s.cancelled for s in self.seqs)


_current: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("llmctl_admission_ticket", default=None)


class Admission:
    """The server's admission bounds, shared by every route."""

    def __init__(self, limits: AdmissionLimits) -> None:
        if limits.max_preparing is None or limits.max_preparing_bytes is None or limits.max_waiting_tokens is None:
            raise ValueError("AdmissionLimits must be derived (AdmissionLimits.derive) before use")
        self.limits = limits
        self.max_preparing, self.max_preparing_bytes = limits.max_preparing, limits.max_preparing_bytes
        self.max_waiting_tokens = limits.max_waiting_tokens
        self._lock = threading.Lock()
        self.preparing = 0
        self.preparing_bytes = 0
        self._queued: list[_Queued] = []
        self.rejected = 0

    @contextlib.contextmanager
    def preparing_request(self, nbytes: int) -> Iterator[None]:
        """Admit a request of ``nbytes`` body bytes for preparation (429 beyond the bounds), until its prompt
        is submitted (`prepared`) or the block ends."""
        ticket = self._acquire(max(0, nbytes))
        token = _current.set(ticket)
        try:
            yield
        finally:
            _current.reset(token)
            ticket.release()

    def prepared(self) -> None:
        """The current request's prompt is in the engine's queue: its preparation memory is free."""
        ticket = _current.get()
        if ticket is not None:
            ticket.release()

    def _acquire(self, nbytes: int) -> _Ticket:
        with self._lock:
            busy = self.preparing >= self.max_preparing
            # A body alone larger than the budget still goes through when nothing else is being prepared.
            full = self.preparing and self.preparing_bytes + nbytes > self.max_preparing_bytes
            if busy or full:
                self.rejected += 1
                what = (f"{self.preparing} requests" if busy
                        else f"{self.preparing_bytes + nbytes} bytes of requests (limit {self.max_preparing_bytes})")
                raise QueueFull(f"The server is reading and tokenizing {what} already; retry shortly.",
                                retry_after=RETRY_AFTER_S, code="server_busy")
            self.preparing += 1
            self.preparing_bytes += nbytes
        return _Ticket(self, nbytes)

    def _release(self, ticket: _Ticket) -> None:
        with self._lock:
            if ticket.held:
                ticket.held = False
                self.preparing -= 1
                self.preparing_bytes -= ticket.nbytes

    # ---- prompt tokens waiting for the engine ---------------------------------------------------
    def waiting_tokens(self) -> int:
        with self._lock:
            self._queued = [q for q in self._queued if not q.settled()]
            return sum(q.tokens for q in self._queued)

    def queue(self, tokens: int, room: int = 0) -> _Queued:
        """Count ``tokens`` of prompt as waiting (429 when that goes over the bound while others wait); set
        the returned entry's ``seqs`` once submitted, or ``dropped`` if submission failed.

        ``room``: prompt tokens the engine will admit at its next step (free KV slots while batch slots are
        free); those do not wait, so a burst fills a free batch before it counts against the bound."""
        limit = self.max_waiting_tokens
        with self._lock:
            self._queued = [q for q in self._queued if not q.settled()]
            waiting = sum(q.tokens for q in self._queued)
            if waiting and waiting + tokens > limit + room:
                self.rejected += 1
                raise QueueFull(f"{waiting} prompt tokens are waiting for the engine already (limit {limit}); "
                                "retry shortly.", retry_after=RETRY_AFTER_S, code="too_many_waiting_tokens")
            entry = _Queued(tokens)
            self._queued.append(entry)
        return entry
