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
"""

from __future__ import annotations

from llmctl.engine.kv import Match

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
