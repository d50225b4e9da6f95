"""Continuous batching: sequences join the running batch at any decode step and leave when done.

Layout of the running batch: one KV cache whose rows are right-aligned (left-padded) so that every
row's newest token sits in the last column. A decode step is then one forward pass of [B, 1] tokens
with per-row position ids and a padding mask, exactly what batched `generate` does. New requests
are prefilled in their own small batch (long prompts in chunks, interleaved with decode steps so
running streams keep flowing) and then concatenated onto the running batch. A finished or
cancelled row is dropped from the cache at the end of the step it finished in.
"""

from __future__ import annotations

import inspect
import logging
import threading
import time
from collections import deque

import torch
from transformers import DynamicCache

from llmctl.core import hardware
from llmctl.engine import attention
from llmctl.engine.base import EngineConfig, EngineStats, Finish, Sequence
from llmctl.engine.batch import Batch, full_cache, merge, prefill_inputs, sample, select_rows
from llmctl.engine.prefix_cache import KVLayoutError, PrefixCache, prefix_rows_cache, store_rows
from llmctl.engine.structured import Grammars, attach_matchers, end_reason
from llmctl.errors import GenerationOutOfMemory, LLMCtlError, QueueFull, Unavailable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0  # how often freed heap memory is handed back to the OS
OVERTAKE_S = 5.0  # how long smaller requests may pass one that does not fit yet
ADMIT_HEADROOM = 128  # tokens of growth each row must have room for when a new row is admitted


