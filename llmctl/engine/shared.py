"""A shared prefix: running rows that start with the same cached tokens read one copy of their KV.

An agent backend sends the same long system prompt with every request. With the prefix cache alone,
each row of the running batch still holds its own copy of that prompt's KV (the batch's cache is one
dense tensor per layer, a row per sequence), so 16 requests mean 16 copies to write when they join
and to read at every decode step. With a shared prefix, the batch keeps the prompt's KV once; each
member row's own cache holds only what follows it, and attention (`attention.attend_with_shared`)
runs one softmax over the row's scores for the prefix's keys (one matrix product for several rows)
and for its own.

One shared prefix per running batch, a chain of prefix-cache blocks. A row reads as many of its
first tokens as it has in common with that chain (at least `BuiltinEngine.share_min_tokens`);
other rows hold everything themselves, as before. The prefix is chosen when a prefill finds none
in the running batch (the chain most of the new rows start with) and dropped when its last member
leaves. It needs llmctl's attention function (`--attention`), a model without sliding windows (a
prefix token may fall out of a row's window) and one whose layers pass the engine's arguments down
to attention: `probe` checks that on the model before the engine relies on it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from llmctl.engine.attention import GROUPED
from llmctl.engine.batch import full_cache
from llmctl.engine.kv import Match, SharedPrefix, SharedView
from llmctl.engine.prefix_cache import PrefixCache, prefix_rows_cache, row_kv

log = logging.getLogger(__name__)


def choose(matches: list[Match | None], used: list[int], running: SharedPrefix | None, cache: PrefixCache,
           min_tokens: int) -> tuple[SharedPrefix | None, list[int]]:
    """The shared prefix a prefill's rows read (the running batch's, else a new one) and how many of
    its tokens each row reads (0: none). ``used``: cached tokens each row takes (see `prefill_plan`).

    A new prefix is the longest cached chain among the rows that start with the most common first
    block: an agent's burst of requests after one system prompt shares it.
    """
    size = cache.block_size
    shared = running
    if shared is None:
        firsts: dict[int, list[tuple[int, Match]]] = {}  # first block -> (row, its match)
        for row, (match, u) in enumerate(zip(matches, used, strict=False)):
            if match is not None and u >= min_tokens and match.blocks:
                firsts.setdefault(id(match.blocks[0]), []).append((row, match))
        if not firsts:
            return None, [0] * len(used)
        rows = max(firsts.values(), key=len)
        seed, seed_match = max(rows, key=lambda found: used[found[0]])
        blocks = seed_match.blocks[:used[seed] // size]
        shared = SharedPrefix(blocks, cache.gather(Match(blocks, len(blocks) * size, None)))
    lengths = []
    for match, u in zip(matches, used, strict=False):
        n = shared.common(match, u, size) if match is not None else 0
        lengths.append(n if n >= min_tokens else 0)
    if shared is not running and not any(lengths):
        return None, lengths
    return shared, lengths


def has_sliding_window(config) -> bool:
    """Whether any attention layer of the model may look at fewer than all earlier tokens."""
    config = getattr(config, "text_config", None) or config
    types = getattr(config, "layer_types", None)
    if types is not None:
        return any(kind != "full_attention" for kind in types)
    return bool(getattr(config, "sliding_window", None)) and getattr(config, "use_sliding_window", True)


def sharing_works(model, attention_in_use: str, forward: Callable) -> bool:
    """Whether the engine may give ``model``'s rows a shared prefix: it runs llmctl's attention function
    (``attention_in_use``), has no sliding window, and a probe computes the same logits both ways.

    ``forward(cache=..., shared=..., **model_inputs)`` is the engine's forward pass. The probe runs
    three passes of a few tokens: a 4-token prefix, then 2 tokens after it with the prefix copied into
    the row's cache and with the prefix shared. A model whose layers do not hand the engine's
    arguments to attention fails it (the engine counts the layers that read the prefix).
    """
    if attention_in_use != GROUPED or has_sliding_window(model.config):
        return False
    embeddings = model.get_input_embeddings().weight
    device, vocab = embeddings.device, embeddings.shape[0]
    ids = ((torch.arange(6, device=device) * 7919 + 3) % vocab)[None]
    ones = torch.ones((1, 6), dtype=torch.long, device=device)
    positions = torch.arange(6, device=device)[None]
    try:
        cache = full_cache()
        forward(input_ids=ids[:, :4], attention_mask=ones[:, :4], position_ids=positions[:, :4], cache=cache)
        kv = row_kv(cache, 0, 0, 0, 4)
        copied = forward(input_ids=ids[:, 4:], attention_mask=ones, position_ids=positions[:, 4:],
                         cache=prefix_rows_cache([kv], room=2)).logits.float()
        view = SharedView.of(SharedPrefix([], kv), torch.tensor([4], device=device))
        read = forward(input_ids=ids[:, 4:], attention_mask=ones[:, 4:], position_ids=positions[:, 4:],
                       cache=full_cache(), shared=view).logits.float()
    except Exception as exc:  # noqa: BLE001 - any failure means: do not share
        log.info("Shared prefixes are off for this model: %s", exc)
        return False
    error = float((copied - read).abs().max())
    if error > 0.05 * float(copied.abs().max()) + 1e-4:
        log.warning("Shared prefixes are off for this model: its logits differ by %.3g with one", error)
        return False
    return True
