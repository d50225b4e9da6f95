"""The prefix cache on its own: matching by token ids, the size bound, LRU eviction, hash collisions."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from llmctl.engine import prefix_cache
from llmctl.engine.prefix_cache import PrefixCache


def kv_for(tokens: list[int]):
    """A fake KV whose value at token i is the token id, so a gathered tensor shows which tokens it holds."""
    full = torch.tensor(tokens, dtype=torch.float32)[None, :, None].expand(2, len(tokens), 3).contiguous()
    calls = []

    def kv_of(start: int, end: int) -> torch.Tensor:
        calls.append((start, end))
        return full[:, start:end, :]

    return kv_of, calls


def held(kv: torch.Tensor) -> list[int]:
    return [int(v) for v in kv[0, :, 0]]


def test_a_prompt_finds_the_longest_cached_prefix_in_whole_blocks():
    cache = PrefixCache(capacity_tokens=1024, block_size=4)
    stored = list(range(100, 118))  # 4 full blocks and 2 tokens that are not stored
    kv_of, calls = kv_for(stored)
    assert cache.insert(stored, kv_of) == 16
    assert calls == [(0, 16)] and cache.tokens == 16
    match = cache.match(stored[:10] + [1, 2, 3, 4, 5, 6])
    assert match.tokens == 8  # the third block differs from token 10 on
    assert held(cache.gather(match)) == stored[:8]
    assert held(cache.gather(match, 6)) == stored[:6]
    assert cache.match([7] + stored[1:]).tokens == 0  # the first token differs: nothing matches
    assert cache.match(stored, limit=15).tokens == 12  # the caller keeps the last token to prefill
    with pytest.raises(ValueError):
        cache.gather(match, 9)


def test_the_same_block_after_a_different_beginning_is_not_a_match():
    cache = PrefixCache(capacity_tokens=1024, block_size=4)
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], kv_for([1, 2, 3, 4, 5, 6, 7, 8])[0])
    assert cache.match([9, 9, 9, 9, 5, 6, 7, 8]).tokens == 0


def test_inserting_a_longer_sequence_copies_only_its_new_blocks():
    cache = PrefixCache(capacity_tokens=1024, block_size=4)
    prompt = list(range(12))
    cache.insert(prompt, kv_for(prompt)[0])
    history = prompt + list(range(50, 59))  # the prompt, then what was generated
    kv_of, calls = kv_for(history)
    assert cache.insert(history, kv_of) == 8
    assert calls == [(12, 20)]
    match = cache.match(history + [1, 2, 3])
    assert match.tokens == 20 and held(cache.gather(match)) == history[:20]


def test_the_bound_evicts_least_recently_used_blocks_and_keeps_shared_beginnings():
    cache = PrefixCache(capacity_tokens=16, block_size=4)
    system = [1, 2, 3, 4, 5, 6, 7, 8]
    first, second = system + [10, 11, 12, 13], system + [20, 21, 22, 23]
    cache.insert(first, kv_for(first)[0])
    cache.insert(second, kv_for(second)[0])
    assert cache.tokens == 16  # the shared two blocks once, plus one block of each
    third = system + [30, 31, 32, 33]
    cache.insert(third, kv_for(third)[0])
    assert cache.tokens == 16 and cache.evicted == 1
    assert cache.match(first).tokens == 8  # the oldest chain end went; the shared beginning stayed
    assert cache.match(second).tokens == 12 and cache.match(third).tokens == 12


def test_a_lookup_makes_a_chain_recently_used():
    cache = PrefixCache(capacity_tokens=16, block_size=4)
    a, b = [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16]
    cache.insert(a, kv_for(a)[0])
    cache.insert(b, kv_for(b)[0])
    cache.match(a)  # a is now more recent than b
    c = [20, 21, 22, 23, 24, 25, 26, 27]
    cache.insert(c, kv_for(c)[0])
    assert cache.match(a).tokens == 8 and cache.match(b).tokens == 0 and cache.match(c).tokens == 8


def test_room_below_the_capacity_limits_what_is_stored_and_shrink_frees_space():
    cache = PrefixCache(capacity_tokens=64, block_size=4)
    tokens = list(range(40))
    kv_of, calls = kv_for(tokens)
    assert cache.insert(tokens, kv_of, room=10) == 8  # two whole blocks fit in 10 tokens
    assert calls == [(0, 8)] and cache.tokens == 8
    assert cache.shrink(5) == 4 and cache.tokens == 4
    assert cache.match(tokens).tokens == 4
    assert cache.shrink(0) == 4 and cache.tokens == 0 and len(cache) == 0


def test_zero_capacity_stores_nothing():
    cache = PrefixCache(capacity_tokens=0, block_size=4)
    kv_of, calls = kv_for(list(range(8)))
    assert not cache.enabled
    assert cache.insert(list(range(8)), kv_of) == 0 and calls == [] and cache.tokens == 0


def test_a_hash_collision_is_a_miss_not_someone_elses_kv(monkeypatch):
    """Every key collides: a lookup must compare token ids and refuse the other prompt's block."""
    monkeypatch.setattr(prefix_cache, "hash", lambda value: 7, raising=False)
    cache = PrefixCache(capacity_tokens=64, block_size=2)
    cache.insert([1, 2], kv_for([1, 2])[0])
    assert cache.match([3, 4]).tokens == 0
    assert cache.insert([3, 4], kv_for([3, 4])[0]) == 0  # the cached block stays
    assert cache.match([1, 2]).tokens == 2