class BuiltinEngine:
    """Runs generation for all requests on one background thread (the `Engine` protocol)."""

    forks_after_prefill = True  # a sequence's forks (n > 1) are prefilled with it once: see _fork

    def __init__(self, model, eos_token_ids: frozenset[int], config: EngineConfig | None = None,
                 tokenizer=None) -> None:
        self.model = model
        self.config = config or EngineConfig()
        self.eos = eos_token_ids
        self.device = model.get_input_embeddings().weight.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.stats = EngineStats()
        self.attention = attention.select(model, self.config.attention)
        log.info("Attention: %s", self.attention)
        self._prefix = PrefixCache(self.config.prefix_cache_tokens) if self.config.prefix_cache_tokens else None
        # Constrained decoding maps grammars onto token ids: it needs the tokenizer.
        self.grammars = Grammars(tokenizer, self.vocab_size, eos_token_ids, stats=self.stats.grammar) \
            if tokenizer is not None else None
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._admitting: list[Sequence] = []  # taken from the queue, not yet in the batch
        self._batch: Batch | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._last_trim = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)

    # ---- public, thread-safe -------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(timeout)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        """Sequences past the queue: in the batch, or being prefilled."""
        batch, admitting = self._batch, self._admitting
        return (len(batch.seqs) if batch else 0) + len(admitting or ([self._prefilling] if self._prefilling else []))

    def check_capacity(self) -> None:
        """Raise QueueFull at once when the waiting queue is full (before any tokenization)."""
        if len(self._waiting) >= self.config.max_waiting:
            raise QueueFull(
                f"The server is at capacity ({self.config.max_waiting} requests waiting); retry shortly.",
                retry_after=1,
            )

    def submit(self, seq: Sequence) -> Sequence:
        if seq.reserved_tokens > self.config.kv_cache_tokens:
            from llmctl.errors import InvalidRequest

            raise InvalidRequest(
                f"This request needs {seq.reserved_tokens} tokens of KV cache (prompt + max_tokens) but the "
                f"server's budget is {self.config.kv_cache_tokens}; lower max_tokens.",
                param="max_tokens",
            )
        attach_matchers(self.grammars, (seq, *seq.forks))
        with self._cond:
            if self._stopping:
                raise Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
            self.check_capacity()
            for member in (seq, *seq.forks):
                if member.params.seed is not None:
                    member.generator = member.params.make_generator(self.device)
            self._waiting.append(seq)
            self._cond.notify()
        return seq

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not (self._waiting or self._batch or self._prefilling):
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception:  # a bug must not kill the engine: fail what ran, keep serving
                    log.exception("Engine step failed")
                    self._fail_all_running(LLMCtlError("Internal error during generation; see the server log."))
        self._shutdown()

    def _step(self) -> None:
        self._expire()
        # Prefills share one step's budget of max_batched_tokens, as in vLLM's scheduler: requests that
        # arrive while one is prefilled (an agent's next calls, the rest of a burst) are prefilled in the
        # same step instead of after a decode step of their own.
        budget = self.config.max_batched_tokens
        while budget > 0 and (spent := self._prefill_some(budget)):
            budget -= spent
        if self._batch is not None:
            self._decode()
        now = time.monotonic()
        if now - self._last_trim > TRIM_EVERY_S:
            self._last_trim = now
            hardware.trim_heap()

    def _expire(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [(seq, reason) for seq in self._waiting if (reason := seq.abort_reason(now))]
            for seq, _ in expired:
                self._waiting.remove(seq)
        for seq, reason in expired:
            self._finish(seq, reason)
        if self._prefilling and (reason := self._prefilling.abort_reason(now)):
            seq, self._prefilling = self._prefilling, None
            seq.prefill_cache = None
            self._finish(seq, reason)
        if self._batch is not None:
            keep, gone = [], []
            for i, seq in enumerate(self._batch.seqs):
                reason = seq.abort_reason(now)
                if reason:
                    self._finish(seq, reason)
                    gone.append(i)
                else:
                    keep.append(i)
            self._remember(self._batch, gone, leaving=True)  # a stop string cancels: its KV is as reusable
            self._select(keep)

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
        now = time.monotonic()
        computing: set[int] = set()  # prefix-cache keys of the blocks this prefill computes
        with self._cond:
            for seq in list(self._waiting):
                if len(running) + len(chosen) >= cfg.max_num_seqs:
                    break
                new_longest = max(longest, seq.admit_tokens(ADMIT_HEADROOM))
                # Padded layout: every row is as long as the longest one.
                if (len(running) + len(chosen) + 1) * new_longest > cfg.kv_cache_tokens and (running or chosen):
                    if now - seq.arrived >= OVERTAKE_S:
                        break
                    continue
                fresh = self._look_up(seq)
                if seq.prefix is not None and seq.prefix.next_key in computing:
                    continue  # a row prefilled now computes its next block: it finds it cached after that
                # A prefill's cost is its rows times the longest part any row computes.
                if chosen and (len(chosen) + 1) * max([fresh] + [s.context_length - s.prefix_tokens
                                                                 for s in chosen]) > budget:
                    break
                if not chosen and budget < cfg.max_batched_tokens and fresh > budget:
                    break  # what is left of this step's budget is too little: it goes first next step
                self._waiting.remove(seq)
                seq.admitted = seq.admitted or now
                chosen.append(seq)
                longest = new_longest
                if self._prefix is not None:
                    computing.update(self._prefix.keys(seq.context_ids))
                if fresh > cfg.max_batched_tokens:
                    break  # a long prompt is prefilled alone, in chunks
        return chosen

    def _look_up(self, seq: Sequence) -> int:
        """Find the cached prefix of ``seq``'s context; returns the tokens its prefill must compute."""
        if self._prefix is not None:  # the last token is always computed: its logits give the next token
            seq.prefix = self._prefix.match(seq.context_ids, limit=seq.context_length - 1)
            seq.prefix_tokens = seq.prefix.tokens
        return seq.context_length - seq.prefix_tokens

    def _prefill_some(self, budget: int) -> int:
        """One prefill (of new rows, or the next chunk of a long prompt) within ``budget`` prompt
        tokens; returns the tokens it charged to the step (0: nothing to prefill)."""
        full = self.config.max_batched_tokens
        if self._prefilling is None:
            chosen = self._admit(budget)
            if not chosen:
                return 0
            seq = chosen[0]
            fed = max(s.context_length - s.prefix_tokens for s in chosen)
            if len(chosen) > 1 or fed <= full:
                self._run_prefill(chosen, self._prefill_batch)
                return len(chosen) * fed  # at least 1: a row's last token is always computed
            self._prefilling = seq
            prefix = self._take_prefix(seq, seq.prefix_tokens)
            if prefix is not None:  # the chunks start where the cached prefix ends
                seq.prefill_cache, seq.prefilled = prefix_rows_cache([prefix]), seq.prefix_tokens
        elif budget < full:
            return 0  # a chunk takes a whole step's budget
        self._run_prefill([self._prefilling], self._prefill_chunk)
        return full

    def _run_prefill(self, seqs: list[Sequence], fn) -> None:
        self._admitting = list(seqs)
        try:
            batch = fn(seqs)
            if batch is None:
                return  # more chunks to go
            self._fork(batch)
            self.stats.prefills += 1
            self.stats.prompt_tokens += sum(len(s.prompt_ids) for s in seqs if not s.preemptions)
            self._remember(batch, list(range(len(batch.seqs))), extra=len(batch.seqs) * batch.mask.shape[1])
            self._emit(batch, sample(batch, batch.last_logits, self.device))
            del batch.last_logits
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

    def _fork(self, batch: Batch) -> None:
        """n > 1: the prompt was prefilled once; each other choice gets a copy of its row (KV cache included)
        and samples on its own from the first token on."""
        if not any(seq.forks for seq in batch.seqs):
            return
        rows, seqs = [], []
        for row, seq in enumerate(batch.seqs):
            for member in (seq, *seq.forks):
                member.admitted = seq.admitted
                rows.append(row)
                seqs.append(member)
            seq.forks = []
        logits = batch.last_logits[torch.tensor(rows, device=batch.last_logits.device)]
        select_rows(batch, rows)
        batch.seqs, batch.last_logits = seqs, logits
        self._admitting += [s for s in seqs if s not in self._admitting]  # an OOM from here on fails them too

    def _join(self, batch: Batch) -> None:
        """Add freshly prefilled rows to the running batch."""
        running = self._batch
        if running is None:
            self._batch = batch
            return
        try:
            self._batch = merge(running, batch)
        except BaseException:
            # The merge rewrites the running cache layer by layer: after a failure half-way it is
            # unusable, so its rows fail with the new ones.
            self._batch = None
            self._admitting += running.seqs
            raise
        self._batch.sampler = None  # composition changed

    def _prefill_batch(self, seqs: list[Sequence]) -> Batch:
        """One left-padded forward pass over the new rows; a row's cached prefix is not computed again."""
        contexts = [s.context_ids for s in seqs]
        lengths = [len(c) for c in contexts]
        ids, mask, positions, used = prefill_inputs(contexts, [s.prefix_tokens for s in seqs], self.device)
        gathered: dict = {}  # rows continuing the same cached blocks share one copy of them
        prefixes = [self._take_prefix(s, u, gathered) for s, u in zip(seqs, used)]
        cache = prefix_rows_cache(prefixes, room=ids.shape[1]) if max(used) else full_cache()
        self.stats.prefill_tokens += sum(lengths) - sum(used)
        log.debug("Prefill: %d row(s) of %d token(s) each, %d token(s) in all from the prefix cache",
                  len(seqs), ids.shape[1], sum(used))
        out = self._forward(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache,
                            logits_to_keep=1)
        batch = Batch(seqs=list(seqs), cache=cache, mask=mask,
                       positions=torch.tensor(lengths, device=self.device), last=ids[:, -1].clone())
        batch.last_logits = out.logits[:, -1, :]
        return batch

    def _prefill_chunk(self, seqs: list[Sequence]) -> Batch | None:
        (seq,) = seqs
        context = seq.context_ids
        start, total = seq.prefilled, len(context)
        end = min(total, start + self.config.max_batched_tokens)
        if seq.prefill_cache is None:
            seq.prefill_cache = full_cache()
        ids = torch.tensor([context[start:end]], device=self.device)
        out = self._forward(
            input_ids=ids,
            attention_mask=torch.ones((1, end), dtype=torch.long, device=self.device),
            position_ids=torch.arange(start, end, device=self.device)[None],
            cache=seq.prefill_cache, logits_to_keep=1,
        )
        seq.prefilled = end
        self.stats.prefill_tokens += end - start
        if end < total:
            return None
        self._prefilling = None
        cache, seq.prefill_cache = seq.prefill_cache, None
        batch = Batch(seqs=[seq], cache=cache, mask=torch.ones((1, total), dtype=torch.long, device=self.device),
                       positions=torch.tensor([total], device=self.device), last=ids[:, -1].clone())
        batch.last_logits = out.logits[:, -1, :]
        return batch

    def _take_prefix(self, seq: Sequence, tokens: int, gathered: dict | None = None) -> torch.Tensor | None:
        """The KV of ``seq``'s first ``tokens`` context tokens from the prefix cache (None for 0), counted
        (``gathered``: see `PrefixCache.gather`)."""
        match, seq.prefix, seq.prefix_tokens = seq.prefix, None, 0
        if self._prefix is None:
            return None
        self.stats.prefix_cache_queries += seq.context_length
        self.stats.prefix_cache_hits += tokens
        if not seq.preemptions:
            seq.cached_tokens = tokens
        return self._prefix.gather(match, tokens, gathered) if tokens else None

    def _remember(self, batch: Batch, rows: list[int], extra: int = 0, leaving: bool = False) -> None:
        """Put rows' KV (their context so far) into the prefix cache, within what the KV budget leaves
        (``extra``: slots used besides the running batch; ``leaving``: the rows' own slots are freed now)."""
        if self._prefix is None or not rows:
            return
        room = self.config.kv_cache_tokens - self._kv_in_use() - extra
        try:
            store_rows(self._prefix, batch, rows, room + (len(rows) * batch.mask.shape[1] if leaving else 0))
        except KVLayoutError as exc:
            log.warning("Prefix caching is off for this model: %s", exc)
            self._prefix = None
            return
        self.stats.prefix_cache_tokens = self._prefix.tokens

    def _kv_in_use(self) -> int:
        """KV slots the running batch and a chunked prefill hold now."""
        return (len(self._batch.seqs) * self._batch.mask.shape[1] if self._batch else 0) + \
            (self._prefilling.prefilled if self._prefilling else 0)

    def _forward(self, cache: DynamicCache, **kwargs):
        return self.model(**kwargs, **{self._cache_kw: cache}, use_cache=True)

    def _make_room(self) -> None:
        """Preempt the newest rows while the next decode step would take the cache over the KV budget.

        A preempted sequence goes back to the front of the queue with what it generated so far; when
        it is admitted again, its prompt and those tokens are prefilled anew and it carries on where it
        stopped (recompute preemption, as vLLM does), the client seeing only a pause. The oldest row
        always stays: alone it fits, since no request may need more than the whole budget.
        """
        batch = self._batch
        pending = self._prefilling.context_length if self._prefilling else 0  # its chunks hold cache too
        need = len(batch.seqs) * (batch.mask.shape[1] + 1) + pending
        self.stats.kv_cache_usage = min(1.0, need / self.config.kv_cache_tokens)
        if self._prefix is not None:  # cached prefixes give way to running rows
            self._prefix.shrink(self.config.kv_cache_tokens - need)
            self.stats.prefix_cache_tokens = self._prefix.tokens
        victims = []
        while len(batch.seqs) > 1 and len(batch.seqs) * (batch.mask.shape[1] + 1) + pending > \
                self.config.kv_cache_tokens:
            victims.append(batch.seqs[-1])  # rows are in admission order: the last is the newest
            select_rows(batch, list(range(len(batch.seqs) - 1)))
        if not victims:
            return
        with self._cond:
            for seq in victims:  # the oldest victim ends up first in the queue
                seq.preemptions += 1
                seq.prefilled, seq.prefill_cache = 0, None
                self._waiting.appendleft(seq)
        self.stats.preemptions += len(victims)
        log.info("KV budget full: preempted %d sequence(s); they resume when there is room", len(victims))

    def _decode(self) -> None:
        self._make_room()
        batch = self._batch
        assert batch is not None
        rows = len(batch.seqs)
        try:
            mask = torch.cat([batch.mask, torch.ones((rows, 1), dtype=batch.mask.dtype, device=self.device)], dim=1)
            out = self._forward(input_ids=batch.last[:, None], attention_mask=mask,
                                position_ids=batch.positions[:, None], cache=batch.cache)
            batch.mask = mask
            batch.positions = batch.positions + 1
            tokens = sample(batch, out.logits[:, -1, :], self.device)
        except torch.OutOfMemoryError:
            self._batch = None
            self._on_oom(batch.seqs)
            return
        self.stats.steps += 1
        self.stats.last_batch_size = rows
        self.stats.max_batch_size = max(self.stats.max_batch_size, rows)
        self._emit(batch, tokens)
        self._remember(batch, [i for i, s in enumerate(batch.seqs) if s.done], leaving=True)  # for a next turn
        self._select([i for i, s in enumerate(batch.seqs) if not s.done])

    def _emit(self, batch: Batch, tokens: torch.Tensor) -> None:
        now = time.monotonic()
        for seq, token in zip(batch.seqs, tokens.tolist()):
            seq.generated += 1
            # A grammar allows end of sequence only where it may end: there it ends even with ignore_eos.
            if token in self.eos and (not seq.params.ignore_eos or seq.matcher is not None):
                self._finish(seq, "stop")
                continue
            seq.output_ids.append(token)
            seq.events.put(token)
            if ended := end_reason(seq.matcher):  # the grammar is complete: nothing more may follow
                self._finish(seq, *ended)
            elif seq.generated >= seq.params.max_tokens:
                self._finish(seq, "length")
        self.stats.tokens_generated += len(batch.seqs)
        self.stats.recent.append((now, len(batch.seqs)))

    def _select(self, keep: list[int]) -> None:
        batch = self._batch
        if batch is None or len(keep) == len(batch.seqs):
            return
        if not keep:
            self._batch = None
            self.stats.last_batch_size = 0
            self.stats.kv_cache_usage = 0.0
            return
        select_rows(batch, keep)

    def _finish(self, seq: Sequence, reason: str, error: LLMCtlError | None = None) -> None:
        if not seq.done:
            seq.done = True
            seq.events.put(Finish(reason, error))
        for fork in seq.forks:  # choices not forked yet end with the sequence they wait on
            self._finish(fork, reason, error)
        seq.forks = []

    def _on_oom(self, seqs: list[Sequence]) -> None:
        self.stats.oom_events += 1
        if self._prefilling in seqs:
            self._prefilling = None  # a long prompt in mid-prefill goes on unless it was part of the failure
        for seq in seqs:
            seq.prefill_cache = None
            self._finish(seq, "error", GenerationOutOfMemory(
                "Out of memory while generating this request; it was stopped and the memory freed. "
                "Retry with a smaller max_tokens or a shorter prompt, or start the server with "
                "--load-in-8bit/--load-in-4bit or a lower --max-num-seqs."))
        from llmctl.core.loader import free_memory

        free_memory()
        log.error("Out of memory during generation: failed %d request(s), memory freed", len(seqs))

    def _fail_all_running(self, error: LLMCtlError) -> None:
        seqs = (self._batch.seqs if self._batch else []) + ([self._prefilling] if self._prefilling else [])
        seqs += [s for s in self._admitting if s not in seqs]
        self._batch, self._prefilling, self._admitting = None, None, []
        for seq in seqs:
            self._finish(seq, "error", error)

    def _shutdown(self) -> None:
        error = Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
        self._fail_all_running(error)
        with self._cond:
            while self._waiting:
                self._finish(self._waiting.popleft(), "error", error)
