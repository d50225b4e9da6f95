"""The running batch's KV-cache layout and the row operations on it.

Rows are right-aligned (left-padded) so that every row's newest token sits in the last column; a
decode step is then one forward pass of [B, 1] tokens with per-row positions and a padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from llmctl.engine import thinking
from llmctl.engine.base import Sequence
from llmctl.engine.kv import SharedPrefix, kv_layers
from llmctl.engine.sampling import BatchSampler

# Stands in for a row that takes no token at this position (speculative verification): it has no thinking.
_ASIDE = SimpleNamespace(thinking=None)


@dataclass
class Batch:
    """The running rows: their KV cache, padding mask, positions and next input tokens."""

    seqs: list[Sequence]
    cache: DynamicCache
    mask: torch.Tensor  # [B, L] 1 for real cache entries, 0 for left padding
    positions: torch.Tensor  # [B] position of the next token == real tokens in the cache
    last: torch.Tensor  # [B] the token to feed at the next step
    counts: torch.Tensor | None = None  # [B, V] generated-token counts when any row has penalties
    sampler: BatchSampler | None = field(default=None, repr=False)
    # A prefix whose KV the rows share (`llmctl.engine.shared`), and how many of its tokens each row
    # reads before the tokens of its own cache row (0: none); both None when no row reads one.
    shared: SharedPrefix | None = None
    shared_lengths: torch.Tensor | None = None  # [B]

    def own_lengths(self) -> torch.Tensor:
        """[B] tokens each row holds in its own cache row (its last columns)."""
        return self.positions if self.shared_lengths is None else self.positions - self.shared_lengths

    @property
    def kv_slots(self) -> int:
        """KV slots the batch holds: every row as wide as the widest, and the shared prefix once."""
        return len(self.seqs) * self.mask.shape[1] + (self.shared.tokens if self.shared is not None else 0)


def full_cache() -> DynamicCache:
    """A cache of full layers, even for models with sliding-window attention.

    A config-built cache gives sliding layers that crop old keys and keep a running length of
    their own; rows joining and leaving the batch (`merge`, `select_rows`) would break that
    bookkeeping. With full layers the model still applies its sliding mask, so outputs are the same,
    and the KV budget, which counts full rows, stays exact.
    """
    return DynamicCache()


def select_rows(batch: Batch, keep: list[int]) -> None:
    """Keep only rows ``keep`` and drop the left-padding columns no remaining row needs."""
    index = torch.tensor(keep, device=batch.mask.device)
    batch.seqs = [batch.seqs[i] for i in keep]
    batch.positions = batch.positions[index]
    batch.last = batch.last[index]
    batch.counts = batch.counts[index] if batch.counts is not None else None
    # The sampler holds per-row settings and the counts tensor just replaced: rebuild it next step.
    batch.sampler = None
    if batch.shared_lengths is not None:
        batch.shared_lengths = batch.shared_lengths[index]
        if not bool(batch.shared_lengths.any()):  # its last reader left
            batch.shared = batch.shared_lengths = None
    trim = batch.mask.shape[1] - int(batch.own_lengths().max())
    batch.mask = batch.mask[index, trim:]
    for layer in kv_layers(batch.cache):
        layer.keys = layer.keys[index, :, trim:, :]
        layer.values = layer.values[index, :, trim:, :]


def merge(a: Batch, b: Batch) -> Batch:
    """Stack two batches' rows, left-padding the shorter cache so every row stays right-aligned."""
    width = max(a.mask.shape[1], b.mask.shape[1])
    pad_a, pad_b = width - a.mask.shape[1], width - b.mask.shape[1]
    for la, lb in zip(kv_layers(a.cache), kv_layers(b.cache), strict=False):
        la.keys = stack_right_aligned(la.keys, lb.keys, width)
        la.values = stack_right_aligned(la.values, lb.values, width)
    a.mask = torch.cat([F.pad(a.mask, (pad_a, 0)), F.pad(b.mask, (pad_b, 0))], dim=0)
    a.positions = torch.cat([a.positions, b.positions])
    a.last = torch.cat([a.last, b.last])
    if a.counts is not None or b.counts is not None:
        vocab = next(c for c in (a.counts, b.counts) if c is not None).shape[1]
        ca = a.counts if a.counts is not None else torch.zeros((len(a.seqs), vocab), device=a.mask.device)
        cb = b.counts if b.counts is not None else torch.zeros((len(b.seqs), vocab), device=a.mask.device)
        a.counts = torch.cat([ca, cb])
    if a.shared is not None or b.shared is not None:
        if a.shared is not None and b.shared is not None and a.shared is not b.shared:
            raise ValueError("cannot merge batches that read different shared prefixes")
        zeros = torch.zeros(len(a.seqs) if a.shared is None else len(b.seqs), dtype=torch.long,
                            device=a.mask.device)
        a.shared_lengths = torch.cat([a.shared_lengths if a.shared_lengths is not None else zeros,
                                      b.shared_lengths if b.shared_lengths is not None else zeros])
        a.shared = a.shared or b.shared
    a.seqs = a.seqs + b.seqs
    return a


