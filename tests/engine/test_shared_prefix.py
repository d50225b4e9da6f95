"""Shared prefixes: running rows that start with the same cached tokens read one copy of their KV.

Tensor level: `attend_with_shared` against transformers' SDPA over each row's prefix and own keys
concatenated. Engine level, on tiny random models: rows reading a shared prefix (several read
lengths, rows joining one that exists, rows reading none beside them, n > 1, preemption, a next
turn stored from a reader's KV) give the tokens the engine gives with the prefix cache off; sliding
windows switch sharing off; the batch bookkeeping; the prefill pass size.
"""

from __future__ import annotations

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from llmctl.engine import BuiltinEngine, EngineConfig, SamplingParams, Sequence
from llmctl.engine import prefill as prefill_module
from llmctl.engine.attention import attend_with_shared
from llmctl.engine.batch import Batch, merge, prefill_inputs, prefill_plan, select_rows
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.kv import SharedPrefix, SharedView
from llmctl.engine.shared import has_sliding_window
from tests.engine.test_attention import DIM, KV_HEADS, additive, left_padded_mask, module, qkv
from tests.engine.test_engine_architectures import CONFIGS, build, drain, greedy, run_in_steps
from tests.engine.test_engine_prefix_cache import random_tokens

PREFIX = 24


def reference_rows(q, k, v, mask, prefix_kv, reads):
    """Each row alone through SDPA, its keys the first reads[r] prefix tokens followed by its own."""
    out = []
    for row, n in enumerate(reads):
        keys = torch.cat([prefix_kv[0, :, :n], k[row]], dim=1)[None]
        values = torch.cat([prefix_kv[1, :, :n], v[row]], dim=1)[None]
        row_mask = torch.cat([torch.ones(1, q.shape[2], n, dtype=torch.bool), mask[row]], dim=-1)[None]
        out.append(sdpa_attention_forward(module(), q[row:row + 1], keys, values, row_mask, scaling=DIM ** -0.5)[0])
    return torch.cat(out)


@pytest.mark.parametrize("queries,keys,padding,causal_only", [
    (1, 10, [0, 4, 9, 2], False),   # decode: one token over each row's own (left-padded) cache
    (5, 9, [0, 3, 4, 0], False),    # prefill of 5 tokens after 4 cached ones of the row's own
    (6, 6, [0, 0, 0, 0], True),     # prefill without padding: no mask at all, the function makes it causal
])
def test_attention_with_a_shared_prefix_is_attention_over_prefix_and_own_keys(queries, keys, padding, causal_only):
    q, k, v = qkv(len(padding), queries, keys, seed=3)
    prefix_kv = torch.randn(2, KV_HEADS, PREFIX, DIM, generator=torch.Generator().manual_seed(4))
    reads = [16, PREFIX, 0, PREFIX]  # rows 1 and 3 read the whole prefix, row 0 part of it, row 2 none
    view = SharedView.of(SharedPrefix([], prefix_kv[None]), torch.tensor(reads))
    assert [(rows.tolist(), n) for rows, n in view.groups] == [([0], 16), ([1, 3], PREFIX)]
    mask = left_padded_mask(len(padding), queries, keys, padding)
    got = attend_with_shared(q, k, v, None if causal_only else additive(mask), DIM ** -0.5, view, layer=0)
    expected = reference_rows(q, k, v, mask, prefix_kv, reads)
    seen = mask.any(-1)[:, 0]  # padding queries see nothing of their own: garbage either way
    assert torch.allclose(got[seen], expected[seen], atol=1e-5)
    assert view.layers == {0}


