"""What the server needs of any engine: the request it submits (`Sequence`), the events it reads back
(token ids, then one `Finish`), the engine's bounds (`EngineConfig`), its counters (`EngineStats`), the
`Engine` protocol, and `EngineOptions`, the engine's own flags with its preflight and how it is built.
An engine is one module implementing `Engine` plus its options type; the server picks it by name in
`llmctl.server.engines`.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from llmctl.core.loader import LoadedModel, LoadOptions
from llmctl.core.speculation import SpeculativeConfig
from llmctl.engine.sampling import SamplingParams, TokenLogprobs
from llmctl.engine.structured import GrammarStats
from llmctl.errors import LLMCtlError

if TYPE_CHECKING:
    import torch

    from llmctl.core.threads import ThreadPolicy

_ids = itertools.count(1)
Loader = Callable[[LoadOptions], LoadedModel]  # how the builtin engine loads weights (tests pass their own)


@dataclass(frozen=True)
class EngineConfig:
    """Bounds of the engine. None of them is derived from free memory: they are the operator's choice."""

    max_num_seqs: int = 32
    max_batched_tokens: int = 2048
    max_waiting: int = 256
    kv_cache_tokens: int = 65536
    # Of kv_cache_tokens, how much the KV of computed prefixes may keep for later requests; 0: no cache.
    prefix_cache_tokens: int = 8192
    # Speculative decoding (`--speculative-config`), None: off.
    speculative: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_batched_tokens", "max_waiting", "kv_cache_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.prefix_cache_tokens < 0:
            raise ValueError("prefix_cache_tokens must be 0 or more")


@dataclass
class Finish:
    """The last event of a sequence: why it ended (stop, length, timeout, cancelled, error)."""

    reason: str
    error: LLMCtlError | None = None


