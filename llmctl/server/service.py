"""The service's state (loading, ready, error, draining) and the chat-completion handler."""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from llmctl import __version__
from llmctl.core import hardware
from llmctl.core.loader import LoadedModel, LoadOptions, load_model
from llmctl.engine import Engine, EngineConfig, Sequence
from llmctl.engine.text import TokenText
from llmctl.errors import InvalidRequest, LLMCtlError, ModelNotFound, Unavailable
from llmctl.server import schemas
from llmctl.server.engines import ENGINES, Loader
from llmctl.server.generation import Generation, TokenLimits, build_prompt, sampling_params
from llmctl.server.metrics import ServiceMetrics
from llmctl.server.tools import HermesToolParser, ToolCallParser

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServiceSettings:
    """What the service needs besides the HTTP listener."""

    load: LoadOptions = field(default_factory=LoadOptions)
    engine: EngineConfig = field(default_factory=EngineConfig)
    engine_kind: str = "builtin"  # a key of llmctl.server.engines.ENGINES
    engine_options: Any = None  # that engine's own settings (llmctl.engine.vllm.VllmOptions for "vllm")
    request_timeout: float = 60.0
    max_tokens_cap: int | None = None
    default_max_tokens: int | None = None
    max_messages: int = 1024
    tool_call_parser: ToolCallParser | None = None  # "hermes": turn <tool_call> blocks into tool_calls