def test_a_bfloat16_prefix_matches_within_rounding():
    q, k, v = (t.bfloat16() for t in qkv(2, 3, 7, seed=5))
    prefix_kv = torch.randn(2, KV_HEADS, PREFIX, DIM, generator=torch.Generator().manual_seed(6)).bfloat16()
    view = SharedView.of(SharedPrefix([], prefix_kv[None]), torch.tensor([PREFIX, 8]))
    mask = left_padded_mask(2, 3, 7, [0, 2])
    got = attend_with_shared(q, k, v, additive(mask), DIM ** -0.5, view, layer=0)
    expected = reference_rows(q.float(), k.float(), v.float(), mask, prefix_kv.float(), [PREFIX, 8])
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), expected, atol=3e-2)


@pytest.fixture
def share_early(monkeypatch):
    """Rows share prefixes of 16 tokens or more (the engine's threshold is for real prompts)."""
    monkeypatch.setattr(prefill_module.Prefills, "share_min_tokens", 16)


def run(engine: BuiltinEngine, schedule: dict[int, list[Sequence]]) -> list[tuple[list[int], SharedPrefix]]:
    """`run_in_steps`, noting after every step each running row's shared-prefix read and the prefix itself."""
    seen: list[tuple[list[int], SharedPrefix]] = []
    real_step = engine._step

    def step():
        real_step()
        batch = engine._batch
        if batch is not None and batch.shared is not None:
            seen.append((batch.shared_lengths.tolist(), batch.shared))

    engine._step = step
    try:
        run_in_steps(engine, schedule, max_steps=1000)
    finally:
        del engine._step
    return seen


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_rows_reading_a_shared_prefix_give_the_tokens_they_give_without_the_cache(name, share_early):
    """A 48-token system prompt: one request computes it while an unrelated one is prefilled beside
    it; a second reads all of it as the shared prefix, later ones join that prefix (one of them with
    n = 2), one reads only its first 32 tokens, and a next turn of a reader comes from the cache
    (its stored KV the shared prefix's and its own, joined)."""
    model = build(name)
    system = random_tokens(48, seed=1)
    prompts = {"first": system + random_tokens(3, seed=2), "unrelated": random_tokens(20, seed=3),
               "reader": system + random_tokens(9, seed=4), "joins": system + random_tokens(20, seed=5),
               "forked": system + random_tokens(2, seed=6), "part": system[:32] + random_tokens(25, seed=7)}
    results, cached, reads = {}, {}, {}
    for capacity in (0, 4096):
        seqs = {key: Sequence(list(p), greedy()) for key, p in prompts.items()}
        forks = seqs["forked"].fork(2)
        engine = BuiltinEngine(model, frozenset(), EngineConfig(prefix_cache_tokens=capacity))
        assert engine._share == bool(capacity)
        seen = run(engine, {0: [seqs["first"], seqs["unrelated"], seqs["reader"]], 4: [seqs["joins"], seqs["forked"]],
                            6: [seqs["part"]]})
        answers = {key: drain(s) for key, s in seqs.items()} | {"fork": drain(forks[1])}
        turn = prompts["reader"] + answers["reader"][0] + random_tokens(5, seed=8)
        # Beside another request, so that it is prefilled in a pass that takes every cached block (one alone
        # takes only whole reproducible chunks of exact KV: engine/reproducible.py).
        second, other = Sequence(turn, greedy()), Sequence(random_tokens(5, seed=9), greedy())
        run_in_steps(engine, {0: [second, other]}, max_steps=1000)
        results[capacity], reads[capacity] = answers | {"second": drain(second), "other": drain(other)}, seen
        cached[capacity] = {key: s.cached_tokens for key, s in seqs.items()} | {"second": second.cached_tokens}
    assert results[4096] == results[0]
    assert results[0]["fork"] == results[0]["forked"]
    assert not reads[0]
    read_lengths = {n for lengths, _ in reads[4096] for n in lengths}
    # Rows of none, readers of the whole prompt, of its first 32 tokens, and of 16: prefilled with
    # "joins" (20 tokens to feed), "forked" feeds 20 too and so reads only the 30 before them (one block).
    assert read_lengths == {0, 16, 32, 48}
    assert len({id(prefix) for _, prefix in reads[4096]}) == 1  # one prefix, from the first reader to the last
    assert cached[4096]["second"] == (len(prompts["reader"]) + 30) // 16 * 16
    assert cached[4096]["part"] == 32 and cached[4096]["joins"] == 48


