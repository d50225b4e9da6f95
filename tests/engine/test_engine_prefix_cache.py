"""The engine with its prefix cache: the same greedy tokens as without it, on several architectures
(sliding-window ones among them); a shared prefix computed once for 16 requests that arrive
together; a conversation's next turn served from its history; the size bound and the KV budget.

Models are tiny random ones built from a config; the reference is the engine with the cache off and
a greedy loop without any cache.
"""

from __future__ import annotations

import pytest
import torch

from llmctl.engine import BuiltinEngine, EngineConfig, Sequence
from llmctl.engine.reproducible import CHUNK_TOKENS
from tests.engine.test_engine_architectures import CONFIGS, VOCAB, build, drain, greedy, reference, run_in_steps

BLOCK = 16


def random_tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def serve(model, schedule: dict[int, list[Sequence]], **config) -> BuiltinEngine:
    engine = BuiltinEngine(model, frozenset(), EngineConfig(**config))
    run_in_steps(engine, schedule, max_steps=1000)
    return engine


@pytest.mark.parametrize("name", list(CONFIGS))
def test_requests_served_from_the_cache_give_the_tokens_they_give_without_it(name):
    """A shared 40-token prefix (longer than the sliding windows of 12), suffixes of several lengths
    prefilled together with different cached lengths, and a second turn that resends the first."""
    model = build(name)
    prefix = random_tokens(40, seed=1)
    prompts = [prefix + random_tokens(n, seed=10 + n) for n in (1, 5, 23)]
    results = {}
    for capacity in (0, 4096):
        first = Sequence(list(prompts[0]), greedy())
        others = [Sequence(list(p), greedy()) for p in prompts[1:]]
        engine = serve(model, {0: [first], 3: others}, prefix_cache_tokens=capacity)
        answers = [drain(s) for s in [first, *others]]
        turn = prompts[0] + answers[0][0] + random_tokens(7, seed=99)
        second = Sequence(turn, greedy())
        run_in_steps(engine, {0: [second]}, max_steps=1000)
        results[capacity] = (answers + [drain(second)], [s.cached_tokens for s in [first, *others, second]],
                             engine.stats)
    (off, off_cached, off_stats), (on, on_cached, on_stats) = results[0], results[4096]
    assert on == off
    assert [tokens for tokens, _ in on[:1]] == [reference(model, prompts[0])]
    assert off_cached == [0, 0, 0, 0] and off_stats.prefix_cache_queries == 0
    # Prefilled together, both rows feed the 31 uncached tokens of the longer one: it takes the
    # prefix's two whole blocks from the cache, the shorter one 14 tokens, so nothing is left between.
    assert on_cached[0] == 0 and on_cached[1:3] == [14, 32]
    # The second turn, prefilled alone, takes only whole reproducible chunks of exact KV (engine/reproducible.py):
    # the first turn's 41 tokens are less than one chunk, and its answer's KV came from decode steps.
    assert len(turn) < CHUNK_TOKENS and on_cached[3] == 0
    assert on_stats.prefix_cache_hits == sum(on_cached)
    assert on_stats.prefill_tokens == off_stats.prefill_tokens - sum(on_cached)


def test_sixteen_requests_with_the_same_long_prefix_compute_it_once():
    model = build("llama")
    prefix = random_tokens(200, seed=3)
    prompts = [prefix + random_tokens(5, seed=100 + i) for i in range(16)]
    answers, stats = {}, {}
    for capacity in (0, 8192):
        seqs = [Sequence(list(p), greedy(8)) for p in prompts]
        # Budgets large enough that all 16 would be prefilled together in one step.
        engine = serve(model, {0: seqs}, prefix_cache_tokens=capacity, max_batched_tokens=8192)
        answers[capacity], stats[capacity] = [drain(s) for s in seqs], engine.stats
    assert answers[8192] == answers[0]
    assert stats[0].prefill_tokens == 16 * 205
    # The first request computes the prefix; the 15 others take its 192 cached tokens (12 whole
    # blocks) and compute the remaining 13 each.
    assert stats[8192].prefill_tokens == 205 + 15 * 13
    assert stats[8192].prefix_cache_hits == 15 * 192


