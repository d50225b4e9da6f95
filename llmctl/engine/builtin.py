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
from contextlib import nullcontext

import torch
from transformers import DynamicCache

from llmctl.core import hardware
from llmctl.core.threads import ThreadTuner
from llmctl.engine import attention, invariant, thinking
from llmctl.engine.base import EngineConfig, EngineStats, Finish, Sequence
from llmctl.engine.batch import Batch, merge, sample, select_rows
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.draft import DraftModel
from llmctl.engine.kv import SharedView
from llmctl.engine.lora import LoraSet
from llmctl.engine.prefill import Prefills
from llmctl.engine.prefix_cache import KVLayoutError, PrefixCache, store_rows
from llmctl.engine.reproducible import decode_rows_alone
from llmctl.engine.shared import sharing_works
from llmctl.engine.speculative import Speculator, step_clock, verify
from llmctl.engine.structured import Grammars, attach_matchers, end_reason
from llmctl.errors import GenerationOutOfMemory, LLMCtlError, QueueFull, Unavailable

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0  # how often freed heap memory is handed back to the OS


class BuiltinEngine(Prefills):
    """Runs generation for all requests on one background thread (the `Engine` protocol)."""

    def __init__(self, model, eos_token_ids: frozenset[int], config: EngineConfig | None = None,
                 tokenizer=None, options: BuiltinOptions | None = None, draft_model=None,
                 threads: ThreadTuner | None = None) -> None:
        self.model = model
        self.threads = threads  # None: torch's thread count is left as it is
        self.config = config or EngineConfig()
        self.options = options or BuiltinOptions()
        self.eos = eos_token_ids
        self.device = model.get_input_embeddings().weight.device
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.stats = EngineStats()
        self.attention = attention.select(model, self.options.attention)
        log.info("Attention: %s", self.attention)
        # Always, not only with speculation: a verifying pass must compute what a plain step computes.
        if invariant.widen(model):
            log.info("One-row products run as two rows (the same rounding as a verifying pass's)")
        self.lora: LoraSet | None = None  # LoRA adapters (enable_lora), applied per row in every forward pass
        self._prefix = PrefixCache(self.config.prefix_cache_tokens) if self.config.prefix_cache_tokens else None
        # Constrained decoding maps grammars onto token ids: it needs the tokenizer.
        self.grammars = Grammars(tokenizer, self.vocab_size, eos_token_ids, stats=self.stats.grammar) \
            if tokenizer is not None else None
        # transformers renamed `past_key_values` to `cache`; pass whichever this version takes.
        self._cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.inference_mode():  # a row reading a shared prefix computes its attention differently
            self._share = self._prefix is not None and not self.options.deterministic and \
                sharing_works(model, self.attention, self._forward)
        if self._prefix is not None:
            log.info("Shared prefixes: %s", "on" if self._share else "off (each row holds its own copy)")
        self.speculator = self._make_speculator(draft_model)
        self._waiting: deque[Sequence] = deque()
        self._prefilling: Sequence | None = None
        self._admitting: list[Sequence] = []  # taken from the queue, not yet in the batch
        self._batch: Batch | None = None
        self._cond = threading.Condition()
        self._stopping = False
        self._last_trim = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="llmctl-engine", daemon=True)

    def _make_speculator(self, draft_model) -> Speculator | None:
        spec = self.config.speculative
        if spec is None:
            return None
        if self.options.deterministic:  # a verifying pass computes several tokens per row, not each row alone
            log.warning("Speculative decoding is off: --deterministic computes every decode step row by row")
            return None
        proposer = None
        if spec.method == "draft_model":
            if draft_model is None:
                raise ValueError("the draft_model method needs the draft model, loaded")
            proposer = DraftModel(draft_model, self.vocab_size)
        log.info("Speculative decoding: %s", spec.describe())
        return Speculator(spec, self.eos, self.config.kv_cache_tokens, proposer=proposer,
                          stats=self.stats.speculative)

    # ---- public, thread-safe -------------------------------------------------------------
    def enable_lora(self, max_loras: int, max_rank: int) -> LoraSet:
        """Serve LoRA adapters (before `start`): each request's rows compute with the adapter it names."""
        self.lora = LoraSet(self.model, max_loras, max_rank)
        return self.lora

    def use_reasoning(self, parser: str | None) -> None:
        """Nothing to set up: each request's ``params.thinking`` carries the token ids (`llmctl.engine.thinking`)."""

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
        """Raise QueueFull at once when the waiting queue is full (before any tokenization).

        A new request waits only for a slot that no one else will take: arrivals that free batch slots
        will admit at the next step are not waiting (a burst fills the free slots before the queue)."""
        free_slots = max(0, self.config.max_num_seqs - self.running)
        if len(self._waiting) - free_slots >= self.config.max_waiting:
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
        thinking.attach((seq, *seq.forks))
        with self._cond:
            if self._stopping:
                raise Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
            self.check_capacity()
            for member in (seq, *seq.forks):
                if member.adapter is not None and self.lora is not None:
                    member.cache_root = self.lora.cache_root(member.adapter)
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
        self._await_burst()
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
        return (self._batch.kv_slots if self._batch else 0) + \
            (self._prefilling.prefilled if self._prefilling else 0)

    def _forward(self, cache: DynamicCache, shared: SharedView | None = None, seqs: list[Sequence] | None = None,
                 **kwargs):
        """One forward pass; ``seqs``: the sequence of each row, whose LoRA adapter it computes with."""
        if shared is not None:
            kwargs["shared_prefix"] = shared
        rows = self.lora.rows([s.adapter for s in seqs]) if self.lora is not None and seqs else nullcontext()
        with rows:
            out = self.model(**kwargs, **{self._cache_kw: cache}, use_cache=True)
        if shared is not None and len(shared.layers) != len(cache.layers):  # `sharing_works` makes sure it is not
            raise RuntimeError(f"{len(cache.layers) - len(shared.layers)} layer(s) did not read the shared prefix")
        return out

    def _make_room(self, batch: Batch) -> None:
        """Preempt the newest rows while the next decode step would take the cache over the KV budget.

        A preempted sequence goes back to the front of the queue with what it generated so far; when
        it is admitted again, its prompt and those tokens are prefilled anew and it carries on where it
        stopped (recompute preemption, as vLLM does), the client seeing only a pause. The oldest row
        always stays: alone it fits, since no request may need more than the whole budget.
        """
        pending = self._prefilling.context_length if self._prefilling else 0  # its chunks hold cache too
        need = batch.kv_slots + len(batch.seqs) + pending
        self.stats.kv_cache_usage = min(1.0, need / self.config.kv_cache_tokens)
        if self._prefix is not None:  # cached prefixes give way to running rows
            self._prefix.shrink(self.config.kv_cache_tokens - need)
            self.stats.prefix_cache_tokens = self._prefix.tokens
        victims = []
        while len(batch.seqs) > 1 and batch.kv_slots + len(batch.seqs) + pending > self.config.kv_cache_tokens:
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
        batch = self._batch
        assert batch is not None
        self._make_room(batch)  # in place: the batch loses its newest rows when the KV budget is full
        rows = len(batch.seqs)
        clock = step_clock(self.device)
        started = clock()  # a step's time includes proposing its drafts (a draft model's passes)
        if self.speculator is not None and self.threads is not None:  # drafts are weighed at the count in use
            self.speculator.threads = self.threads.prepare(rows)  # its batch size's, which a draft model uses too
        drafts = self.speculator.plan(batch) if self.speculator is not None else None
        # Steps are compared by what they compute: the rows, and the drafted tokens a verifying step adds.
        fed = rows + sum(map(len, drafts or ()))
        if self.threads is not None:
            self.threads.before_step((rows, fed))
        computed = time.perf_counter()  # wall time: more threads spend more CPU seconds to take less of it
        try:
            if drafts is not None:
                shared = SharedView.of(batch.shared, batch.shared_lengths)
                accepted = verify(batch, drafts, lambda **kw: self._forward(cache=batch.cache, shared=shared,
                                                                        seqs=batch.seqs, **kw)
                                  .logits, self.device, self._emit_token)
            else:
                mask = torch.cat([batch.mask, torch.ones((rows, 1), dtype=batch.mask.dtype, device=self.device)],
                                 dim=1)
                if self.options.deterministic:  # every row a pass of its own: what it computes alone
                    logits = decode_rows_alone(self._forward, batch)
                else:
                    logits = self._forward(input_ids=batch.last[:, None], attention_mask=mask,
                                           position_ids=batch.positions[:, None], cache=batch.cache,
                                           shared=SharedView.of(batch.shared, batch.shared_lengths),
                                           seqs=batch.seqs).logits[:, -1, :]
                batch.mask = mask
                batch.positions = batch.positions + 1
                tokens = sample(batch, logits, self.device)
        except torch.OutOfMemoryError:
            self._batch = None
            self._on_oom(batch.seqs)
            return
        if self.threads is not None:
            self.threads.after_step((rows, fed), time.perf_counter() - computed)
        self.stats.steps += 1
        self.stats.last_batch_size = rows
        self.stats.max_batch_size = max(self.stats.max_batch_size, rows)
        if drafts is None:
            self._emit(batch, tokens)
        else:
            self._count(rows + sum(accepted))
        if self.speculator is not None:  # a step's time, to weigh what drafts cost against what they give
            self.speculator.record(batch.seqs, drafts or [[]] * rows, accepted if drafts else [0] * rows, fed,
                                   clock() - started, self.threads.applied if self.threads is not None else None)
        self._remember(batch, [i for i, s in enumerate(batch.seqs) if s.done], leaving=True)  # for a next turn
        self._select([i for i, s in enumerate(batch.seqs) if not s.done])

    def _emit(self, batch: Batch, tokens: torch.Tensor) -> None:
        for seq, token in zip(batch.seqs, tokens.tolist(), strict=False):
            self._emit_token(seq, token)
        self._count(len(batch.seqs))

    def _count(self, tokens: int) -> None:
        self.stats.tokens_generated += tokens
        self.stats.recent.append((time.monotonic(), tokens))

    def _emit_token(self, seq: Sequence, token: int) -> bool:
        """Hand ``token`` to ``seq``'s reader, or finish the sequence on it; False once the sequence is over."""
        seq.generated += 1
        # A grammar allows end of sequence only where it may end: there it ends even with ignore_eos.
        if token in self.eos and (not seq.params.ignore_eos or seq.matcher is not None):
            # A matcher that failed while computing its mask allows only end of sequence: that is its error.
            ended = end_reason(seq.matcher)
            self._finish(seq, *(ended if ended and ended[0] == "error" else ("stop",)))
            return False
        seq.output_ids.append(token)
        seq.events.put(token)
        if ended := end_reason(seq.matcher):  # the grammar is complete: nothing more may follow
            self._finish(seq, *ended)
        elif seq.generated >= seq.params.max_tokens:
            self._finish(seq, "length")
        return not (seq.done or seq.cancelled)

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