@pytest.mark.parametrize("name", [n for n in CONFIGS if n.endswith("sliding")])
def test_sliding_window_models_do_not_share(name, share_early):
    """A prefix token may fall out of a row's window: such models keep copying cached prefixes."""
    model = build(name)
    assert has_sliding_window(model.config)
    engine = BuiltinEngine(model, frozenset(), EngineConfig())
    assert not engine._share


def test_a_model_whose_layers_do_not_pass_the_prefix_on_does_not_share(share_early, monkeypatch):
    """The probe: attention that never sees the engine's argument (here: it is dropped on the way)."""
    model = build("llama")
    real_forward = model.model.forward

    def forward(*args, shared_prefix=None, **kwargs):
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(model.model, "forward", forward)
    assert not BuiltinEngine(model, frozenset(), EngineConfig())._share
    assert BuiltinEngine(build("llama"), frozenset(), EngineConfig())._share


def test_preempted_readers_resume_with_the_same_tokens(share_early, monkeypatch):
    """A KV budget too small for every row: the newest readers are preempted, prefilled again later
    (reading the shared prefix again, or a new one once the first is gone) and answer as alone."""
    monkeypatch.setattr(prefill_module, "ADMIT_HEADROOM", 8)  # admit more rows than fit at full length
    model = build("llama")
    system = random_tokens(32, seed=11)
    prompts = [system + random_tokens(n, seed=20 + n) for n in (1, 4, 9, 14)]
    alone = []
    for prompt in prompts:
        seq = Sequence(list(prompt), greedy())
        run_in_steps(BuiltinEngine(model, frozenset(), EngineConfig(prefix_cache_tokens=0)), {0: [seq]})
        alone.append(drain(seq))
    engine = BuiltinEngine(model, frozenset(), EngineConfig(kv_cache_tokens=200))
    seqs = [Sequence(list(p), greedy()) for p in prompts]
    seen = run(engine, {0: seqs[:1], 1: seqs[1:]})
    assert engine.stats.preemptions >= 1
    assert any(32 in lengths for lengths, _ in seen)
    assert [drain(s) for s in seqs] == alone


def test_a_prefix_is_dropped_with_its_last_reader_and_a_new_one_made_later(share_early):
    model = build("llama")
    system = random_tokens(32, seed=12)
    engine = BuiltinEngine(model, frozenset(), EngineConfig())
    waves = [[Sequence(system + random_tokens(3, seed=30 + i + 5 * wave), greedy(4)) for i in range(3)]
             for wave in range(2)]
    first = run(engine, {0: waves[0][:1], 1: waves[0][1:]})
    assert engine._batch is None
    second = run(engine, {0: waves[1]})
    assert first and second and {id(p) for _, p in first}.isdisjoint({id(p) for _, p in second})


def batch_of(rows: int, width: int, shared: SharedPrefix | None = None, reads: list[int] | None = None) -> Batch:
    cache = torch.zeros(rows, 1, width, 1)
    batch = Batch(seqs=[Sequence([1], greedy()) for _ in range(rows)], cache=_cache(cache),
                  mask=torch.ones(rows, width, dtype=torch.long),
                  positions=torch.full((rows,), width) + torch.tensor(reads or [0] * rows), last=torch.zeros(rows))
    if shared is not None:
        batch.shared, batch.shared_lengths = shared, torch.tensor(reads)
    return batch


def _cache(tensor: torch.Tensor):
    from llmctl.engine.batch import full_cache

    cache = full_cache()
    cache.update(tensor.clone(), tensor.clone(), 0)
    return cache