def test_keys_give_the_first_uncached_block_of_a_match():
    cache = PrefixCache(capacity_tokens=64, block_size=4)
    tokens = list(range(13))
    cache.insert(tokens[:4], kv_for(tokens[:4])[0])
    keys = list(cache.keys(tokens))
    assert len(keys) == 3 and len(set(keys)) == 3
    assert cache.match(tokens).next_key == keys[1]
    assert list(cache.keys(tokens, limit=8)) == keys[:2]


class CountingBlocks(OrderedDict):
    """The cache's block table, counting the lookups and the walks over it that a match makes."""

    lookups = walks = 0

    def get(self, key, default=None):
        self.lookups += 1
        return super().get(key, default)

    def __getitem__(self, key):
        self.lookups += 1
        return super().__getitem__(key)

    def __iter__(self):
        self.walks += 1
        return super().__iter__()

    def values(self):
        self.walks += 1
        return super().values()

    def items(self):
        self.walks += 1
        return super().items()


def test_a_lookup_costs_one_dictionary_lookup_per_block():
    """A guard against a lookup that scans the cache, counted rather than timed (speed targets are in scripts/)."""
    cache = PrefixCache(capacity_tokens=1 << 20, block_size=16)
    for n in range(200):
        tokens = [n] + list(range(1, 2048))
        cache.insert(tokens, lambda s, e: torch.zeros(1, e - s, 1))
    cache._blocks = counted = CountingBlocks(cache._blocks)
    assert cache.match(list(range(5000, 7000))).tokens == 0
    assert (counted.lookups, counted.walks) == (1, 0)
    counted.lookups = 0
    hit = [7] + list(range(1, 100)) + [9999] * 20  # 6 cached blocks of 16, then a block not cached
    assert cache.match(hit).tokens == 96
    assert (counted.lookups, counted.walks) == (7, 0)


def layer_kv(tokens: list[int], layers: int = 2) -> torch.Tensor:
    """A [layers, 2, kv_heads, tokens, head_dim] KV whose value at token i is the token id (layer l: id + 1000 l)."""
    ids = torch.tensor(tokens, dtype=torch.float32)
    return torch.stack([torch.stack([ids + 1000 * layer, -(ids + 1000 * layer)]) for layer in range(layers)]
                       )[:, :, None, :, None].expand(layers, 2, 3, len(tokens), 4).contiguous()


def test_rows_cache_right_aligns_each_prefix_and_the_prefill_writes_into_its_room():
    a, b = layer_kv([1, 2, 3, 4]), layer_kv([7, 8])
    cache = prefix_cache.prefix_rows_cache([a, None, b], room=2)
    layer = cache.layers[1]
    assert layer.get_seq_length() == 4 and cache.get_seq_length() == 4  # the room is not counted yet
    new = torch.full((3, 3, 2, 4), 9.0)
    before = layer.keys.data_ptr()
    keys, values = layer.update(new, -new)
    assert keys.data_ptr() == before  # written in place, not concatenated
    assert keys[:, 0, :, 0].tolist() == [[1001, 1002, 1003, 1004, 9, 9], [0, 0, 0, 0, 9, 9],
                                         [0, 0, 1007, 1008, 9, 9]]
    assert values[2, 0, :, 0].tolist() == [0, 0, -1007, -1008, -9, -9]
    assert layer.get_seq_length() == 6
    keys, _ = layer.update(new[:, :, :1], -new[:, :, :1])  # later steps append as usual
    assert keys.shape == (3, 3, 7, 4)
    shared = prefix_cache.prefix_rows_cache([a, a])
    assert shared.layers[0].keys[:, 0, :, 0].tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]


def test_exact_kv_is_marked_upgrades_what_was_not_and_is_taken_in_whole_chunks():
    """Blocks within a reproducible prefill's exact tokens are marked exact; storing exact KV over a block that
    was not replaces its KV; a reproducible prefill takes only leading exact blocks, in whole chunks."""
    from llmctl.engine.reproducible import exact_part

    cache = PrefixCache(capacity_tokens=1024, block_size=4)
    tokens = list(range(200, 220))  # five blocks
    kv_of, _ = kv_for(tokens)
    cache.insert(tokens, kv_of)  # a batched prefill's KV: not exact
    match = cache.match(tokens)
    assert [b.exact for b in match.blocks] == [False] * 5 and exact_part(match, 4, chunk=8) is None
    exact = [t * 10 for t in tokens]  # other values, to see which KV a block keeps
    exact_kv, calls = kv_for(exact)
    assert cache.insert(tokens, exact_kv, exact=12) == 0  # nothing new, three blocks upgraded
    assert calls == [(0, 12)]
    match = cache.match(tokens)
    assert [b.exact for b in match.blocks] == [True, True, True, False, False]
    assert held(match.blocks[2].kv) == exact[8:12] and held(match.blocks[3].kv) == tokens[12:16]
    part = exact_part(match, 4, chunk=8)  # three exact blocks, one whole chunk of 8 tokens
    assert part is not None and part.tokens == 8 and part.blocks == match.blocks[:2]
