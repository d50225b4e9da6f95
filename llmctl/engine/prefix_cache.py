"""Prefix cache: the KV of recently computed token prefixes, so a prompt that starts with one is
prefilled only from where the cached part ends.

Tokens are cut into blocks of ``block_size``; a block is found by a key chained over every block
before it (the hash of the parent's key and the block's own token ids), so one dictionary lookup per
block finds the longest cached prefix, and two prompts share a block only when everything before it
is the same too. A key is a Python hash, which can collide, so each block also keeps its token ids
and its parent's key and a lookup checks both: a collision costs a miss, never a wrong answer.

Each block holds its KV as one tensor whose second-to-last dimension is the block's tokens (the
engine stores every layer's keys and values in it: ``[layers, 2, kv_heads, block_size, head_dim]``).
Blocks are evicted least recently used first. A lookup or an insertion touches its blocks from the
last to the first, so a block is always more recently used than the blocks after it in its chain:
eviction takes the ends of chains first, and a shared beginning (a system prompt) goes last.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from llmctl.engine.batch import Batch, fill_right_aligned
from llmctl.engine.kv import Block, KVLayoutError, Match, SharedPrefix, kv_layers

ROOT = 0  # the parent key of a prompt's first block


class PrefixCache:
    """A bounded, least-recently-used store of KV blocks keyed by their chain of token ids.

    Only the engine thread uses it; it does no locking.
    """

    def __init__(self, capacity_tokens: int, block_size: int = 16) -> None:
        if block_size < 1:
            raise ValueError("block_size must be at least 1")
        if capacity_tokens < 0:
            raise ValueError("capacity_tokens must be 0 or more")
        self.block_size = block_size
        self.capacity = capacity_tokens
        self._blocks: OrderedDict[int, Block] = OrderedDict()
        self.evicted = 0  # blocks evicted so far

    def __len__(self) -> int:
        return len(self._blocks)

    @property
    def enabled(self) -> bool:
        return self.capacity >= self.block_size

    @property
    def tokens(self) -> int:
        """Tokens the cache holds now."""
        return len(self._blocks) * self.block_size

    def keys(self, tokens: list[int], limit: int | None = None, root: int = ROOT) -> Iterator[int]:
        """The chained key of each full block of ``tokens`` (of the first ``limit`` tokens), in order."""
        size = self.block_size
        end = len(tokens) if limit is None else min(limit, len(tokens))
        key = root
        for start in range(0, end - size + 1, size):
            key = hash((key, tuple(tokens[start:start + size])))
            yield key

    def match(self, tokens: list[int], limit: int | None = None, root: int = ROOT) -> Match:
        """The longest run of cached blocks ``tokens`` starts with, within its first ``limit`` tokens (``root``:
        the chain's start, one per LoRA adapter, so that no KV is shared between adapters).

        Costs one tuple, one hash and one dictionary lookup per matched block (and one for the miss).
        The matched blocks become the most recently used. (`llmctl.engine.reproducible.exact_part` keeps
        the part of it a reproducible prefill may take.)
        """
        size = self.block_size
        end = len(tokens) if limit is None else min(limit, len(tokens))
        blocks: list[Block] = []
        parent = root
        next_key = None
        for start in range(0, end - size + 1, size):
            chunk = tuple(tokens[start:start + size])
            key = hash((parent, chunk))
            block = self._blocks.get(key)
            if block is None or block.parent != parent or block.tokens != chunk:
                next_key = key
                break
            blocks.append(block)
            parent = key
        self._touch(blocks)
        return Match(blocks, len(blocks) * size, next_key)

    def gather(self, match: Match, length: int | None = None, gathered: dict | None = None,
               start: int = 0) -> torch.Tensor:
        """The KV of matched tokens ``start:length`` (all of them by default; ``start`` whole blocks) as
        one new tensor.

        ``gathered`` keeps what was gathered by (last block, start, length), a block standing for its
        whole chain: rows of one prefill that continue the same blocks then share one tensor.
        """
        length = match.tokens if length is None else length
        if gathered is not None:
            key = (match.blocks[(length - 1) // self.block_size], start, length)
            if key not in gathered:
                gathered[key] = self.gather(match, length, start=start)
            return gathered[key]
        if not 0 <= start < length <= match.tokens or start % self.block_size:
            raise ValueError(f"cannot gather tokens {start}:{length} from a match of {match.tokens}")
        needed = match.blocks[start // self.block_size:-(-length // self.block_size)]
        kv = torch.cat([b.kv for b in needed], dim=-2) if len(needed) > 1 else needed[0].kv.clone()
        span = length - start
        return kv[..., :span, :] if kv.shape[-2] != span else kv

    def insert(self, tokens: list[int], kv_of: Callable[[int, int], torch.Tensor], room: int | None = None,
               root: int = ROOT, exact: int = 0) -> int:
        """Store the full blocks of ``tokens`` that are not cached yet; returns the tokens added.

        ``kv_of(start, end)`` gives the KV of tokens ``start:end`` (token dimension -2); it is called
        once, for the span of new blocks, and each block keeps a copy of its slice. Afterwards the
        cache holds at most ``min(capacity, room)`` tokens (LRU blocks evicted), and no more blocks of
        ``tokens`` than fit are copied in the first place. The first ``exact`` tokens' KV is exact
        (`Block.exact`): their blocks are marked so, and a cached block that was not takes their KV.
        """
        bound = self.capacity if room is None else min(self.capacity, room)
        size = self.block_size
        usable = min(len(tokens), bound) // size * size
        chain: list[Block] = []
        new: list[tuple[int, int, int, tuple[int, ...]]] = []  # (start, key, parent, tokens)
        upgrades: list[tuple[int, Block]] = []  # (start, block): cached, but not exact, and exact now
        parent = root
        for start in range(0, usable, size):
            chunk = tuple(tokens[start:start + size])
            key = hash((parent, chunk))
            block = self._blocks.get(key)
            if block is None:
                new.append((start, key, parent, chunk))
            elif block.parent != parent or block.tokens != chunk:
                break  # a hash collision with another chain: keep what is cached, stop here
            else:
                if new:
                    break  # cached again after a gap: cannot happen in a consistent chain
                chain.append(block)
                if not block.exact and start + size <= exact:
                    upgrades.append((start, block))
            parent = key
        if new or upgrades:
            first = upgrades[0][0] if upgrades else new[0][0]
            kv = kv_of(first, new[-1][0] + size if new else upgrades[-1][0] + size)
            for start, block in upgrades:
                block.kv, block.exact = kv[..., start - first:start - first + size, :].clone(), True
            for start, key, parent, chunk in new:
                block = Block(key, parent, chunk, kv[..., start - first:start - first + size, :].clone(),
                              exact=start + size <= exact)
                self._blocks[key] = block
                chain.append(block)
        self._touch(chain)
        self.shrink(bound)
        return len(new) * size

    def shrink(self, max_tokens: int) -> int:
        """Evict least recently used blocks until at most ``max_tokens`` tokens remain; returns tokens freed."""
        freed = 0
        while self._blocks and self.tokens > max(0, max_tokens):
            self._blocks.popitem(last=False)
            freed += self.block_size
            self.evicted += 1
        return freed

    def clear(self) -> None:
        self._blocks.clear()

    def _touch(self, chain: list[Block]) -> None:
        for block in reversed(chain):  # the first block ends up most recently used
            if block.key in self._blocks:
                self._blocks.move_to_end(block.key)


def store_rows(prefixes: PrefixCache, batch: Batch, rows: list[int], room: int) -> None:
    """Put the KV of batch rows ``rows`` (every token in their cache so far, a shared prefix's included)
    into ``prefixes``, keeping it within ``room`` tokens; raises KVLayoutError for a cache it cannot store.
    A row's first ``Sequence.exact_tokens`` are stored as exact (`Block.exact`)."""
    width = batch.mask.shape[1]
    own = batch.own_lengths().tolist()
    shared = batch.shared_lengths.tolist() if batch.shared_lengths is not None else [0] * len(batch.seqs)
    for row in rows:
        n, s = own[row], shared[row]  # the row's own tokens sit in the last n columns
        kv_of = functools.partial(row_kv, batch.cache, row, width - n, shared=batch.shared, shared_tokens=s)
        seq = batch.seqs[row]
        prefixes.insert(seq.context_ids[:s + n], kv_of, room, root=seq.cache_root, exact=seq.exact_tokens)


def row_kv(cache: DynamicCache, row: int, offset: int, start: int, end: int, shared: SharedPrefix | None = None,
           shared_tokens: int = 0) -> torch.Tensor:
    """KV of one batch row's tokens ``start:end``, all layers in one tensor
    ``[layers, 2, kv_heads, end - start, head_dim]``: the first ``shared_tokens`` from ``shared``, the
    rest from the row's cache columns from ``offset`` on."""
    layers = kv_layers(cache)
    shapes = {(layer.keys.shape[1:2] + layer.keys.shape[3:], layer.values.shape[1:2] + layer.values.shape[3:])
              for layer in layers}
    if len(shapes) != 1 or len({shape for pair in shapes for shape in pair}) != 1:
        raise KVLayoutError("its layers' key and value tensors differ in shape")
    a, b = offset + max(0, start - shared_tokens), offset + max(0, end - shared_tokens)
    own = torch.stack([torch.stack((layer.keys[row, :, a:b], layer.values[row, :, a:b])) for layer in layers])
    if start >= shared_tokens:
        return own
    if shared is None:
        raise ValueError(f"{shared_tokens} shared tokens without the shared prefix")
    return torch.cat([shared.kv[..., start:min(end, shared_tokens), :], own], dim=-2)


def prefix_rows_cache(prefixes: list[torch.Tensor | None], room: int = 0) -> DynamicCache:
    """A cache of full layers holding each row's prefix KV right-aligned (left-padded with zeros),
    with ``room`` columns after it for the tokens the prefill adds.

    ``prefixes`` are tensors from `row_kv` or `PrefixCache.gather` (None: a row without a prefix).
    The prefill writes its tokens into the room (`PrefilledLayer`) instead of concatenating them to
    the cache, so each row's prefix is copied once, straight into its final place, whether rows
    share one prefix (an agent's requests after one system prompt) or not.
    """
    present = [p for p in prefixes if p is not None]
    first = present[0]
    layers, _, kv_heads, _, head_dim = first.shape
    width = max(p.shape[-2] for p in present)
    kv = first.new_empty((layers, 2, len(prefixes), kv_heads, width + room, head_dim))
    for row, prefix in enumerate(prefixes):
        fill_right_aligned(kv[:, :, row, :, :width], prefix)
    cache = DynamicCache()
    for layer_kv in kv.unbind(0):
        cache.layers.append(PrefilledLayer(layer_kv[0], layer_kv[1], room))
    return cache


class PrefilledLayer(DynamicLayer):
    """A cache layer that already holds a prefix and has ``room`` columns after it for the next
    update, which it writes in place (DynamicLayer would concatenate: one more copy of the prefix).
    Later updates concatenate as usual."""

    # Set when it is made (DynamicLayer's are None until its first update, and after a reset, which the engine's
    # caches never get).
    keys: torch.Tensor
    values: torch.Tensor

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        self.lazy_initialization(keys, values)
        self.keys, self.values, self.room = keys, values, room

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.room:
            return super().update(key_states, value_states, *args, **kwargs)
        if key_states.shape[-2] != self.room:
            raise ValueError(f"this layer has room for {self.room} new tokens, not {key_states.shape[-2]}")
        self.keys[:, :, -self.room:].copy_(key_states)
        self.values[:, :, -self.room:].copy_(value_states)
        self.room = 0
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return super().get_seq_length() - self.room
