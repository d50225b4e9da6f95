"""The one request pipeline every API shares: token limits -> sampling settings -> submit -> text deltas.

Each API module (`llmctl.server.api.*`) parses its own request shape, builds the prompt's token
ids (`llmctl.server.api.prompts`) and fills an `Ask`; `Service.start` checks it against the server's limits
(`llmctl.server.limits`), submits it to the engine (n choices as one group, prefilled once) and returns a `Run`,
whose deltas the API module renders as its own answer or event stream. Timeouts (408), a full queue (429), a client that
goes away and the metrics are handled here, the same for every API.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from llmctl.core.loader import LoadedModel
from llmctl.engine import SamplingParams
from llmctl.engine.structured import Constraint
from llmctl.engine.thinking import Thinking
from llmctl.errors import InvalidRequest
from llmctl.server.generation import Generation
from llmctl.server.limits import RequestLimits, max_new_tokens


@dataclass(frozen=True)
class Ask:
    """What one request asks of the engine, whatever API it came through.

    ``prompt_param`` and ``max_tokens_param`` name the request's own fields in error messages
    ("messages" or "prompt" or "input"; "max_tokens" or "max_output_tokens").
    """

    prompt: list[int]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N: each token's log-probability and its N most likely rivals
    stops: tuple[str, ...] = ()
    n: int = 1
    timeout: float | None = None
    constraint: Constraint | None = None  # what the output must match (server.constraints builds it)
    thinking: Thinking | None = None  # where the thinking ends, its budget (server.thinking builds it)
    prompt_param: str = "messages"
    max_tokens_param: str = "max_tokens"


def sampling_params(loaded: LoadedModel, ask: Ask, limits: RequestLimits) -> SamplingParams:
    """Check the request against the context window and the server's limits; turn it into engine settings."""
    asked = max_new_tokens(limits, loaded.context_length, len(ask.prompt), ask.max_tokens,
                           param=ask.max_tokens_param, where=ask.prompt_param)
    bias: dict[int, float] = {}
    vocab = len(loaded.tokenizer)
    for key, value in (ask.logit_bias or {}).items():
        token = int(key)
        if not 0 <= token < vocab:
            raise InvalidRequest(f"logit_bias names token {token}, outside the vocabulary (0..{vocab - 1}).",
                                 param="logit_bias")
        bias[token] = value
    return SamplingParams(
        max_tokens=asked,
        temperature=1.0 if ask.temperature is None else ask.temperature,
        top_p=1.0 if ask.top_p is None else ask.top_p,
        top_k=ask.top_k or 0,
        frequency_penalty=ask.frequency_penalty,
        presence_penalty=ask.presence_penalty,
        logit_bias=bias,
        seed=ask.seed,
        ignore_eos=ask.ignore_eos,
        logprobs=ask.logprobs,
        constraint=ask.constraint,
        thinking=ask.thinking,
    )


@dataclass
class Delta:
    """A piece of one choice's text; ``done`` marks the choice's end (its finish reason is then set)."""

    index: int
    text: str
    done: bool = False


@dataclass
class Run:
    """The generations of one request (n choices per prompt, prompts in order), as the API modules see them.

    ``on_end`` is called once when the run ends however it ends: it records metrics and lets the
    service's in-flight count drop.
    """

    gens: list[Generation]
    prompt_tokens: int
    on_end: Callable[[Run], None]
    model: str | None = None  # the served model name the request named (None: the base model)
    _ended: bool = field(default=False, repr=False)

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens the engine took from its prefix cache, each prompt counted once (as prompt_tokens)."""
        return sum(gen.seq.cached_tokens for i, gen in enumerate(self.gens)
                   if not i or gen.seq.prompt_ids is not self.gens[i - 1].seq.prompt_ids)

    def deltas(self) -> Iterator[Delta]:
        """Every choice's text as it is generated, interleaved, each choice ending with a ``done`` delta."""
        if len(self.gens) == 1:
            gen = self.gens[0]
            return itertools.chain((Delta(0, text) for text in gen), iter([Delta(0, "", True)]))
        return _merged(self.gens)

    def collect(self) -> list[str]:
        """Wait for every choice; their texts in order. Raises the first choice's error (408, 503, ...)."""
        texts = [""] * len(self.gens)
        try:
            for delta in self.deltas():
                texts[delta.index] += delta.text
        finally:
            self.end()
        return texts

    def stream(self) -> Iterator[Delta]:
        """The deltas, with errors before the first one raised here (they still get a proper status code)
        and the run ended when the consumer finishes or leaves."""
        deltas = self.deltas()
        try:
            first = next(deltas, None)
        except BaseException:
            self.end()
            raise
        return self._guarded(itertools.chain([first] if first else [], deltas))

    def _guarded(self, deltas: Iterator[Delta]) -> Iterator[Delta]:
        try:
            yield from deltas
        finally:
            self.end()

    @property
    def cancelled(self) -> bool:
        return any(g.finish_reason == "cancelled" for g in self.gens)

    @property
    def completion_tokens(self) -> int:
        return sum(g.completion_tokens for g in self.gens)

    def end(self) -> None:
        if self._ended:
            return
        self._ended = True
        for gen in self.gens:
            gen.close()
        self.on_end(self)


_DONE = object()


def _merged(gens: list[Generation]) -> Iterator[Delta]:
    """Interleave several generations' deltas as they arrive: one reader thread per choice.

    A choice's error is raised to the consumer; when the consumer leaves, every choice is cancelled
    and the readers end within one engine step.
    """
    out: queue.SimpleQueue = queue.SimpleQueue()

    def read(index: int, gen: Generation) -> None:
        try:
            for text in gen:
                out.put(Delta(index, text))
            out.put(Delta(index, "", True))
        except BaseException as exc:  # handed to the consumer, which raises it
            out.put(exc)
        out.put(_DONE)

    threads = [threading.Thread(target=read, args=(i, g), name="llmctl-choice", daemon=True)
               for i, g in enumerate(gens)]
    for thread in threads:
        thread.start()
    running = len(threads)
    try:
        while running:
            item = out.get()
            if item is _DONE:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for gen in gens:
            gen.close()
