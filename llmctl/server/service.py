"""The service's state (loading, ready, error, draining) and the request pipeline the API modules share."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from llmctl import __version__
from llmctl.core import hardware
from llmctl.core.adapters import DEFAULT_MAX_LORA_RANK, DEFAULT_MAX_LORAS, AdapterSpec
from llmctl.core.loader import LoadedModel, LoadOptions, load_model
from llmctl.core.threads import policy as thread_policy
from llmctl.engine.base import Engine, EngineConfig, EngineOptions, Loader, Sequence
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.text import TokenText
from llmctl.errors import LLMCtlError, Unavailable
from llmctl.server.admission import Admission, AdmissionLimits
from llmctl.server.context import RequestContext, not_found
from llmctl.server.generation import Generation
from llmctl.server.limits import RequestLimits
from llmctl.server.loras import Loras
from llmctl.server.metrics import ServiceMetrics, prefix_cache_json, speculative_json
from llmctl.server.pipeline import Ask, Run, sampling_params
from llmctl.server.reasoning import ReasoningParser, ReasoningParserName, resolve_reasoning
from llmctl.server.store import ResponseState
from llmctl.server.tools import (
    ToolCallParser,
    ToolParser,
    hidden_specials,
    resolve_parser,
    special_tokens,
)

log = logging.getLogger(__name__)
Status = Literal["loading", "ready", "error", "shutting_down", "stopped"]  # /health's "status"


@dataclass(frozen=True)
class ServiceSettings:
    """What the service needs besides the HTTP listener."""

    load: LoadOptions = field(default_factory=LoadOptions)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # Which engine, with its own settings (llmctl.server.engines.ENGINES names each engine's type).
    engine_options: EngineOptions = field(default_factory=BuiltinOptions)
    request_timeout: float = 60.0
    max_tokens_cap: int | None = None
    default_max_tokens: int | None = None
    max_messages: int = 1024
    tool_call_parser: ToolCallParser | None = "auto"  # a key of llmctl.server.tools.PARSERS, "auto" or "none"
    reasoning_parser: ReasoningParserName | None = "auto"  # a key of llmctl.server.reasoning.PARSERS, "auto", "none"
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)  # unset bounds derive from `engine`
    loras: tuple[AdapterSpec, ...] = ()  # LoRA adapters served from the start, each as a model of its own
    enable_lora: bool = False  # serve adapters (loaded at run time) even when none is given at the start
    max_loras: int = DEFAULT_MAX_LORAS  # adapters resident at once
    max_lora_rank: int = DEFAULT_MAX_LORA_RANK

    @property
    def lora_enabled(self) -> bool:
        return self.enable_lora or bool(self.loras)


class Service:
    """Owns the model and the engine; every route calls into one of its methods."""

    def __init__(self, settings: ServiceSettings, loader: Loader = load_model,
                 responses: ResponseState | None = None) -> None:
        self.settings = settings
        self.responses = responses  # stored responses and conversations; None with --responses-store none
        self.loader = loader
        self.metrics = ServiceMetrics()
        self.metrics.watch_engine(lambda: self.engine)
        self.status: Status = "loading"
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.loras: Loras | None = None  # the LoRA adapters served beside the model (--lora)
        self.token_text: TokenText | None = None  # token ids to bytes, for logprobs
        self.tool_format: type[ToolParser] | None = None  # the family whose tool calls are parsed
        self.reasoning_format: type[ReasoningParser] | None = None  # the family whose thinking is split out
        self.hidden_specials: frozenset[int] | None = None  # special tokens left out of the text (None: all)
        self.grammar_specials: frozenset[str] = frozenset()  # the text of the special tokens, named so in grammars
        self.draining = False
        self.created = int(time.time())
        self._inflight = 0
        self._inflight_lock = threading.Condition()
        engine = settings.engine
        self.admission = Admission(settings.admission.derive(
            max_num_seqs=engine.max_num_seqs, max_waiting=engine.max_waiting, kv_cache_tokens=engine.kv_cache_tokens))

    # ---- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and start the engine; failures leave the service answering 'error'."""
        try:
            loaded, engine = self.settings.engine_options.build(self.settings.load, self.settings.engine, self.loader)
            loras = self._serve_loras(engine, loaded.name)
            # Before the engine starts: vLLM's engine builds its reasoning parser in (constraints after thinking).
            self.reasoning_format, why = resolve_reasoning(self.settings.reasoning_parser, loaded.tokenizer)
            log.info("Reasoning: %s (%s)", self.reasoning_format.name if self.reasoning_format else "not parsed", why)
            engine.use_reasoning(self.reasoning_format.name if self.reasoning_format else None)
            engine.start()
        except LLMCtlError as exc:
            log.error("Model failed to load: %s", exc.message)
            self.error, self.status = exc.message, "error"
            return
        except Exception as exc:
            log.exception("Model failed to load")
            self.error, self.status = f"{type(exc).__name__}: {exc}".splitlines()[0][:500], "error"
            return
        self.loaded, self.engine, self.loras = loaded, engine, loras
        self.token_text = TokenText(loaded.tokenizer)
        self.tool_format, why = resolve_parser(self.settings.tool_call_parser, loaded.tokenizer)
        log.info("Tool calls: %s (%s)", self.tool_format.name if self.tool_format else "not parsed", why)
        self.hidden_specials = hidden_specials(loaded.tokenizer, self.tool_format, self.reasoning_format)
        self.grammar_specials = frozenset(special_tokens(loaded.tokenizer).values())
        self.status = "ready"
        log.info("Ready: serving %s", loaded.name)

    def _serve_loras(self, engine: Engine, base: str) -> Loras | None:
        """The adapters the settings name, loaded onto ``engine`` before it starts (a bad one fails the start)."""
        settings = self.settings
        if not settings.lora_enabled:
            return None
        loras = Loras(engine.enable_lora(settings.max_loras, settings.max_lora_rank), base)
        for spec in settings.loras:
            loras.add(spec)
        return loras

    def load_in_background(self) -> threading.Thread:
        thread = threading.Thread(target=self.load, name="llmctl-loader", daemon=True)
        thread.start()
        return thread

    def begin_drain(self) -> None:
        self.draining = True

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight; False if ``timeout`` passed first."""
        deadline = time.monotonic() + timeout
        with self._inflight_lock:
            while self._inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._inflight_lock.wait(left)
        return True

    def shutdown(self) -> None:
        if self.responses is not None:  # first: its unfinished background responses end failed, not stuck
            self.responses.close()
            self.responses = None
        if self.engine is not None:
            self.engine.stop()
        if self.loaded is not None:
            self.loaded.unload()
        self.status = "stopped"

    @property
    def inflight(self) -> int:
        return self._inflight

    def _enter(self) -> None:
        with self._inflight_lock:
            self._inflight += 1

    def _leave(self) -> None:
        with self._inflight_lock:
            self._inflight -= 1
            self._inflight_lock.notify_all()

    # ---- read-only views -------------------------------------------------------------------
    def require_ready(self) -> tuple[LoadedModel, Engine]:
        if self.draining:
            raise Unavailable("The server is shutting down.", retry_after=None, code="shutting_down")
        if self.status == "loading":
            raise Unavailable("The model is still loading; retry shortly.", retry_after=5, code="model_loading")
        if self.status != "ready" or self.loaded is None or self.engine is None:
            raise Unavailable(f"The model failed to load: {self.error}", retry_after=None, code="model_load_failed")
        return self.loaded, self.engine

    def metrics_json(self) -> dict:
        gpu = hardware.gpu_memory()
        engine = self.engine
        names = hardware.gpu_names()
        body = {
            "service": "llmctl",
            "version": __version__,
            "status": self.status,
            "model_loaded": self.status == "ready",
            "model_name": self.loaded.name if self.loaded else None,
            "device": self.loaded.device if self.loaded else None,
            "gpu_memory_allocated_gb": round(gpu.allocated_gb, 3),
            "gpu_memory_reserved_gb": round(gpu.reserved_gb, 3),
            "gpu_name": names[0] if names else None,
            "process_rss_gb": round(hardware.process_rss_gb(), 3),
            **thread_policy().report(),
            "cpu_thread_switches": thread_policy().switches,
            **self.metrics.snapshot(),
            "running": engine.running if engine else 0,
            "waiting": engine.waiting if engine else 0,
            "batch_size": engine.stats.last_batch_size if engine else 0,
            "max_batch_size_seen": engine.stats.max_batch_size if engine else 0,
            "engine_tokens_per_second": round(engine.stats.tokens_per_second(), 2) if engine else 0.0,
            "engine_steps": engine.stats.steps if engine else 0,
            "oom_events": engine.stats.oom_events if engine else 0,
            "preemptions": engine.stats.preemptions if engine else 0,
            "kv_cache_usage": round(engine.stats.kv_cache_usage, 4) if engine else 0.0,
            "prefix_cache": prefix_cache_json(engine),
            "lora_adapters": self.lora_summary(),
            "speculative": speculative_json(engine),
            **_grammar_metrics(engine),
        }
        return body

    def lora_summary(self) -> dict | None:
        """The LoRA adapters served (None: adapters are off): names, how many may be resident, their memory."""
        loras = self.loras
        if loras is None:
            return None
        return {"loaded": loras.names(), "max_loras": loras.host.max_loras, "max_lora_rank": loras.host.max_rank,
                "memory_bytes": loras.host.nbytes}

    def refresh_gauges(self) -> None:
        gpu = hardware.gpu_memory()
        m = self.metrics
        m.g_running.set(self.engine.running if self.engine else 0)
        m.g_waiting.set(self.engine.waiting if self.engine else 0)
        m.g_gpu_alloc.set(gpu.allocated_gb * hardware.GIB)
        m.g_gpu_reserved.set(gpu.reserved_gb * hardware.GIB)
        m.g_rss.set(hardware.process_rss_gb() * hardware.GIB)
        m.g_cpu_threads.set(thread_policy().current)
        m.g_lora_count.set(len(self.loras.names()) if self.loras else 0)
        m.g_lora_bytes.set(self.loras.host.nbytes if self.loras else 0)
        if self.engine is not None:
            m.g_kv_usage.set(self.engine.stats.kv_cache_usage)
            m.observe_prefix_cache(self.engine.stats.prefix_cache_queries, self.engine.stats.prefix_cache_hits)

    # ---- the request pipeline every API shares (see llmctl.server.pipeline) -----------------
    def limits(self) -> RequestLimits:
        """The limits every request is checked against (llmctl.server.limits)."""
        settings, engine = self.settings, self.settings.engine
        kv_budget = self.engine.config.kv_cache_tokens if self.engine is not None else engine.kv_cache_tokens
        return RequestLimits(max_messages=settings.max_messages, max_num_seqs=engine.max_num_seqs,
                             kv_budget=kv_budget, max_tokens_cap=settings.max_tokens_cap,
                             default_max_tokens=settings.default_max_tokens)

    def context(self) -> RequestContext:
        """What a request is answered with, when the service is ready (else 503): see `RequestContext`."""
        loaded, _ = self.require_ready()
        if self.token_text is None:  # set with the model, before the status is "ready"
            raise Unavailable("The model is still loading; retry shortly.", retry_after=5, code="model_loading")
        return RequestContext(loaded, self.token_text, self.limits(), self.tool_format, self.reasoning_format,
                              self.grammar_specials, self.loras, model=loaded.name)

    def admit(self) -> RequestContext:
        """The request's context, when the service is ready and its queue has room (else 503 or 429)."""
        context = self.context()
        _, engine = self.require_ready()
        engine.check_capacity()
        return context

    def start(self, context: RequestContext, asks: list[Ask], arrived: float,
              disconnected: Callable[[], bool] | None = None) -> Run:
        """Check each ask against the limits, submit them (n choices as one group each, with the context's
        model) and return the run."""
        loaded, engine = self.require_ready()
        params = [sampling_params(loaded, ask, context.limits) for ask in asks]  # every 400 before anything runs
        adapter = context.adapter
        if adapter is not None:  # it stays loaded until this run ends (an unload waits for that)
            if self.loras is None:
                raise not_found(adapter, loaded.name, None)
            self.loras.acquire(adapter)
        try:
            queued = self.admission.queue(sum(len(ask.prompt) for ask in asks), _room(engine))  # 429: too many wait
        except BaseException:
            self._release(adapter)
            raise
        gens: list[Generation] = []
        try:
            for ask, p in zip(asks, params, strict=False):
                seq = Sequence(ask.prompt, p, deadline=arrived + (ask.timeout or self.settings.request_timeout),
                               adapter=adapter)
                members = seq.fork(ask.n)
                stops = list(ask.stops) + list(loaded.default_stops)
                engine.submit(seq)
                gens += [Generation(m, loaded.tokenizer, stops, arrived, disconnected, self.hidden_specials)
                         for m in members]
        except BaseException:
            queued.dropped = True
            for gen in gens:  # a full queue part-way through a list of prompts: stop what was submitted
                gen.close()
            self._release(adapter)
            raise
        queued.seqs = [gen.seq for gen in gens]
        self.admission.prepared()
        self._enter()
        return Run(gens, sum(len(ask.prompt) for ask in asks), self._ended, model=context.model)

    def _release(self, adapter: str | None) -> None:
        if adapter is not None and self.loras is not None:
            self.loras.release(adapter)

    def _ended(self, run: Run) -> None:
        model = run.model or (self.loaded.name if self.loaded else "")
        for i, gen in enumerate(run.gens):
            seq = gen.seq
            latency = (gen.timing.last_token or time.monotonic()) - gen.timing.arrived
            queue_time = seq.admitted - seq.arrived if seq.admitted else None
            # Each choice is a generation; the prompt, prefilled once per prompt, is counted once.
            prompt_tokens = len(seq.prompt_ids) if not i or seq.prompt_ids is not run.gens[i - 1].seq.prompt_ids \
                else 0
            self.metrics.record_generation(prompt_tokens, gen.completion_tokens, latency, gen.ttft, gen.itl,
                                           queue_time, gen.finish_reason or "error", model=model)
        self._release(run.gens[0].seq.adapter if run.gens else None)
        self._leave()


def _room(engine: Engine) -> int:
    """Prompt tokens the engine can admit at its next step: its free KV slots, while it has free batch slots."""
    if engine.running >= engine.config.max_num_seqs:
        return 0
    return int((1.0 - engine.stats.kv_cache_usage) * engine.config.kv_cache_tokens)


def _grammar_metrics(engine: Engine | None) -> dict:
    """Constrained decoding: grammars compiled (each new schema once), cache hits, compile time."""
    stats = engine.stats.grammar if engine else None
    return {
        "grammar_compiles": stats.compiles if stats else 0,
        "grammar_cache_hits": stats.cache_hits if stats else 0,
        "grammar_compile_seconds": round(stats.compile_seconds, 4) if stats else 0.0,
        "grammar_last_compile_seconds": round(stats.last_compile_seconds, 4) if stats else 0.0,
    }