class Service:
    """Owns the model and the engine; every route calls into one of its methods."""

    def __init__(self, settings: ServiceSettings, loader: Loader = load_model) -> None:
        self.settings = settings
        self.loader = loader
        self.metrics = ServiceMetrics()
        self.status = "loading"
        self.error: str | None = None
        self.loaded: LoadedModel | None = None
        self.engine: Engine | None = None
        self.token_text: TokenText | None = None  # token ids to bytes, for logprobs
        self.draining = False
        self.created = int(time.time())
        self._inflight = 0
        self._inflight_lock = threading.Condition()

    # ---- lifecycle ---------------------------------------------------------------------
    def load(self) -> None:
        """Load the model and start the engine; failures leave the service answering 'error'."""
        try:
            build = ENGINES[self.settings.engine_kind]
            loaded, engine = build(self.settings.load, self.settings.engine, self.loader, self.settings.engine_options)
            engine.start()
        except LLMCtlError as exc:
            log.error("Model failed to load: %s", exc.message)
            self.error, self.status = exc.message, "error"
            return
        except Exception as exc:
            log.exception("Model failed to load")
            self.error, self.status = f"{type(exc).__name__}: {exc}".splitlines()[0][:500], "error"
            return
        self.loaded, self.engine = loaded, engine
        self.token_text = TokenText(loaded.tokenizer)
        self.status = "ready"
        log.info("Ready: serving %s", loaded.name)

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

    def health(self) -> tuple[dict, int]:
        gpu = hardware.gpu_memory()
        status = "shutting_down" if self.draining else self.status
        body = {
            "status": status,
            "model": self.loaded.name if self.loaded else None,
            "device": self.loaded.device if self.loaded else None,
            "cuda_available": hardware.torch_cuda_available(),
            "cuda_device_count": hardware.cuda_device_count(),
            "memory_allocated_gb": round(gpu.allocated_gb, 3),
            "memory_reserved_gb": round(gpu.reserved_gb, 3),
            "dtype": self.loaded.dtype if self.loaded else None,
            "quantization": self.loaded.quantization if self.loaded else None,
            "context_length": self.loaded.context_length if self.loaded else None,
            "running": self.engine.running if self.engine else 0,
            "waiting": self.engine.waiting if self.engine else 0,
            "version": __version__,
        }
        if self.error:
            body["error"] = self.error
        return body, 200 if status == "ready" else 503

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
            "prefix_cache_queries": engine.stats.prefix_cache_queries if engine else 0,
            "prefix_cache_hits": engine.stats.prefix_cache_hits if engine else 0,
        }
        return body

    def refresh_gauges(self) -> None:
        gpu = hardware.gpu_memory()
        m = self.metrics
        m.g_running.set(self.engine.running if self.engine else 0)
        m.g_waiting.set(self.engine.waiting if self.engine else 0)
        m.g_gpu_alloc.set(gpu.allocated_gb * hardware.GIB)
        m.g_gpu_reserved.set(gpu.reserved_gb * hardware.GIB)
        m.g_rss.set(hardware.process_rss_gb() * hardware.GIB)
        if self.engine is not None:
            m.g_kv_usage.set(self.engine.stats.kv_cache_usage)
            m.observe_prefix_cache(self.engine.stats.prefix_cache_queries, self.engine.stats.prefix_cache_hits)

    def models(self) -> dict:
        loaded, _ = self.require_ready()
        return schemas.models_body(loaded.name, self.created)

    def model(self, model_id: str) -> dict:
        loaded, _ = self.require_ready()
        if model_id != loaded.name:
            raise ModelNotFound(f"The model '{model_id}' does not exist; this server serves '{loaded.name}'.",
                                param="model")
        return schemas.model_card(loaded.name, self.created)

    # ---- chat completions ------------------------------------------------------------------
    def chat(self, body: object, disconnected: Callable[[], bool] | None = None) -> dict | Iterator[str]:
        """Answer one chat completion: a response body, or an iterator of SSE lines when streaming."""
        arrived = time.monotonic()
        loaded, engine = self.require_ready()
        engine.check_capacity()
        req = schemas.parse_request(body)
        if req.model and req.model != loaded.name:
            raise ModelNotFound(f"The model '{req.model}' does not exist; this server serves '{loaded.name}'.",
                                param="model")
        if len(req.messages) > self.settings.max_messages:
            raise InvalidRequest(f"{len(req.messages)} messages is more than this server's limit of "
                                 f"{self.settings.max_messages}.", param="messages")
        if (req.n or 1) > 1:
            raise InvalidRequest("Only n=1 is supported.", param="n")
        if req.top_logprobs and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true.", param="top_logprobs")
        prompt = build_prompt(loaded, req)
        limits = TokenLimits(engine.config.kv_cache_tokens, self.settings.max_tokens_cap,
                             self.settings.default_max_tokens)
        params = sampling_params(loaded, req, len(prompt), limits)
        timeout = req.timeout or self.settings.request_timeout
        seq = engine.submit(Sequence(prompt, params, deadline=arrived + timeout))
        gen = Generation(seq, loaded.tokenizer, req.stops() + list(loaded.default_stops), arrived, disconnected)
        parse_tools = self.settings.tool_call_parser and req.tools and req.tool_choice != "none"
        answer = _Answer(loaded.name, len(prompt), bool(req.stream_options and req.stream_options.include_usage),
                         bool(req.logprobs), HermesToolParser() if parse_tools else None)
        self._enter()
        if req.stream:
            return self._stream(gen, answer)
        try:
            text = "".join(gen)
        finally:
            gen.close()
            self._record(gen, len(prompt))
            self._leave()
        finish_reason, calls = gen.finish_reason or "stop", None
        if answer.tools is not None:
            sent = answer.tools.feed(text)
            rest, calls = answer.tools.finish()
            text = sent + rest
            if calls:
                finish_reason, text = "tool_calls", text.strip() or None
        return schemas.completion_body(schemas.completion_id(), loaded.name, text, finish_reason, len(prompt),
                                       gen.completion_tokens, logprobs=self._logprobs(gen, req.logprobs),
                                       tool_calls=calls or None)

    def _logprobs(self, gen: Generation, wanted: bool | None) -> dict | None:
        """The logprobs of the tokens ``gen`` received since the last call, when the request asked."""
        if not wanted or self.token_text is None:
            return None
        return schemas.logprobs_body(self.token_text, gen.take_logprobs())

    def _stream(self, gen: Generation, answer: _Answer) -> Iterator[str]:
        deltas = iter(gen)
        try:
            first = next(deltas, None)  # errors before the first token still get a proper status code
        except BaseException:
            gen.close()
            self._record(gen, answer.prompt_tokens)
            self._leave()
            raise
        return self._sse(gen, itertools.chain([first] if first else [], deltas), answer)

    def _sse(self, gen: Generation, deltas: Iterator[str], answer: _Answer) -> Iterator[str]:
        cid, created, model, tools = schemas.completion_id(), int(time.time()), answer.model, answer.tools

        def chunk(delta: dict, finish_reason: str | None = None) -> str:
            # Tokens whose text was held back (the start of a stop string or of a tool call) keep their
            # logprobs until a chunk goes out.
            logprobs = self._logprobs(gen, answer.logprobs)
            logprobs = logprobs if logprobs and logprobs["content"] else None
            return _sse(schemas.chunk_body(cid, model, created, delta, finish_reason, logprobs=logprobs))

        try:
            yield _sse(schemas.chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
            for delta in deltas:
                shown = tools.feed(delta) if tools is not None else delta
                if shown:
                    yield chunk({"content": shown})
            if gen.finish_reason == "cancelled":
                return
            finish_reason = gen.finish_reason or "stop"
            if tools is not None:
                rest, calls = tools.finish()
                if rest:
                    yield chunk({"content": rest})
                if calls:
                    finish_reason = "tool_calls"
                    yield chunk({"tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]})
            yield chunk({}, finish_reason)
            if answer.include_usage:
                yield _sse(schemas.chunk_body(cid, model, created, {}, None,
                                              schemas.usage(answer.prompt_tokens, gen.completion_tokens),
                                              with_choice=False))
            yield "data: [DONE]\n\n"
        except LLMCtlError as exc:
            # Headers are already sent: report the error in-band, as OpenAI's API does.
            yield _sse(exc.to_body())
        finally:
            gen.close()
            self._record(gen, answer.prompt_tokens)
            self._leave()

    def _record(self, gen: Generation, prompt_tokens: int) -> None:
        seq = gen.seq
        latency = (gen.timing.last_token or time.monotonic()) - gen.timing.arrived
        queue_time = seq.admitted - seq.arrived if seq.admitted else None
        self.metrics.record_generation(prompt_tokens, gen.completion_tokens, latency, gen.ttft, gen.itl, queue_time,
                                       gen.finish_reason or "error")


@dataclass(frozen=True)
class _Answer:
    """What shapes one answer besides its text."""

    model: str
    prompt_tokens: int
    include_usage: bool = False
    logprobs: bool = False
    tools: HermesToolParser | None = None


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False, separators=(',', ':'))}\n\n"
