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
from tests.engine.test_engine_architectures import build, greedy
from tests.engine.test_engine_prefix_cache import random_tokens


def passes_of(engine: BuiltinEngine) -> list[int]:
    """Record the rows of every prefill pass ``engine`` runs from now on."""
    rows: list[int] = []
    real = engine._prefill_batch

    def recorded(seqs):
        rows.append(len(seqs))
        return real(seqs)

    engine._prefill_batch = recorded
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


@pytest.mark.parametrize("wait_ms,first_pass", [(200, 6), (0, 1)])
def test_an_idle_engine_prefills_a_burst_in_one_pass(wait_ms, first_pass):
    """Six requests 5 ms apart: with a wait, one pass of six; without, the first request goes alone."""
    engine = BuiltinEngine(build("llama"), frozenset(), options=BuiltinOptions(prefill_wait_ms=wait_ms))
    rows = passes_of(engine)
    engine.submit(Sequence(random_tokens(8, seed=59), greedy(2)))
    thread = feed(engine, 5, every_s=0.005)
    with torch.inference_mode():
        engine._step()
    thread.join()
    assert rows[0] == first_pass


def test_a_burst_that_does_not_end_waits_only_so_long():
    """Requests keep coming every 10 ms for 1.2 s: the engine starts after at most BURST_WINDOWS
    windows (4 x 40 ms), not when they stop."""
    engine = BuiltinEngine(build("llama"), frozenset(), EngineConfig(max_num_seqs=200),
                           options=BuiltinOptions(prefill_wait_ms=40))
    rows = passes_of(engine)
    engine.submit(Sequence(random_tokens(8, seed=59), greedy(2)))
    thread = feed(engine, 120, every_s=0.01)
    started = time.monotonic()
    with torch.inference_mode():
        engine._await_burst()
        waited = time.monotonic() - started
        engine._step()
    thread.join()
    assert waited < 0.6  # the bound is 0.16 s; the requests went on for 1.2 s
    assert 2 <= rows[0] < 100


def test_full_batch_slots_or_a_running_batch_do_not_wait():
    engine = BuiltinEngine(build("llama"), frozenset(), EngineConfig(max_num_seqs=2),
                           options=BuiltinOptions(prefill_wait_ms=1000))
    rows = passes_of(engine)
    for i in range(2):
        engine.submit(Sequence(random_tokens(8, seed=70 + i), greedy(20)))
    started = time.monotonic()
    with torch.inference_mode():
        engine._step()  # two requests fill both slots: no wait for more
        assert engine._batch is not None
        engine.submit(Sequence(random_tokens(8, seed=72), greedy(2)))
        engine._step()  # a batch runs: its decode step goes on at once
    assert time.monotonic() - started < 0.9
    assert rows == [2]


def test_the_wait_is_the_devices_choice_unless_set():
    model = build("llama")
    assert BuiltinEngine(model, frozenset()).prefill_wait_s == prefill_module.CPU_WAIT_MS / 1000
    assert BuiltinEngine(model, frozenset(), options=BuiltinOptions(prefill_wait_ms=0)).prefill_wait_s == 0
    with pytest.raises(ValueError, match="prefill_wait_ms"):
        BuiltinOptions(prefill_wait_ms=-1)
