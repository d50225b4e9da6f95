"""Reproducible prefills: a prompt's tokens come out the same whether its prefix was in the prefix cache or not.

In bfloat16 the result of a matrix product or a softmax depends on the shapes it runs at (which kernel,
how the sums are split), so a prefill that computes only the part of a prompt after a cached prefix
rounds differently from one that computes the whole prompt, and at temperature 0 one flipped choice
changes the rest of the answer. A row prefilled alone is therefore computed in chunks whose bounds are
fixed by absolute position, multiples of `CHUNK_TOKENS`: token t is always computed in the chunk
``[t // CHUNK_TOKENS * CHUNK_TOKENS, ...)`` over the same keys, by the same operations at the same shapes,
with or without a cache. A cached prefix is taken only in whole chunks of exact KV (`Block.exact`: KV
such a prefill computed, never a decode step's or a batched prefill's), so a warm prefill starts at a
chunk bound with the very tensors a cold one would have there, and computes the rest as the cold one does.

The chunk size trades the cost of smaller passes against how much of a cached prefix is taken:
`scripts/bench_reproducible.py` measures both (docs/benchmarks.md).

With ``--deterministic`` a decode step runs each row as a pass of its own (`decode_rows_alone`), since a
batched bf16 product may round a row differently with more rows beside it: a row's tokens then do not
depend on the other requests at all.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import DynamicCache

from llmctl.engine.batch import Batch
from llmctl.engine.kv import Match, kv_layers
from llmctl.engine.prefix_cache import PrefilledLayer

CHUNK_TOKENS = 128  # a multiple of the prefix cache's block size (a smaller step budget takes less: Prefills)


def chunk_end(start: int, total: int, chunk: int = CHUNK_TOKENS) -> int:
    """Where the chunk that starts at token ``start`` ends, for a context of ``total`` tokens."""
    return min(total, (start // chunk + 1) * chunk)


def exact_tokens(total: int, chunk: int = CHUNK_TOKENS) -> int:
    """Tokens of a context of ``total`` whose KV a reproducible prefill computed in whole chunks: those a
    longer context starting the same way computes alike (the last, partial chunk's would differ)."""
    return total // chunk * chunk


def exact_part(match: Match | None, block_size: int, chunk: int = CHUNK_TOKENS) -> Match | None:
    """The part of a prefix-cache match a reproducible prefill takes: its leading exact blocks, in
    whole chunks (None: nothing)."""
    if match is None:
        return None
    blocks = 0
    while blocks < len(match.blocks) and match.blocks[blocks].exact:
        blocks += 1
    tokens = exact_tokens(blocks * block_size, chunk)
    if not tokens:
        return None
    return match if tokens == match.tokens else Match(match.blocks[:tokens // block_size], tokens, match.next_key)


def decode_rows_alone(forward: Callable, batch: Batch) -> torch.Tensor:
    """One decode step of ``batch`` in which every row is a forward pass of its own, over its own cache
    columns only (`--deterministic`): the very computation it makes when it runs alone, whatever the other
    rows (a batched product may round a row differently with more rows beside it). Appends each row's new
    KV to the batch's cache; returns the logits ``[B, V]``. ``forward``: the engine's forward pass."""
    width = batch.mask.shape[1]
    layers = kv_layers(batch.cache)
    logits, new_kv = [], []
    for row, own in enumerate(batch.own_lengths().tolist()):
        # Views of the row's real columns: the pass appends its token to copies of them.
        mine = [PrefilledLayer(layer.keys[row:row + 1, :, width - own:], layer.values[row:row + 1, :, width - own:], 0)
                for layer in layers]
        cache = DynamicCache()
        cache.layers.extend(mine)
        out = forward(input_ids=batch.last[row:row + 1, None], cache=cache, seqs=[batch.seqs[row]],
                      attention_mask=torch.ones((1, own + 1), dtype=batch.mask.dtype, device=batch.mask.device),
                      position_ids=batch.positions[row:row + 1, None])
        logits.append(out.logits[:, -1, :])
        new_kv.append([(layer.keys[:, :, -1:], layer.values[:, :, -1:]) for layer in mine])
    for i, layer in enumerate(layers):
        layer.keys = torch.cat([layer.keys, torch.cat([kv[i][0] for kv in new_kv])], dim=-2)
        layer.values = torch.cat([layer.values, torch.cat([kv[i][1] for kv in new_kv])], dim=-2)
    return torch.cat(logits)
