"""One sequence's trip through the engine: its tokens turned into text as they come."""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from llmctl.engine import Finish, Sequence
from llmctl.engine.sampling import TokenLogprobs
from llmctl.engine.text import IncrementalDetokenizer, StopMatcher
from llmctl.errors import RequestTimeout

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a handler checks whether its client went away
DEADLINE_SLACK_S = 2.0  # past its deadline plus this, a handler gives up on its sequence by itself


@dataclass
class Timing:
    arrived: float
    first_token: float | None = None
    last_token: float | None = None


class Generation:
    """Iterates over the text deltas of a submitted sequence, applying stop strings.

    After the iteration ends, ``finish_reason`` and ``completion_tokens`` are set. A timeout
    raises RequestTimeout; an engine failure raises the engine's error.
    """

    def __init__(self, seq: Sequence, tokenizer, stops: list[str], arrived: float,
                 disconnected: Callable[[], bool] | None = None, hidden: frozenset[int] | None = None) -> None:
        self.seq = seq
        self.detok = IncrementalDetokenizer(tokenizer, hidden)
        self.stops = StopMatcher(stops)
        self.disconnected = disconnected
        self.timing = Timing(arrived)
        self.completion_tokens = 0
        self.streamed_tokens = 0  # tokens that arrived as events (not the end-of-sequence token)
        self._logprobs_taken = 0
        self.finish_reason: str | None = None

    def __iter__(self) -> Iterator[str]:
        seq = self.seq
        next_check = time.monotonic() + POLL_S
        while True:
            try:
                event = seq.events.get(timeout=POLL_S)
            except queue.Empty:
                event = None
            now = time.monotonic()
            # On a clock, not only when tokens pause: on a GPU they never pause for POLL_S.
            if now >= next_check:
                next_check = now + POLL_S
                if self.disconnected is not None and self.disconnected():
                    seq.cancel()
                    self.finish_reason = "cancelled"
                    return
                if seq.deadline is not None and now > seq.deadline + DEADLINE_SLACK_S:
                    # The engine ends timed-out sequences itself; this only guards against it never doing so.
                    seq.cancel()
                    yield from self._finish(Finish("timeout"))
                    return
            if event is None:
                continue
            if isinstance(event, Finish):
                yield from self._finish(event)
                return
            self.timing.first_token = self.timing.first_token or now
            self.timing.last_token = now
            self.completion_tokens += 1
            self.streamed_tokens += 1
            text, stopped = self.stops.feed(self.detok.add(event))
            if text:
                yield text
            if stopped:
                seq.cancel()
                self.finish_reason = "stop"
                return

    def _finish(self, event: Finish) -> Iterator[str]:
        if event.reason in ("stop", "length"):
            if event.reason == "stop":
                self.completion_tokens += 1  # the end-of-sequence token
            tail = self.stops.flush()
            if tail:
                yield tail
            self.finish_reason = event.reason
        elif event.reason == "timeout":
            self.finish_reason = "timeout"
            raise RequestTimeout(
                f"The request did not finish within its timeout ({self.completion_tokens} tokens generated); "
                "generation was stopped. Raise 'timeout' (max 300 s) or lower max_tokens.")
        elif event.reason == "cancelled":
            self.finish_reason = "cancelled"
        else:
            self.finish_reason = "error"
            raise event.error or RuntimeError("generation failed")

    def take_logprobs(self) -> list[TokenLogprobs]:
        """The log-probabilities of the tokens received since the last call (when the request asked)."""
        items = self.seq.logprobs[self._logprobs_taken:self.streamed_tokens]
        self._logprobs_taken += len(items)
        return items

    def close(self) -> None:
        """Stop the sequence if the consumer leaves before the end (a client gone: counted as "cancelled").

        A client that disconnects is noticed either here (the server's write fails and the stream is
        closed) or by the polling in ``__iter__``, whichever comes first: both count it the same."""
        if not self.seq.done:
            self.seq.cancel()
        if self.finish_reason is None:
            self.finish_reason = "cancelled"

    @property
    def stop_sequence(self) -> str | None:
        """The stop string that ended the text, if one did."""
        return self.stops.matched

    @property
    def ttft(self) -> float | None:
        return None if self.timing.first_token is None else self.timing.first_token - self.timing.arrived

    @property
    def itl(self) -> float | None:
        t = self.timing
        if t.first_token is None or t.last_token is None or self.streamed_tokens < 2:
            return None
        return (t.last_token - t.first_token) / (self.streamed_tokens - 1)