def test_the_cache_keeps_to_its_bound_evicting_the_least_recently_used():
    model = build("llama")
    system = random_tokens(CHUNK_TOKENS, seed=4)
    engine = BuiltinEngine(model, frozenset(), EngineConfig(prefix_cache_tokens=CHUNK_TOKENS + 64))
    sizes = []
    for i in range(6):
        seq = Sequence(system + random_tokens(40, seed=200 + i), greedy(4))
        run_in_steps(engine, {0: [seq]})
        sizes.append(engine.stats.prefix_cache_tokens)
        assert seq.cached_tokens == (0 if i == 0 else CHUNK_TOKENS)  # the shared beginning survives eviction
    assert max(sizes) == CHUNK_TOKENS + 64 == engine._prefix.tokens
    assert engine._prefix.evicted > 0


def test_cached_prefixes_give_way_to_running_rows_within_the_kv_budget():
    """The cache counts against --kv-cache-tokens: when running rows need the room, it shrinks."""
    model = build("llama")
    engine = BuiltinEngine(model, frozenset(), EngineConfig(kv_cache_tokens=200, prefix_cache_tokens=200))
    run_in_steps(engine, {0: [Sequence(random_tokens(150, seed=5), greedy(2))]})
    assert engine.stats.prefix_cache_tokens == 144
    seen, cached = [], []
    real_decode = engine._decode

    def decode():
        real_decode()
        if engine._batch is not None:
            rows = len(engine._batch.seqs) * engine._batch.mask.shape[1]
            seen.append(rows + engine._prefix.tokens)
            cached.append(engine._prefix.tokens)

    engine._decode = decode
    grows = Sequence(random_tokens(20, seed=6), greedy(100))
    run_in_steps(engine, {0: [grows]})
    assert len(drain(grows)[0]) == 100
    assert seen and max(seen) <= 200
    assert cached[0] == 160 and min(cached) < 144  # 144 + the new prompt's block; it gave way as the row grew


def test_zero_disables_the_cache():
    model = build("llama")
    prompt = random_tokens(40, seed=7)
    seqs = [Sequence(list(prompt), greedy(4)) for _ in range(2)]
    engine = serve(model, {0: seqs[:1], 6: seqs[1:]}, prefix_cache_tokens=0)
    assert engine._prefix is None
    assert [s.cached_tokens for s in seqs] == [0, 0]
    stats = engine.stats
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits, stats.prefix_cache_tokens) == (0, 0, 0)
    assert stats.prefill_tokens == 80


def test_requests_waiting_for_a_shared_prefix_are_prefilled_in_the_same_step_within_its_budget():
    """The first request computes the prefix; what is left of the step's prefill budget goes to the
    others, which now find it cached: all get their first token before any decode step. A budget
    the first prefill uses up leaves them for the next step."""
    model = build("llama")
    prefix = random_tokens(200, seed=5)
    for budget, first_step in ((1024, 1), (205, 2)):
        seqs = [Sequence(prefix + random_tokens(5, seed=200 + i), greedy(4)) for i in range(4)]
        engine = BuiltinEngine(model, frozenset(),
                               EngineConfig(prefix_cache_tokens=4096, max_batched_tokens=budget))
        with torch.inference_mode():
            for seq in seqs:
                engine.submit(seq)
            engine._step()  # prefill(s), then one decode step for every row in the batch
            assert [s.generated for s in seqs] == ([2, 2, 2, 2] if first_step == 1 else [2, 0, 0, 0])
            assert engine.stats.prefill_tokens == (205 + 3 * 13 if first_step == 1 else 205)
            engine._step()
        assert all(s.generated >= 2 for s in seqs) and seqs[1].cached_tokens == 192
