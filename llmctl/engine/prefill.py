"""The builtin engine's prefills: which waiting requests join the running batch, and their first pass.

A step prefills new requests in passes of at most `prefill_pass_tokens` tokens (all rows together,
counting what their cached prefixes spare them) until the step's budget, ``max_batched_tokens``, is
spent. A pass's requests get their first token when it ends, so on a CPU, where a pass costs in
proportion to its tokens, several small passes give most requests their first token sooner than one
large pass, for a few percent of throughput (each pass and merge has a fixed cost). A request that an idle
engine admits alone, a long prompt, and with ``--deterministic`` every request, is prefilled alone in
reproducible chunks (`llmctl.engine.reproducible`), as many per step as the step's budget holds: its tokens
do not depend on what the prefix cache held.

Clients often send together: an agent's parallel calls, or every stream of a batch coming back with
its next request when they all finish on the same step. Such a burst reaches an idle engine over a
few milliseconds (each request is parsed and tokenized first), and a prefill started on its first
request keeps the rest waiting for that whole pass. So an idle engine waits until no request has
arrived for `prefill_wait_s`, at most BURST_WINDOWS times that after the first one, and prefills
the burst in full passes. A running batch does not wait: its decode step gathers new requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from transformers import DynamicCache

from llmctl.engine.base import Sequence
from llmctl.engine.batch import Batch, full_cache, prefill_inputs, prefill_plan, sample, select_rows
from llmctl.engine.kv import SharedView
from llmctl.engine.prefix_cache import prefix_rows_cache
from llmctl.engine.reproducible import CHUNK_TOKENS, chunk_end, exact_part, exact_tokens
from llmctl.engine.shared import choose
from llmctl.errors import LLMCtlError

if TYPE_CHECKING:
    import threading
    from collections import deque

    from llmctl.core.threads import ThreadTuner
    from llmctl.engine.base import EngineConfig, EngineStats
    from llmctl.engine.builtin_setup import BuiltinOptions
    from llmctl.engine.prefix_cache import PrefixCache

log = logging.getLogger(__name__)

OVERTAKE_S = 5.0  # how long smaller requests may pass one that does not fit yet
ADMIT_HEADROOM = 128  # tokens of growth each row must have room for when a new row is admitted
CPU_PASS_TOKENS = 256  # prefill pass size on a CPU unless the operator sets one (--max-prefill-tokens)
CPU_WAIT_MS = 10.0  # an idle engine's wait for the rest of a burst on a CPU (--prefill-wait-ms)
BURST_WINDOWS = 4  # it waits at most this many times that after the burst's first request


# A prefill pass: its rows' batch and their last logits [rows, vocab], or None while a chunked prefill goes on.
Pass = Callable[[list[Sequence]], tuple[Batch, torch.Tensor] | None]


class Prefills:
    """The prefill half of `llmctl.engine.builtin.BuiltinEngine` (whose state it uses), run on its thread."""

    share_min_tokens = 256  # a row reads a shared prefix (llmctl.engine.shared) of at least this many tokens

    if TYPE_CHECKING:  # the engine's state and steps used here, which `BuiltinEngine` sets and defines
        config: EngineConfig
        options: BuiltinOptions
        device: torch.device
        stats: EngineStats
        _prefix: PrefixCache | None
        _share: bool
        _cond: threading.Condition
        _stopping: bool
        _waiting: deque[Sequence]
        _prefilling: Sequence | None
        _admitting: list[Sequence]
        _batch: Batch | None
        threads: ThreadTuner | None

        def _forward(self, cache: DynamicCache, shared: SharedView | None = None,
                     seqs: list[Sequence] | None = None, **kwargs: Any) -> Any: ...

        def _remember(self, batch: Batch, rows: list[int], extra: int = 0, leaving: bool = False) -> None: ...

        def _emit(self, batch: Batch, tokens: torch.Tensor) -> None: ...

        def _join(self, batch: Batch) -> None: ...

        def _on_oom(self, seqs: list[Sequence]) -> None: ...

        def _finish(self, seq: Sequence, reason: str, error: LLMCtlError | None = None) -> None: ...

    @property
    def prefill_pass_tokens(self) -> int:
        """Most tokens one prefill pass computes: the operator's choice, else 256 on a CPU and the step's
        whole budget on an accelerator (where a larger pass costs little more than a small one)."""
        cfg = self.config
        if self.options.max_prefill_tokens is not None:
            return min(self.options.max_prefill_tokens, cfg.max_batched_tokens)
        return min(CPU_PASS_TOKENS, cfg.max_batched_tokens) if self.device.type == "cpu" else cfg.max_batched_tokens

    @property
    def chunk_tokens(self) -> int:
        """Size of a reproducible prefill's chunks: CHUNK_TOKENS, or within a smaller step budget the largest
        power of two it holds (a whole number of prefix-cache blocks, or a whole block's fraction)."""
        budget = self.config.max_batched_tokens
        return CHUNK_TOKENS if budget >= CHUNK_TOKENS else 1 << (budget.bit_length() - 1)

    @property
    def prefill_wait_s(self) -> float:
        """How long an idle engine waits for the next request of a burst: the operator's choice, else
        10 ms on a CPU (where a pass of 16 rows costs a fraction of 16 passes of one) and none on an
        accelerator (where a pass takes milliseconds and waiting would be most of it)."""
        ms = self.options.prefill_wait_ms
        if ms is None:
            ms = CPU_WAIT_MS if self.device.type == "cpu" else 0.0
        return ms / 1000

    def _await_burst(self) -> None:
        """When nothing runs, wait for the rest of a burst of requests (see the module's docstring):
        until none has arrived for `prefill_wait_s`, the first waited BURST_WINDOWS times that, or there
        are requests enough for every batch slot."""
        window = self.prefill_wait_s
        if not window or self._batch is not None or self._prefilling is not None:
            return
        with self._cond:
            if not self._waiting:
                return
            end = min(s.arrived for s in self._waiting) + BURST_WINDOWS * window
            while not self._stopping and len(self._waiting) < self.config.max_num_seqs:
                wait = min(max(s.arrived for s in self._waiting) + window, end) - time.monotonic()
                if wait <= 0:
                    break
                self._cond.wait(wait)

    def _admit(self, budget: int) -> list[Sequence]:
        """New sequences for one prefill: as many as the slot, KV and token budgets allow (``budget``:
        prompt tokens this step may still prefill).

        KV admission is optimistic, as in paged servers: a row is charged its context now plus
        ADMIT_HEADROOM tokens, not its whole max_tokens, and when the rows outgrow the budget the
        newest ones are preempted (`_make_room`). A request that does not fit yet may be overtaken
        by smaller ones behind it, but only for OVERTAKE_S: after that nothing passes it.
        """
        cfg = self.config
        running = self._batch.seqs if self._batch else []
        chosen: list[Sequence] = []
        # The running rows' width in a while: now, plus what they may still generate (up to the headroom).
        longest = self._batch.mask.shape[1] + min(
            ADMIT_HEADROOM, max(s.params.max_tokens - s.generated for s in running)) if self._batch else 0
        shared = self._batch.shared.tokens if self._batch and self._batch.shared else 0
        now = time.monotonic()
        computing: set[int] = set()  # prefix-cache keys of the blocks this prefill computes
        with self._cond:
            for seq in list(self._waiting):
                if len(running) + len(chosen) >= cfg.max_num_seqs:
                    break
                new_longest = max(longest, seq.admit_tokens(ADMIT_HEADROOM))
                # Padded layout: every row is as long as the longest one.
                if (len(running) + len(chosen) + 1) * new_longest + shared > cfg.kv_cache_tokens and \
                        (running or chosen):
                    if now - seq.arrived >= OVERTAKE_S:
                        break
                    continue
                fresh = self._look_up(seq)
                if seq.prefix is not None and seq.prefix.next_key in computing:
                    continue  # a row prefilled now computes its next block: it finds it cached after that
                # A prefill's cost is its rows times the longest part any row computes.
                longest = max([fresh] + [s.context_length - s.prefix_tokens for s in chosen])
                if chosen and (len(chosen) + 1) * longest > min(budget, self.prefill_pass_tokens):
                    break
                if not chosen and budget < cfg.max_batched_tokens and fresh > budget:
                    break  # what is left of this step's budget is too little: it goes first next step
                self._waiting.remove(seq)
                seq.admitted = seq.admitted or now
                chosen.append(seq)
                longest = new_longest
                if self._prefix is not None:
                    computing.update(self._prefix.keys(seq.context_ids, root=seq.cache_root))
                if fresh > cfg.max_batched_tokens or self.options.deterministic:
                    break  # a long prompt is prefilled alone, in chunks; with --deterministic every prompt is
        return chosen

    def _look_up(self, seq: Sequence) -> int:
        """Find the cached prefix of ``seq``'s context; returns the tokens its prefill must compute."""
        if self._prefix is not None:  # the last token is always computed: its logits give the next token
            seq.prefix = self._prefix.match(seq.context_ids, limit=seq.context_length - 1, root=seq.cache_root)
            seq.prefix_tokens = seq.prefix.tokens
        return seq.context_length - seq.prefix_tokens

    def _prefill_some(self, budget: int) -> int:
        """One prefill (of new rows, or the next chunk of a long prompt) within ``budget`` prompt
        tokens; returns the tokens it charged to the step (0: nothing to prefill)."""
        if self._prefilling is None:
            chosen = self._admit(budget)
            if not chosen:
                return 0
            fed = max(s.context_length - s.prefix_tokens for s in chosen)
            # A row alone on an idle engine (any row with --deterministic, and a long prompt) is prefilled
            # reproducibly (llmctl.engine.reproducible): from the exact part of its cached prefix on, in
            # chunks, as many as this step's budget holds. Rows that join running ones share a pass and may
            # read the batch's shared prefix: their tokens depend on their batch anyway.
            if len(chosen) > 1 or (self._batch is not None and fed <= self.config.max_batched_tokens
                                   and not self.options.deterministic):
                self._run_prefill(chosen, self._prefill_batch)
                return len(chosen) * fed  # at least 1: a row's last token is always computed
            seq = self._prefilling = chosen[0]
            seq.prefix = exact_part(seq.prefix, self._prefix.block_size, self.chunk_tokens) \
                if self._prefix is not None else None
            tokens = seq.prefix.tokens if seq.prefix is not None else 0
            prefix = self._take_prefix(seq, tokens)
            if prefix is not None:  # the chunks start where the cached prefix ends
                seq.prefill_cache, seq.prefilled = prefix_rows_cache([prefix]), tokens
        seq = self._prefilling
        if budget < self.config.max_batched_tokens and \
                budget < chunk_end(seq.prefilled, seq.context_length, self.chunk_tokens) - seq.prefilled:
            return 0  # its next chunk does not fit in what is left of this step
        before = seq.prefilled
        self._run_prefill([seq], lambda seqs: self._prefill_chunk(seqs, budget))
        return max(1, seq.prefilled - before)

    def _run_prefill(self, seqs: list[Sequence], fn: Pass) -> None:
        self._admitting = list(seqs)
        if self.threads is not None:  # a pass over many tokens runs at the count of a batch that large
            self.threads.prepare(sum(s.context_length - max(s.prefilled, s.prefix_tokens) for s in seqs))
        try:
            done = fn(seqs)
            if done is None:
                return  # more chunks to go
            batch, logits = done
            logits = self._fork(batch, logits)
            self.stats.prefills += 1
            self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in seqs if not s.preemptions)
            self._remember(batch, list(range(len(batch.seqs))), extra=batch.kv_slots)
            self._emit(batch, sample(batch, logits, self.device))
            del done, logits
            kept = [i for i, s in enumerate(batch.seqs) if not s.done]
            if kept:
                if len(kept) < len(batch.seqs):
                    select_rows(batch, kept)
                self._join(batch)
        except torch.OutOfMemoryError:
            self._on_oom(self._admitting)
        except Exception:
            log.exception("Prefill failed")
            self._prefilling = None
            for seq in self._admitting:
                seq.prefill_cache = None
                self._finish(seq, "error", LLMCtlError("Internal error during prefill; see the server log."))
        finally:
            self._admitting = []

    def _fork(self, batch: Batch, logits: torch.Tensor) -> torch.Tensor:
        """n > 1: the prompt was prefilled once; each other choice gets a copy of its row (KV cache included)
        and samples on its own from the first token on. Returns the rows' last logits, forked alike."""
        if not any(seq.forks for seq in batch.seqs):
            return logits
        rows, seqs = [], []
        for row, seq in enumerate(batch.seqs):
            for member in (seq, *seq.forks):
                member.admitted, member.exact_tokens = seq.admitted, seq.exact_tokens
                rows.append(row)
                seqs.append(member)
            seq.forks = []
        logits = logits[torch.tensor(rows, device=logits.device)]
        select_rows(batch, rows)
        batch.seqs = seqs
        self._admitting += [s for s in seqs if s not in self._admitting]  # an OOM from here on fails them too
        return logits

    def _prefill_batch(self, seqs: list[Sequence]) -> tuple[Batch, torch.Tensor]:
        """One left-padded forward pass over the new rows; a row's cached prefix is not computed again, and
        the part of it the running batch's shared prefix holds (or a new one) is not copied either."""
        contexts = [s.context_ids for s in seqs]
        lengths = [len(c) for c in contexts]
        fed, used = prefill_plan(lengths, [s.prefix_tokens for s in seqs])
        shared, reads = choose([s.prefix for s in seqs], used, self._batch.shared if self._batch else None,
                               self._prefix, self.share_min_tokens) \
            if self._share and self._prefix is not None else (None, [0] * len(seqs))
        ids, mask, positions = prefill_inputs(contexts, used, fed, self.device, reads)
        gathered: dict = {}  # rows continuing the same cached blocks share one copy of them
        prefixes = [self._take_prefix(s, u, gathered, start=r) for s, u, r in zip(seqs, used, reads, strict=False)]
        cache = prefix_rows_cache(prefixes, room=fed) if any(p is not None for p in prefixes) else full_cache()
        self.stats.prefill_tokens += sum(lengths) - sum(used)
        log.debug("Prefill: %d row(s) of %d token(s) each, %d token(s) in all from the prefix cache, %d of them "
                  "read from a shared prefix", len(seqs), fed, sum(used), sum(reads))
        reads_t = torch.tensor(reads, device=self.device) if shared is not None else None
        view = SharedView.of(shared, reads_t)
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            logits_to_keep=1, shared=view, seqs=seqs)
        batch = Batch(seqs=list(seqs), cache=cache, mask=mask,
                       positions=torch.tensor(lengths, device=self.device), last=ids[:, -1].clone())
        if view is not None:
            batch.shared, batch.shared_lengths = shared, reads_t
        return batch, out.logits[:, -1, :]

    def _prefill_chunk(self, seqs: list[Sequence], budget: int) -> tuple[Batch, torch.Tensor] | None:
        """The next chunks of one row's reproducible prefill, at least one and as many more as ``budget``
        holds; the row's batch and last logits once its last chunk is computed."""
        (seq,) = seqs
        context = seq.context_ids
        total = len(context)
        if seq.prefill_cache is None:
            seq.prefill_cache = full_cache()
        spent = 0
        while seq.prefilled < total:
            start = seq.prefilled
            end = chunk_end(start, total, self.chunk_tokens)
            if spent and spent + end - start > budget:
                return None
            ids = torch.tensor([context[start:end]], device=self.device)
            out = self._forward(
                input_ids=ids,
                attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
                position_ids=torch.arange(start, end, device=self.device)[None],
                cache=seq.prefill_cache, logits_to_keep=1, seqs=seqs,
            )
            seq.prefilled, spent = end, spent + end - start
            self.stats.prefill_tokens += end - start
        self._prefilling = None
        cache, seq.prefill_cache = seq.prefill_cache, None
        seq.exact_tokens = exact_tokens(total, self.chunk_tokens)
        batch = Batch(seqs=[seq], cache=cache, mask=torch.ones((1, total), dtype=torch.long, device=self.device),
                       positions=torch.tensor([total], device=self.device), last=ids[:, -1].clone())
        return batch, out.logits[:, -1, :]

    def _take_prefix(self, seq: Sequence, tokens: int, gathered: dict | None = None,
                     start: int = 0) -> torch.Tensor | None:
        """The KV of ``seq``'s context tokens ``start:tokens`` from the prefix cache (None if none), all
        ``tokens`` counted as cache hits (``gathered``: see `PrefixCache.gather`)."""
        match, seq.prefix, seq.prefix_tokens = seq.prefix, None, 0
        if self._prefix is None:
            return None
        self.stats.prefix_cache_queries += seq.context_length
        self.stats.prefix_cache_hits += tokens
        if not seq.preemptions:
            seq.cached_tokens = tokens
        return self._prefix.gather(match, tokens, gathered, start) if tokens > start else None

