"""An idle engine waits for the rest of a burst of requests, then prefills it in full passes.

Requests are submitted from a second thread while the engine steps on this one, as the server's
request threads do; the windows are generous (tens of milliseconds) so that a slow machine still
sees each burst as one. Nothing is timed except the bound itself, with a wide margin.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from llmctl.engine import BuiltinEngine, EngineConfig, Sequence
from llmctl.engine import prefill as prefill_module
from llmctl.engine.builtin_setup import BuiltinOptions
from tests.conftest import wait_for
from tests.engine.test_engine_architectures import build, greedy
from tests.engine.test_engine_prefix_cache import random_tokens


def passes_of(engine: BuiltinEngine) -> list[int]:
    """Record the rows of every prefill pass ``engine`` runs from now on."""
    rows: list[int] = []
    real, real_alone = engine._prefill_batch, engine._prefill_chunk

    def recorded(seqs):
        rows.append(len(seqs))
        return real(seqs)

    def recorded_alone(seqs, budget):  # a row prefilled alone (reproducible chunks): short prompts, one call
        rows.append(len(seqs))
        return real_alone(seqs, budget)

    engine._prefill_batch, engine._prefill_chunk = recorded, recorded_alone
    return rows


def feed(engine: BuiltinEngine, count: int, every_s: float) -> threading.Thread:
    """Submit ``count`` requests from another thread, one every ``every_s`` seconds."""
    def submit_all():
        for i in range(count):
            time.sleep(every_s)
            engine.submit(Sequence(random_tokens(8, seed=60 + i), greedy(2)))

    thread = threading.Thread(target=submit_all)
    thread.start()
    return thread


def waits_of(engine: BuiltinEngine) -> list[float | None]:
    """Record every wait of ``engine``'s engine-thread condition (its timeout) from now on."""
    waits: list[float | None] = []
    real = engine._cond.wait

    def recorded(timeout=None):
        waits.append(timeout)
        return real(timeout)

    engine._cond.wait = recorded  # type: ignore[method-assign]
    return waits


@pytest.mark.parametrize("wait_ms", [200, 0])
def test_an_idle_engine_prefills_a_burst_in_one_pass(wait_ms):
    """Six requests 5 ms apart: with a wait, one pass of six; without, the engine starts at once (how many
    have arrived by then is up to the machine's speed)."""
    engine = BuiltinEngine(build("llama"), frozenset(), options=BuiltinOptions(prefill_wait_ms=wait_ms))
    rows, waits = passes_of(engine), waits_of(engine)
    engine.submit(Sequence(random_tokens(8, seed=59), greedy(2)))
    thread = feed(engine, 5, every_s=0.005)
    with torch.inference_mode():
        engine._step()
    thread.join()
    if wait_ms:
        assert rows[0] == 6
    else:
        assert waits == [] and rows[0] >= 1


def test_a_burst_that_does_not_end_waits_only_so_long():
    """Requests keep coming every 10 ms for 1.2 s: the engine starts after at most BURST_WINDOWS
    windows (4 x 40 ms), not when they stop."""
    engine = BuiltinEngine(build("llama"), frozenset(), EngineConfig(max_num_seqs=200),
                           options=BuiltinOptions(prefill_wait_ms=40))
    rows = passes_of(engine)
    engine.submit(Sequence(random_tokens(8, seed=59), greedy(2)))
    thread = feed(engine, 120, every_s=0.01)
    # The burst has begun once the first fed request is queued (a busy machine may start the feeding late).
    assert wait_for(lambda: engine.waiting >= 2, 60)
    with torch.inference_mode():
        engine._await_burst()
        feeding = thread.is_alive()  # the requests go on for 1.2 s (longer on a busy machine); the bound is 0.16 s
        engine._step()
    thread.join()
    assert feeding and 2 <= rows[0] < 100


def test_full_batch_slots_or_a_running_batch_do_not_wait():
    engine = BuiltinEngine(build("llama"), frozenset(), EngineConfig(max_num_seqs=2),
                           options=BuiltinOptions(prefill_wait_ms=1000))
    rows, waits = passes_of(engine), waits_of(engine)
    for i in range(2):
        engine.submit(Sequence(random_tokens(8, seed=70 + i), greedy(20)))
    with torch.inference_mode():
        engine._step()  # two requests fill both slots: no wait for more
        assert engine._batch is not None
        engine.submit(Sequence(random_tokens(8, seed=72), greedy(2)))
        engine._step()  # a batch runs: its decode step goes on at once
    assert waits == [] and rows == [2]


def test_the_wait_is_the_devices_choice_unless_set():
    model = build("llama")
    assert BuiltinEngine(model, frozenset()).prefill_wait_s == prefill_module.CPU_WAIT_MS / 1000
    assert BuiltinEngine(model, frozenset(), options=BuiltinOptions(prefill_wait_ms=0)).prefill_wait_s == 0
    with pytest.raises(ValueError, match="prefill_wait_ms"):
        BuiltinOptions(prefill_wait_ms=-1)
