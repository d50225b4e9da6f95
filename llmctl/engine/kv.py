"""KV pieces the batch, the prefix cache, a shared prefix and attention all use, kept below them all."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, TypeGuard

import torch
from transformers import DynamicCache


class KVLayoutError(ValueError):
    """The model's cache is not one key and one value tensor of the same shape in every layer."""


class KVLayer(Protocol):
    """A full-attention cache layer once the model has filled it: keys and values [rows, kv_heads, tokens,
    head_dim]. transformers types a layer's tensors as optional (None until its first update) and a cache's
    layers as possibly linear-attention ones, which have neither."""

    keys: torch.Tensor
    values: torch.Tensor


def _filled(layer: object) -> TypeGuard[KVLayer]:
    return isinstance(getattr(layer, "keys", None), torch.Tensor) and \
        isinstance(getattr(layer, "values", None), torch.Tensor)


def kv_layers(cache: DynamicCache) -> list[KVLayer]:
    """The layers of a cache the model has filled, as the engine makes them (full attention layers: see
    `llmctl.engine.batch.full_cache`); KVLayoutError for a layer without a key and a value tensor."""
    layers = [layer for layer in cache.layers if _filled(layer)]
    if len(layers) != len(cache.layers):
        raise KVLayoutError("a layer of its cache holds no key and value tensors")
    return layers


@dataclass(eq=False)
class Block:
    """One cached block: its token ids, the key of the block before it, and its KV."""

    key: int
    parent: int
    tokens: tuple[int, ...]
    kv: torch.Tensor  # [..., block_size, head_dim]
    # Computed by a reproducible prefill (`llmctl.engine.reproducible`): what a cold prefill of these
    # tokens computes, to the bit. Other KV (a batched prefill's, a decode step's) is reused only by prefills
    # whose result may depend on their batch anyway.
    exact: bool = False


@dataclass
class Match:
    """The cached blocks a token sequence starts with, and the key of its first block not cached."""

    blocks: list[Block]
    tokens: int  # tokens covered by ``blocks``
    next_key: int | None  # None: no further full block to look up


@dataclass(eq=False)
class SharedPrefix:
    """KV of the first ``tokens`` tokens of a chain of cached ``blocks``: ``kv`` is
    ``[layers, 2, kv_heads, tokens, head_dim]``, one copy for every member row."""

    blocks: list[Block]
    kv: torch.Tensor

    @property
    def tokens(self) -> int:
        return self.kv.shape[-2]

    def common(self, match: Match, limit: int, block_size: int) -> int:
        """Tokens a row whose prefix-cache match is ``match`` shares with this prefix, within its
        first ``limit`` tokens (whole blocks: chained keys make block k equal only if all before are)."""
        blocks = match.blocks[:min(len(self.blocks), limit // block_size)]
        low, high = 0, len(blocks)  # the longest run of identical leading blocks: binary search
        while low < high:
            mid = (low + high + 1) // 2
            if blocks[mid - 1] is self.blocks[mid - 1]:
                low = mid
            else:
                high = mid - 1
        return low * block_size


@dataclass(eq=False)
class SharedView:
    """What one forward pass's attention needs of the shared prefix: its readers, grouped by how many
    of its tokens they read. Every attention layer that used it counts itself in ``layers``, which the
    engine checks after the pass."""

    prefix: SharedPrefix
    groups: list[tuple[torch.Tensor, int]]  # (rows of the batch, tokens of the prefix they read)
    layers: set[int] = field(default_factory=set)

    @classmethod
    def of(cls, prefix: SharedPrefix | None, lengths: torch.Tensor | None) -> SharedView | None:
        """The view for a batch whose rows read ``lengths`` [B] tokens of ``prefix`` (None: no prefix)."""
        if prefix is None or lengths is None:
            return None
        groups = [((lengths == n).nonzero().squeeze(1), n) for n in sorted(set(lengths.tolist()) - {0})]
        return cls(prefix, groups) if groups else None

    def keys(self, layer: int) -> torch.Tensor:
        return self.prefix.kv[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.prefix.kv[layer, 1]