def stack_right_aligned(a: torch.Tensor, b: torch.Tensor, width: int) -> torch.Tensor:
    """Rows of ``a`` then of ``b`` ([rows, heads, tokens, dim]) in one new tensor ``width`` tokens wide,
    each right-aligned, zeros on the left: one copy of each, nothing in between."""
    ra, rb = a.shape[0], b.shape[0]
    out = a.new_empty((ra + rb,) + a.shape[1:2] + (width,) + a.shape[3:])
    fill_right_aligned(out[:ra], a)
    fill_right_aligned(out[ra:], b)
    return out


def fill_right_aligned(dest: torch.Tensor, tokens: torch.Tensor | None) -> None:
    """Write ``tokens`` into the last columns of ``dest`` (the token dimension is -2 in both) and zeros
    before them (all zeros for None): one row's, or rows', place in the left-padded layout."""
    pad = dest.shape[-2] - (0 if tokens is None else tokens.shape[-2])
    if pad:
        dest[..., :pad, :].zero_()
    if tokens is not None:
        dest[..., pad:, :].copy_(tokens)


def prefill_plan(lengths: list[int], cached: list[int]) -> tuple[int, list[int]]:
    """How many tokens a left-padded prefill feeds (the same for every row: the longest uncached part of
    any row) and how many cached tokens each row then uses: a row with more cached tokens than that
    needs takes fewer from its cache, so that nothing is left between its cached part and the tokens
    it feeds, and its tokens stay contiguous and right-aligned."""
    fed = max(n - c for n, c in zip(lengths, cached, strict=False))
    return fed, [max(0, n - fed) for n in lengths]


def prefill_inputs(contexts: list[list[int]], used: list[int], fed: int, device: torch.device,
                   shared: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs of one left-padded prefill (``fed``, ``used``: `prefill_plan`) in which row r reads its first
    ``shared[r]`` tokens from a shared prefix and the rest of its ``used[r]`` cached tokens from its own
    cache row (left-padded to the most). Returns the input ids ``[B, fed]``, the attention mask over the
    own cache and the fed tokens ``[B, own + fed]``, and the fed tokens' position ids."""
    shared = shared or [0] * len(contexts)
    own = [u - s for u, s in zip(used, shared, strict=False)]
    width = max(own)
    ids = torch.zeros((len(contexts), fed), dtype=torch.long)
    mask = torch.zeros((len(contexts), width + fed), dtype=torch.long)
    for row, (context, u, o) in enumerate(zip(contexts, used, own, strict=False)):
        n = len(context)
        ids[row, fed - (n - u):] = torch.tensor(context[u:])
        mask[row, width - o:width] = 1
        mask[row, width + fed - (n - u):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, width:] + torch.tensor(shared)[:, None]
    return ids.to(device), mask.to(device), positions.to(device)


def sample(batch: Batch, logits: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Each row's next token from ``logits`` [B, V] with its own settings (sampled on ``device``, the
    model's input device); records logprobs and penalty counts; the tokens become the next input."""
    tokens = sample_rows(batch, logits, device)
    batch.last = tokens
    return tokens


def sample_rows(batch: Batch, logits: torch.Tensor, device: torch.device,
                active: list[bool] | None = None) -> torch.Tensor:
    """`sample` for the ``active`` rows only (all when None), leaving ``batch.last`` as it is: speculative
    verification samples one position at a time, each for the rows whose drafts were accepted so far."""
    if batch.sampler is None:
        if any(s.params.penalized for s in batch.seqs) and batch.counts is None:
            batch.counts = torch.zeros((len(batch.seqs), logits.shape[-1]), device=device)
            for row, seq in enumerate(batch.seqs):  # a resumed sequence counts what it generated before
                if seq.output_ids and seq.params.penalized:
                    batch.counts[row] = torch.bincount(
                        torch.tensor(seq.output_ids, device=device), minlength=logits.shape[-1])
        batch.sampler = BatchSampler(logits.shape[-1], device)
        batch.sampler.refresh([s.params for s in batch.seqs], [s.generator for s in batch.seqs], batch.counts,
                              [s.matcher for s in batch.seqs])
    tokens = batch.sampler.sample(logits, active)
    rows = batch.seqs if active is None else [s if on else _ASIDE for s, on in zip(batch.seqs, active, strict=True)]
    thinking.force(rows, tokens)  # rows at their thinking budget write its closing text
    for row, logprobs in batch.sampler.logprobs(logits, tokens, active):
        batch.seqs[row].logprobs.append(logprobs)
    batch.sampler.observe(tokens, active)
    if thinking.observe(rows, tokens):  # a row's answer grammar starts: masks to rebuild
        batch.sampler = None
    return tokens