def test_batch_bookkeeping_counts_the_prefix_once_and_drops_it_with_its_last_reader():
    prefix = SharedPrefix([], torch.zeros(1, 2, 1, 10, 1))
    batch = batch_of(3, 4, prefix, [10, 0, 10])
    assert batch.kv_slots == 3 * 4 + 10
    assert batch.own_lengths().tolist() == [4, 4, 4]
    merged = merge(batch, batch_of(2, 4))
    assert merged.shared_lengths.tolist() == [10, 0, 10, 0, 0] and merged.shared is prefix
    select_rows(merged, [1, 2, 3])
    assert merged.shared_lengths.tolist() == [0, 10, 0]
    select_rows(merged, [0, 2])
    assert merged.shared is None and merged.shared_lengths is None and merged.kv_slots == 2 * 4
    with pytest.raises(ValueError, match="different shared prefixes"):
        merge(batch_of(1, 4, prefix, [10]), batch_of(1, 4, SharedPrefix([], prefix.kv.clone()), [10]))


def test_prefill_inputs_put_positions_after_the_shared_part():
    contexts = [list(range(40)), list(range(30))]
    fed, used = prefill_plan([40, 30], [32, 16])
    assert (fed, used) == (14, [26, 16])
    ids, mask, positions = prefill_inputs(contexts, used, fed, torch.device("cpu"), shared=[16, 16])
    assert ids[0].tolist() == list(range(26, 40)) and ids[1].tolist() == list(range(16, 30))
    # Row 0 holds cached tokens 16..25 itself (10 columns), row 1 none: mask over own cache + fed tokens.
    assert mask.tolist() == [[1] * 24, [0] * 10 + [1] * 14]
    assert positions.tolist() == [list(range(26, 40)), list(range(16, 30))]


@pytest.mark.parametrize("pass_tokens,passes", [(None, 1), (32, 2)])
def test_a_step_prefills_in_passes_of_at_most_max_prefill_tokens(pass_tokens, passes):
    """Six 10-token prompts arriving together: one pass of 60 tokens, or passes of at most 32 (3 rows);
    a prompt longer than the pass size still gets one of its own."""
    model = build("llama")
    engine = BuiltinEngine(model, frozenset(), options=BuiltinOptions(max_prefill_tokens=pass_tokens))
    assert engine.prefill_pass_tokens == (256 if pass_tokens is None else pass_tokens)
    seqs = [Sequence(random_tokens(10, seed=40 + i), greedy(5)) for i in range(6)]
    with torch.inference_mode():
        for seq in seqs:
            engine.submit(seq)
        engine._step()
        assert engine.stats.prefills == passes and engine._batch is not None and len(engine._batch.seqs) == 6
        long = engine.submit(Sequence(random_tokens(100, seed=50), greedy(2)))
        engine._step()
    assert engine.stats.prefills == passes + 1 and long.generated >= 1


def test_max_prefill_tokens_is_checked():
    with pytest.raises(ValueError, match="max_prefill_tokens"):
        BuiltinOptions(max_prefill_tokens=0)
    assert BuiltinEngine(build("llama"), frozenset(), EngineConfig(max_batched_tokens=512),
                         options=BuiltinOptions(max_prefill_tokens=4096)).prefill_pass_tokens == 512


def test_sampled_readers_keep_their_seeds(share_early):
    """Seeded sampling is per row: a reader of the shared prefix samples what it samples without it."""
    model = build("llama")
    system = random_tokens(32, seed=13)
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True)
    answers = []
    for capacity in (0, 4096):
        seqs = [Sequence(system + random_tokens(4, seed=60 + i), params) for i in range(3)]
        run(BuiltinEngine(model, frozenset(), EngineConfig(prefix_cache_tokens=capacity)), {0: seqs[:1], 1: seqs[1:]})
        answers.append([drain(s) for s in seqs])
    assert answers[0] == answers[1]