class Sequence:
    """One request's generation: its prompt, settings, and the queue its tokens arrive on."""

    def __init__(self, prompt_ids: list[int], params: SamplingParams, deadline: float | None = None,
                 adapter: str | None = None) -> None:
        self.id = next(_ids)
        self.adapter = adapter  # the LoRA adapter its rows compute with (None: the base model)
        self.cache_root = 0  # the prefix cache's chains start here: each adapter has its own (builtin engine)
        self.prompt_ids = prompt_ids
        self.params = params
        self.deadline = deadline
        self.events: queue.SimpleQueue[int | Finish] = queue.SimpleQueue()
        self.arrived = time.monotonic()
        self.admitted: float | None = None
        self.cancelled = False
        self.done = False
        self.generated = 0
        self.output_ids: list[int] = []  # generated tokens, to resume after a preemption
        self.preemptions = 0
        # Filled by the engine before each token's event when params.logprobs is set: entry i is token i's.
        self.logprobs: list[TokenLogprobs] = []
        self.generator: torch.Generator | None = None
        self.cached_tokens = 0  # prompt tokens the engine took from its prefix cache (usage's cached_tokens)
        # The engine's own per-sequence state (the builtin engine's chunked-prefill cache, say).
        self.prefill_cache: Any = None
        self.prefilled = 0
        self.prefix: Any = None  # the builtin engine's prefix-cache match for the coming prefill
        self.prefix_tokens = 0  # and how many of its tokens that prefill may take
        # Its first context tokens whose KV a reproducible prefill computed (`llmctl.engine.reproducible`).
        self.exact_tokens = 0
        # n > 1: the other choices for this prompt, submitted with it; an engine prefills the prompt once
        # and then gives each its own row (the builtin engine's fork after prefill).
        self.forks: list[Sequence] = []
        # Its place in params.constraint's grammar (a structured.Matcher), advanced by each token it
        # generates: it goes with the sequence through preemption and resumption.
        self.matcher: Any = None
        # Its place in params.thinking (a thinking.ThinkingState), which holds the matcher until the answer.
        self.thinking: Any = None

    def fork(self, n: int) -> list[Sequence]:
        """This sequence and n - 1 more choices for the same prompt, submitted together with it.

        With a seed, choice i samples with seed + i (wrapped into torch's 64-bit range), so each choice
        is reproducible and choice 0 is what the same request with n = 1 gives.
        """
        for i in range(1, n):
            seed = self.params.seed
            if seed is not None:
                seed = seed + i if seed + i < 2**64 else seed + i - 2**64
            fork = Sequence(self.prompt_ids, dataclasses.replace(self.params, seed=seed), self.deadline, self.adapter)
            fork.arrived, fork.cache_root = self.arrived, self.cache_root
            self.forks.append(fork)
        return [self, *self.forks]

    def cancel(self) -> None:
        """Ask the engine to drop this sequence; it is gone within one decode step."""
        self.cancelled = True

    def admit_tokens(self, headroom: int) -> int:
        """The row width admission charges: the context now, plus room to grow for ``headroom`` tokens."""
        return self.context_length + min(self.params.max_tokens - self.generated, headroom)

    def abort_reason(self, now: float) -> str | None:
        """"cancelled" or "timeout" when the engine must drop this sequence at time ``now``, else None."""
        if self.cancelled:
            return "cancelled"
        if self.deadline is not None and now >= self.deadline:
            return "timeout"
        return None

    @property
    def reserved_tokens(self) -> int:
        """The most KV cache this sequence can ever need: prompt + max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def context_ids(self) -> list[int]:
        """What a prefill feeds: the prompt, and after a preemption what was generated so far."""
        return self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids

    @property
    def context_length(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


@dataclass
class SpeculativeStats:
    """Counters of speculative decoding for /health and /metrics."""

    drafts: int = 0  # row-steps that verified at least one draft token
    draft_tokens: int = 0  # draft tokens verified
    accepted_tokens: int = 0  # of those, accepted
    emitted_tokens: int = 0  # tokens the speculating row-steps produced (accepted + one each)
    stood_down_steps: int = 0  # decode steps run without drafts because drafts would not have paid

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def tokens_per_step(self) -> float:
        """Mean tokens a speculating row got from one step (1 without speculation)."""
        return self.emitted_tokens / self.drafts if self.drafts else 0.0


@dataclass
class EngineStats:
    """Counters every engine keeps; /health and /metrics read them without asking the engine."""

    steps: int = 0
    prefills: int = 0
    tokens_generated: int = 0
    prompt_tokens: int = 0
    last_batch_size: int = 0
    max_batch_size: int = 0
    oom_events: int = 0
    preemptions: int = 0
    prefill_tokens: int = 0  # tokens computed by prefills (what a prefix cache saved does not count)
    # Filled by engines that have them; 0 otherwise.
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int = 0  # of those, tokens found there (not prefilled again)
    prefix_cache_tokens: int = 0  # tokens the prefix cache holds now
    kv_cache_usage: float = 0.0  # share of the KV cache in use, 0..1
    grammar: GrammarStats = field(default_factory=GrammarStats)  # constraints compiled, cache hits
    speculative: SpeculativeStats = field(default_factory=SpeculativeStats)  # drafts and acceptance
    recent: deque = field(default_factory=lambda: deque(maxlen=512))  # (time, tokens) per step

    def tokens_per_second(self, window: float = 10.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= window]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0


class Engine(Protocol):
    """What the server uses of an engine. All methods are called from HTTP worker threads.

    The engine owns generation on threads of its own: `submit` only queues; the engine then puts the
    sequence's token ids on `seq.events`, each preceded (when `params.logprobs` is set) by its entry
    in `seq.logprobs`, and ends with exactly one `Finish`. `seq.cancel()` and `seq.deadline` must stop
    the sequence (and free what it holds) within one step.
    """

    config: EngineConfig
    stats: EngineStats

    def use_reasoning(self, parser: str | None) -> None:
        """Before `start`: the server's reasoning parser (vLLM's names: deepseek_r1, qwen3, openai_gptoss), for an
        engine that finds the end of thinking itself (vLLM's); others read each request's ``params.thinking``."""

    def start(self) -> None:
        """Start generating; called once, after the model is loaded."""

    def enable_lora(self, max_loras: int, max_rank: int) -> Any:
        """Serve LoRA adapters, up to ``max_loras`` of rank ``max_rank`` at once (called before `start`); returns
        what holds them (`llmctl.server.loras.AdapterHost`): a sequence's ``adapter`` names one of them."""

    def stop(self, timeout: float = 10.0) -> None:
        """Fail what is queued or running with 'shutting down' and stop the engine's threads."""

    @property
    def running(self) -> int:
        """Sequences past the queue (being prefilled or generating)."""

    @property
    def waiting(self) -> int:
        """Sequences queued for a batch slot."""

    def check_capacity(self) -> None:
        """Raise QueueFull when the waiting queue is full, before the request costs anything."""

    def submit(self, seq: Sequence) -> Sequence:
        """Queue ``seq`` with its forks (``seq.forks``, the other choices of n > 1: each gets its own tokens
        and Finish); raise InvalidRequest if it can never fit, Unavailable when shutting down."""


class EngineOptions(Protocol):
    """An engine's own settings: a frozen dataclass whose fields are its `llmctl serve` flags (field
    ``tensor_parallel_size`` is ``--tensor-parallel-size``), checked when it is made, with the checks that
    run before the port opens and what builds the engine. It lives in a module that does not import torch
    (the flags are checked first); `llmctl.server.engines` names each engine's."""

    title: ClassVar[str]  # how messages name the engine: "vLLM's engine"
    __dataclass_fields__: ClassVar[dict[str, Any]]

    def speculative(self, text: str) -> SpeculativeConfig:
        """`--speculative-config` (``text``) checked as far as this engine checks it before anything loads;
        ConfigError says what is wrong."""

    def compute_note(self, threads: ThreadPolicy) -> str | None:
        """What the start-up log says of torch's compute threads (``threads``, `--cpu-threads`), None where
        the engine sets its own."""

    def preflight(self, load: LoadOptions) -> None:
        """The checks that take milliseconds (files, installed packages, devices), before the port opens."""

    def build(self, load: LoadOptions, config: EngineConfig, loader: Loader) -> tuple[LoadedModel, Engine]:
        """Load what the engine needs and build it (not started)."""
