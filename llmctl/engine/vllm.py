"""vLLM's engine behind llmctl's engine interface: `LLMEngine` built and driven in-process, from one thread.

The service hands over token ids and sampling settings (`Sequence`); one thread owns vLLM's
`LLMEngine`: it feeds new sequences to `add_request`, calls `step`, turns each request's new
tokens (vLLM's delta outputs) into events on the sequence's queue, and calls `abort_request` for
sequences that were cancelled or ran past their deadline, which frees their KV blocks in vLLM.
Text, stop strings and the HTTP side stay llmctl's, as with the builtin engine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING

from llmctl.engine import structured
from llmctl.engine.base import EngineConfig, EngineStats, Finish, Sequence
from llmctl.engine.sampling import SamplingParams, TokenLogprobs
from llmctl.engine.vllm_lora import VllmAdapters
from llmctl.engine.vllm_setup import VllmModel, VllmOptions, engine_args
from llmctl.errors import InvalidRequest, LLMCtlError, ModelLoadError, QueueFull, Unavailable

if TYPE_CHECKING:
    from vllm import LLMEngine

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.05  # how long the engine thread sleeps when nothing runs, between checks for new work
# The SamplingParams fields this engine maps onto vLLM's; any other field set to a non-default
# value is a feature the builtin engine has and this one does not (yet): a 400, not a silent ignore.
MAPPED_FIELDS = frozenset({"max_tokens", "temperature", "top_p", "frequency_penalty", "presence_penalty",
                           "logit_bias", "seed", "ignore_eos", "logprobs", "constraint", "thinking"})


class VllmEngine:
    """Runs generation on vLLM's engine, owned by one background thread."""

    def __init__(self, model: VllmModel, options: VllmOptions, eos_token_ids: frozenset[int],
                 config: EngineConfig | None = None, build_timeout: float = 3600.0) -> None:
        self.model = model
        self.options = options
        self.config = config or EngineConfig()
        self.eos = eos_token_ids
        self.stats = EngineStats()
        self.build_timeout = build_timeout
        self.build_seconds: float | None = None
        self.kv_capacity_tokens = 0  # what vLLM actually allocated, in tokens (whole blocks)
        self._inbox: deque[Sequence] = deque()
        self._active: dict[str, Sequence] = {}  # in vLLM: request id -> sequence
        self._cond = threading.Condition()
        self._stopping = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.vllm_engine: LLMEngine | None = None  # only the engine thread calls it (`_llm`)
        # vLLM's reasoning parser (`use_reasoning`): its structured outputs start after the thinking, and its
        # thinking_token_budget closes the thinking with the parser's end marker. Whether budgets work is
        # known once the engine is built (the parser must name a start and an end marker).
        self.reasoning_parser: str | None = None
        self.budgets = False
        self.lora: VllmAdapters | None = None
        self._thread = threading.Thread(target=self._run, name="llmctl-vllm-engine", daemon=True)

    # ---- public, thread-safe -------------------------------------------------------------
    def enable_lora(self, max_loras: int, max_rank: int) -> VllmAdapters:
        """Serve LoRA adapters with vLLM's own LoRA support (`max_loras`, `max_lora_rank`); before `start`."""
        self.lora = VllmAdapters(max_loras, max_rank, self.model.folder)
        return self.lora

    def use_reasoning(self, parser: str | None) -> None:
        self.reasoning_parser = parser

    def start(self) -> None:
        """Build vLLM's engine on the engine thread and wait for it (minutes on a CPU: it compiles)."""
        self._thread.start()
        if not self._ready.wait(self.build_timeout):
            raise ModelLoadError(f"vLLM's engine was not built within {self.build_timeout:.0f} s.")
        if self._error is not None:
            raise self._error

    def stop(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def running(self) -> int:
        """Sequences vLLM schedules: all of those it holds, up to --max-num-seqs."""
        return min(len(self._active), self.config.max_num_seqs)

    @property
    def waiting(self) -> int:
        """Sequences beyond --max-num-seqs: they wait in vLLM's queue (or for the engine thread to hand them
        over; those that will find a free slot there do not count)."""
        return max(0, len(self._inbox) + len(self._active) - self.config.max_num_seqs)

    def check_capacity(self) -> None:
        """Raise QueueFull at once when the waiting queue is full (before any tokenization)."""
        if self.waiting >= self.config.max_waiting:
            raise QueueFull(
                f"The server is at capacity ({self.config.max_waiting} requests waiting); retry shortly.",
                retry_after=1,
            )

    def submit(self, seq: Sequence) -> Sequence:
        check_supported(seq.params)
        thinking = seq.params.thinking
        if thinking is not None and thinking.budget is not None and not self.budgets:
            raise InvalidRequest(f"A thinking budget is not available on the vllm engine with the reasoning parser "
                                 f"'{self.reasoning_parser}' (vLLM knows no start and end of its thinking); serve "
                                 "with --engine builtin for it.", param="thinking_token_budget")
        # Each choice of n > 1 is a request of its own (vLLM's prefix cache shares the prompt).
        members, seq.forks = [seq, *seq.forks], []
        with self._cond:
            if self._stopping or self.vllm_engine is None:
                raise Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
            self.check_capacity()
            self._inbox.extend(members)
            self._cond.notify()
        return seq

    # ---- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            started = time.perf_counter()
            self.vllm_engine = self._build()
            self.build_seconds = time.perf_counter() - started
            log.info("vLLM engine built in %.1f s (KV cache: %d tokens)", self.build_seconds,
                     self.kv_capacity_tokens)
        except BaseException as exc:  # reported by start(), on the loading thread
            self._error = exc if isinstance(exc, LLMCtlError) else ModelLoadError(
                f"vLLM could not build its engine: {_one_line(exc)}")
            log.debug("vLLM engine build failed", exc_info=True)
            self._ready.set()
            return
        self._ready.set()
        try:
            self._loop()
        finally:
            self._shutdown()

    @property
    def _llm(self) -> LLMEngine:
        """vLLM's engine, once `_run` built it."""
        if self.vllm_engine is None:
            raise RuntimeError("vLLM's engine is not built")
        return self.vllm_engine

    def _loop(self) -> None:
        engine = self._llm
        while True:
            with self._cond:
                if not self._stopping and not self._inbox and not self._active:
                    self._cond.wait(IDLE_WAIT_S)
                if self._stopping:
                    return
                new = list(self._inbox)
                self._inbox.clear()
            if self.lora is not None:  # adapters unloaded since the last step (no request uses them any more)
                for lora_id in self.lora.take_removed():
                    engine.remove_lora(lora_id)
            for seq in new:
                self._add(seq)
            self._expire()
            if not self._active:
                continue
            try:
                outputs = engine.step()
            except Exception:  # a bug must not kill the engine thread: fail what ran, keep serving
                log.exception("vLLM engine step failed")
                self._fail_active(LLMCtlError("Internal error during generation; see the server log."))
                continue
            self.stats.steps += 1
            self._deliver(outputs)

    def _add(self, seq: Sequence) -> None:
        from vllm.inputs import TokensPrompt

        if seq.cancelled:
            self._finish(seq, "cancelled")
            return
        request_id = str(seq.id)
        try:
            self._llm.add_request(request_id, TokensPrompt(prompt_token_ids=list(seq.prompt_ids)),
                                  to_vllm_params(seq.params, self.eos),
                                  lora_request=self.lora.request(seq.adapter) if self.lora else None)
        except ValueError as exc:  # vLLM's own validation: a client mistake the service did not catch
            self._finish(seq, "error", InvalidRequest(f"vLLM rejected the request: {_one_line(exc)}"))
            return
        except Exception:
            log.exception("vLLM add_request failed")
            self._finish(seq, "error", LLMCtlError("Internal error while queueing the request; see the server log."))
            return
        self._active[request_id] = seq
        self.stats.prompt_tokens += len(seq.prompt_ids)

    def _expire(self) -> None:
        now = time.monotonic()
        gone = [(rid, seq, "cancelled" if seq.cancelled else "timeout") for rid, seq in self._active.items()
                if seq.cancelled or (seq.deadline is not None and now >= seq.deadline)]
        if not gone:
            return
        # Frees the requests' KV blocks in vLLM before the next step.
        self._llm.abort_request([rid for rid, _, _ in gone])
        for rid, seq, reason in gone:
            del self._active[rid]
            self._finish(seq, reason)

    def _deliver(self, outputs) -> None:
        now = time.monotonic()
        tokens = 0
        for out in outputs:
            seq = self._active.get(out.request_id)
            if seq is None or not out.outputs:
                continue
            completion = out.outputs[0]
            ids = list(completion.token_ids)
            logprobs = completion.logprobs or []
            finished = completion.finish_reason
            if finished == "stop" and ids and ids[-1] in self.eos and not seq.params.ignore_eos:
                ids.pop()  # the end-of-sequence token is counted but not sent, as the builtin engine does
            if seq.admitted is None and (ids or finished):
                seq.admitted = now
                self.stats.prefills += 1
            for i, token in enumerate(ids):
                if seq.params.logprobs is not None and i < len(logprobs):
                    seq.logprobs.append(_token_logprobs(token, logprobs[i], seq.params.logprobs))
                seq.generated += 1
                seq.output_ids.append(token)
                seq.events.put(token)
            tokens += len(ids) + (1 if finished == "stop" and len(ids) < len(completion.token_ids) else 0)
            if finished or out.finished:
                del self._active[out.request_id]
                self._finish(seq, "length" if finished == "length" else "stop" if finished == "stop" else "cancelled")
        if tokens:
            self.stats.tokens_generated += tokens
            self.stats.recent.append((now, tokens))

    def _finish(self, seq: Sequence, reason: str, error: LLMCtlError | None = None) -> None:
        if not seq.done:
            seq.done = True
            seq.events.put(Finish(reason, error))

    def _fail_active(self, error: LLMCtlError) -> None:
        if self._active:
            try:
                self._llm.abort_request(list(self._active))
            except Exception:
                log.exception("vLLM abort_request failed")
        for seq in self._active.values():
            self._finish(seq, "error", error)
        self._active.clear()

    def _shutdown(self) -> None:
        with self._cond:
            queued, self._inbox = list(self._inbox), deque()
        error = Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
        self._fail_active(error)
        for seq in queued:
            self._finish(seq, "error", error)
        try:
            self._llm.engine_core.shutdown()
        except Exception:
            log.debug("vLLM engine shutdown failed", exc_info=True)

    # ---- building -------------------------------------------------------------------------
    def _build(self):
        # In-process engine core: the engine lives on this thread, not in a child process.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM's log records go through llmctl's logging set-up (one format, one stream).
        os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        from vllm import EngineArgs
        from vllm.config import StructuredOutputsConfig
        from vllm.v1.engine.llm_engine import LLMEngine

        _tolerate_context_proxies()
        # Constraints run on llguidance, the builtin engine's grammar engine (see _structured_outputs).
        lora = self.lora.engine_args() if self.lora is not None else {}
        reasoning_parser = {"reasoning_parser": self.reasoning_parser} if self.reasoning_parser else {}
        args = EngineArgs(**engine_args(self.model, self.options, self.config), **lora, **reasoning_parser,
                          structured_outputs_config=StructuredOutputsConfig(backend="guidance"))
        try:
            vllm_config = args.create_engine_config()
        except (ValueError, TypeError) as exc:
            raise ModelLoadError(f"vLLM rejected the settings: {_one_line(exc)}") from exc
        reasoning = vllm_config.reasoning_config
        self.budgets = reasoning is not None and reasoning.enabled
        if self.reasoning_parser:
            log.info("vLLM's reasoning parser %s: constraints start after the thinking; thinking budgets %s",
                     self.reasoning_parser, "enforced" if self.budgets else "not available (no start/end markers)")
        self._size_kv_cache(vllm_config)
        return LLMEngine.from_vllm_config(vllm_config, stat_loggers=[self._stat_logger_factory()])

    def _size_kv_cache(self, vllm_config) -> None:
        """--kv-cache-tokens as vLLM's KV cache: whole blocks for that many tokens, and their bytes."""
        model, cache = vllm_config.model_config, vllm_config.cache_config
        parallel = vllm_config.parallel_config
        import torch

        dtype = model.dtype if cache.cache_dtype == "auto" else getattr(torch, str(cache.cache_dtype), model.dtype)
        layers = model.get_num_layers(parallel)
        per_token = 2 * layers * model.get_num_kv_heads(parallel) * model.get_head_size() * dtype.itemsize
        blocks = max(1, math.ceil(self.config.kv_cache_tokens / cache.block_size))
        tokens = blocks * cache.block_size
        max_len = model.max_model_len
        if tokens < max_len:
            raise ModelLoadError(
                f"--kv-cache-tokens {self.config.kv_cache_tokens} is less than the context length ({max_len}): "
                f"vLLM needs room for one full-length request. Raise --kv-cache-tokens or lower --max-model-len.")
        cache.kv_cache_memory_bytes = tokens * per_token
        cache.num_gpu_blocks_override = blocks
        self.kv_capacity_tokens = tokens
        self.stats.prefix_cache_tokens = tokens if self.options.enable_prefix_caching else 0

    def _stat_logger_factory(self):
        from vllm.v1.metrics.loggers import StatLoggerBase

        stats = self.stats

        class _Stats(StatLoggerBase):
            """Copies vLLM's per-step scheduler and iteration stats into llmctl's EngineStats."""

            def __init__(self, vllm_config, engine_index: int = 0) -> None:
                pass

            def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
                if scheduler_stats is not None:
                    stats.last_batch_size = scheduler_stats.num_running_reqs
                    stats.max_batch_size = max(stats.max_batch_size, scheduler_stats.num_running_reqs)
                    stats.kv_cache_usage = scheduler_stats.kv_cache_usage
                    prefix = scheduler_stats.prefix_cache_stats
                    if prefix is not None:
                        stats.prefix_cache_queries += prefix.queries
                        stats.prefix_cache_hits += prefix.hits
                    spec = getattr(scheduler_stats, "spec_decoding_stats", None)
                    if spec is not None:  # vLLM's drafts in llmctl's counters (one emitted token per draft too)
                        stats.speculative.drafts += spec.num_drafts
                        stats.speculative.draft_tokens += spec.num_draft_tokens
                        stats.speculative.accepted_tokens += spec.num_accepted_tokens
                        stats.speculative.emitted_tokens += spec.num_accepted_tokens + spec.num_drafts
                if iteration_stats is not None:
                    stats.preemptions += iteration_stats.num_preempted_reqs

            def log_engine_initialized(self) -> None:
                pass

        return _Stats


def check_supported(params: SamplingParams) -> None:
    """400 for a request feature that this engine does not map onto vLLM."""
    if params.constraint is not None:  # compiled by vLLM's guidance backend: checked here, before queueing
        structured.check(params.constraint)
    for f in dataclasses.fields(params):
        if f.name in MAPPED_FIELDS:
            continue
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if getattr(params, f.name) != default:
            raise InvalidRequest(f"'{f.name}' is not supported on the vllm engine yet; serve with --engine builtin "
                                 "for it.", param=f.name)


def to_vllm_params(params: SamplingParams, eos: frozenset[int]):
    """llmctl's sampling settings as vLLM's. Both take OpenAI's additive frequency/presence penalties and
    report log-probabilities of the model's own distribution (before temperature, penalties and bias)."""
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    greedy = params.greedy
    return VllmSamplingParams(
        max_tokens=params.max_tokens,
        temperature=0.0 if greedy else params.temperature,
        top_p=1.0 if greedy else params.top_p,
        frequency_penalty=params.frequency_penalty,
        presence_penalty=params.presence_penalty,
        logit_bias=dict(params.logit_bias) or None,
        seed=params.seed,
        ignore_eos=params.ignore_eos,
        # vLLM has no tokenizer here (llmctl owns text), so it learns the end-of-sequence ids from us.
        stop_token_ids=None if params.ignore_eos else sorted(eos),
        logprobs=params.logprobs,
        detokenize=False,
        output_kind=RequestOutputKind.DELTA,
        structured_outputs=_structured_outputs(params.constraint),
        # vLLM closes the thinking with its reasoning parser's end marker (the parser is set where the engine is
        # built); where the thinking starts and whether the prompt opened it, vLLM reads from the token ids.
        thinking_token_budget=params.thinking.budget if params.thinking is not None else None,
    )


def _structured_outputs(constraint: structured.Constraint | None):
    """llmctl's constraint as vLLM's. vLLM runs it with its `guidance` backend (engine_args), which is
    llguidance, the builtin engine's grammar engine: the same grammar dialects and the same JSON layout."""
    if constraint is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if constraint.kind == "json":
        return StructuredOutputsParams(json=structured.json_schema_with_options(constraint))
    if constraint.kind == "choice":
        return StructuredOutputsParams(choice=json.loads(constraint.spec))
    return StructuredOutputsParams(**{constraint.kind: constraint.spec})  # regex, grammar


def _token_logprobs(token: int, entry: dict, top_n: int) -> TokenLogprobs:
    chosen = entry.get(token)
    ranked = sorted(((lp.rank, tid, lp.logprob) for tid, lp in entry.items() if lp.rank is not None))
    top = [(tid, logprob) for rank, tid, logprob in ranked if rank <= top_n][:top_n]
    return TokenLogprobs(token, chosen.logprob if chosen is not None else float("-inf"), top)


def _tolerate_context_proxies() -> None:
    """vLLM's CPU build rebinds some kernels by scanning the globals of every imported module with
    hasattr(). Flask's request and app-context proxies, which the server imports, raise RuntimeError
    there (not AttributeError) outside a request, which would abort the engine build; for that scan,
    an object that cannot be asked simply has no such attribute. (Worker processes are forked from
    this one, so they inherit it.)"""
    try:
        from vllm.triton_utils import dispatcher
    except ImportError:
        return

    def safe_hasattr(obj: object, name: str) -> bool:
        try:
            return hasattr(obj, name)
        except Exception:
            return False

    # With speculative decoding the same scan reads vars() of every global that has a __dict__; llvmlite's
    # library proxy (numba's, which vLLM's n-gram proposer imports) answers any attribute, __dict__ too, with
    # a function wrapper, not a mapping: for the scan, such an object has no instance attributes.
    def safe_vars(obj: object) -> Mapping:
        try:
            found = vars(obj)
        except TypeError:
            return {}
        return found if isinstance(found, Mapping) else {}

    dispatcher.hasattr = safe_hasattr
    dispatcher.vars = safe_vars


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:500]

