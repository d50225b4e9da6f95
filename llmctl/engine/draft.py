"""The draft-model method of speculative decoding: a smaller model of the same tokenizer proposes each row's drafts.

The draft model keeps a KV cache per row. Each step it is cut back to the tokens the row still has (a
rejected draft's entries go), fed what the row gained since, and then proposes greedily, one token at a
time. Greedy drafts are one token chosen without randomness each, which is what lets the verifier apply
the rejection-sampling rule exactly (`llmctl.engine.speculative`).
"""

from __future__ import annotations

import inspect
import logging

import torch
from transformers import DynamicCache

from llmctl.engine.base import Sequence
from llmctl.errors import ModelLoadError

log = logging.getLogger(__name__)


def check_same_tokenizer(target, draft, draft_name: str) -> None:
    """ModelLoadError unless ``draft`` (a tokenizer) maps every token to the same id as ``target``."""
    if target is None or draft is None:
        return
    ours, theirs = target.get_vocab(), draft.get_vocab()
    if ours != theirs:
        differing = len(set(ours.items()) ^ set(theirs.items()))
        raise ModelLoadError(
            f"The draft model {draft_name} has a different tokenizer from the served model ({len(theirs):,} tokens "
            f"against {len(ours):,}; {differing:,} token/id pairs differ): its drafts would be other tokens. "
            "Choose a draft model of the same family (the same tokenizer).")


class DraftModel:
    """Proposes up to k tokens per row from a small model of the served model's tokenizer (`Speculator`'s proposer)."""

    def __init__(self, model, vocab_size: int) -> None:
        self.model = model
        self.vocab_size = vocab_size  # the served model's logits width: a draft id beyond it is never proposed
        self.device = model.get_input_embeddings().weight.device
        parameters = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in parameters else "past_key_values"
        # Only the last position's logits are read: a row's first proposal feeds its whole context, and the head
        # over every position of it cost more than the layers (a second for 8 rows of SmolLM2's 49k vocabulary).
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
        self._rows: dict[int, tuple[DynamicCache, list[int]]] = {}  # seq id -> (cache, the tokens it holds)

    def __call__(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        drafts = [self._propose(seq, k) if k else [] for seq, k in zip(seqs, limits, strict=True)]
        live = {seq.id for seq in seqs}
        for gone in [key for key in self._rows if key not in live]:  # finished, cancelled or preempted rows
            del self._rows[gone]
        return drafts

    def _propose(self, seq: Sequence, k: int) -> list[int]:
        context = seq.context_ids
        cache, held = self._rows.get(seq.id, (None, []))
        # The last token is always fed: its logits give the first draft.
        same = min(_common_prefix(held, context), len(context) - 1)
        if cache is None or same == 0:
            cache, same = DynamicCache(), 0
        elif same < cache.get_seq_length():
            cache.crop(same - cache.get_seq_length())  # a negative count: drop that many from the end
        draft: list[int] = []
        feed = context[same:]
        position = same
        while len(draft) < k:
            ids = torch.tensor([feed], device=self.device)
            positions = torch.arange(position, position + len(feed), device=self.device)[None]
            out = self.model(input_ids=ids, position_ids=positions, use_cache=True, **{self._cache_kw: cache},
                             **self._last_logits)
            token = int(out.logits[0, -1, :self.vocab_size].argmax())
            position += len(feed)
            draft.append(token)
            feed = [token]
        # The cache now holds the context and all drafts but the last; the next step cuts what was rejected.
        self._rows[seq.id] = (cache, context + draft[:-1])
        return draft


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:  # the usual case, compared in C
        return n
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
