"""Constrained decoding: a request's constraint compiled to a grammar, one matcher per sequence, masks per batch.

The grammar engine is llguidance (the library behind llama.cpp's grammars and vLLM's `guidance`
backend; docs/engine.md says why it was chosen over xgrammar, with the numbers). A constraint is
compiled once per server and kept in a bounded LRU cache; every sequence gets a copy of the
compiled matcher and advances it by the tokens it accepts, so its state lives with the sequence
(a preempted sequence resumes with it). Before each sampling step, the masks of all constrained
rows of the batch are filled in one call (llguidance fills them in parallel) and applied to the
logits in one tensor operation; rows without a constraint are not touched.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from llmctl.engine.grammar_limits import LimitExceeded, check_constraint
from llmctl.engine.grammar_sandbox import sandbox
from llmctl.errors import InvalidRequest

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

ConstraintKind = Literal["json", "regex", "choice", "grammar"]
CACHE_SIZE = 256  # compiled grammars kept per server
# JSON is written as json.dumps writes it (", " and ": ", no other whitespace): a model allowed
# whitespace anywhere may produce nothing else until max_tokens. A schema can override this with
# llguidance's "x-guidance" key, e.g. {"x-guidance": {"whitespace_flexible": true}, ...}.
JSON_OPTIONS: JsonCompileOptions = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
EXCERPT_CHARS = 300  # of a grammar or an engine error, in logs and messages: never the whole thing


@dataclass(frozen=True)
class Constraint:
    """What a request's output must match, in the terms vLLM's structured outputs also use.

    kind "json": ``spec`` is a JSON schema (as JSON text); "regex": a regular expression; "choice":
    a JSON list of strings; "grammar": a Lark grammar (llguidance's dialect, which also embeds
    JSON schemas with ``%json``) or a GBNF grammar as llama.cpp writes them.
    """

    kind: ConstraintKind
    spec: str
    param: str = field(default="response_format", compare=False)  # the request field, for errors

    @classmethod
    def json_schema(cls, schema: dict | bool, param: str = "response_format") -> Constraint:
        return cls("json", json.dumps(schema, ensure_ascii=False), param)


class GrammarError(InvalidRequest):
    """A constraint the grammar engine cannot compile: a 400 naming the request field."""


class GrammarFailed(InvalidRequest):
    """The grammar engine gave up on a constraint during generation (a limit of llguidance's parser): the
    request ends with this error, in-band when its stream has started; the server and other requests go on."""

    code = "grammar_failed"


def parser_limits():
    """llguidance's ParserLimits for every matcher: its defaults (max_items_in_row 2,000, step_lexer_fuel
    200,000, step_max_items 50,000, max_lexer_states 250,000, max_grammar_size 500,000) bound each mask
    computation; verbose_errors=False keeps the grammar and parser state out of error messages."""
    import llguidance

    return llguidance.LLParserLimits(verbose_errors=False)


class Matcher:
    """One sequence's position in its grammar."""

    __slots__ = ("raw", "param", "also")

    def __init__(self, raw, param: str = "response_format") -> None:
        self.raw = raw  # llguidance.LLMatcher
        self.param = param  # the request field the grammar came from
        # One more token allowed besides the grammar's, which the grammar does not take (`engine.thinking`:
        # the opening of a thinking the model may write before the answer); None: none.
        self.also: int | None = None

    def accept(self, token: int) -> None:
        if token != self.also:
            self.raw.consume_token(token)

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (or the matcher failed: see ``error``)."""
        return self.raw.is_stopped()

    @property
    def error(self) -> str | None:
        return self.raw.get_error() if self.raw.is_error() else None


@dataclass
class GrammarStats:
    compiles: int = 0
    cache_hits: int = 0
    compile_seconds: float = 0.0
    last_compile_seconds: float = 0.0


class Grammars:
    """Compiles constraints for one tokenizer and hands out matchers; thread-safe.

    ``vocab_size`` is the width of the model's logits, which may exceed the tokenizer's vocabulary
    (padded embedding rows): those extra ids are never allowed.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: Iterable[int], cache_size: int = CACHE_SIZE,
                 stats: GrammarStats | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos = sorted(eos_token_ids)
        self.cache_size = cache_size
        self.stats = stats if stats is not None else GrammarStats()
        self._ll_tokenizer: LLTokenizer | None = None
        self._cache: OrderedDict[tuple[str, str], LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, constraint: Constraint) -> Matcher:
        """A fresh matcher for ``constraint``; raises GrammarError when it does not compile."""
        key = (constraint.kind, constraint.spec)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
                self.stats.cache_hits += 1
                return Matcher(compiled.deep_copy(), constraint.param)
        # Outside the lock: a slow compile holds up no other request's grammar.
        started = time.perf_counter()
        compiled = self._compile(constraint)
        elapsed = time.perf_counter() - started
        with self._lock:
            self.stats.compiles += 1
            self.stats.compile_seconds += elapsed
            self.stats.last_compile_seconds = elapsed
            self._cache[key] = compiled
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            log.info("Compiled a %s constraint in %.1f ms", constraint.kind, elapsed * 1000)
            return Matcher(compiled.deep_copy(), constraint.param)

    def _compile(self, constraint: Constraint) -> LLMatcher:
        import llguidance

        grammar = serialize(constraint)
        _check_in_sandbox(constraint, grammar)
        matcher = llguidance.LLMatcher(self._tokenizer(), grammar, log_level=0, limits=parser_limits())
        if matcher.is_error():
            raise GrammarError(f"Unsupported {_describe(constraint)}: {_first_line(matcher.get_error())}",
                               param=constraint.param)
        return matcher

    def _tokenizer(self) -> LLTokenizer:
        if self._ll_tokenizer is None:  # about a second for a 50k vocabulary: once per server
            import llguidance
            import llguidance.hf

            started = time.perf_counter()
            self._ll_tokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                              eos_token=self.eos)
            log.info("Indexed the vocabulary for constrained decoding in %.2f s", time.perf_counter() - started)
        return self._ll_tokenizer


def serialize(constraint: Constraint) -> str:
    """``constraint`` as llguidance's grammar (JSON text); GrammarError when it does not parse or asks for more
    than the server's limits (`grammar_limits`)."""
    try:
        check_constraint(constraint.kind, constraint.spec)
    except LimitExceeded as exc:
        raise GrammarError(f"The {_describe(constraint)} is over the server's limits: {exc}.",
                           param=constraint.param, code="grammar_too_large") from None
    try:
        return _serialize(constraint.kind, constraint.spec)
    except ValueError as exc:
        raise GrammarError(f"Invalid {_describe(constraint)}: {excerpt(str(exc))}", param=constraint.param) from None


def _check_in_sandbox(constraint: Constraint, grammar: str) -> None:
    """Validate ``grammar`` in a capped worker process first: what would exhaust the server's memory ends there."""
    try:
        error = sandbox().validate(grammar)
    except LimitExceeded as exc:
        raise GrammarError(f"The {_describe(constraint)} is over the server's limits: {exc}.",
                           param=constraint.param, code="grammar_too_large") from None
    if error:
        raise GrammarError(f"Unsupported {_describe(constraint)}: {_first_line(error)}", param=constraint.param)


def _serialize(kind: ConstraintKind, spec: str) -> str:
    import llguidance

    if kind == "json":
        return llguidance.LLMatcher.grammar_from_json_schema(spec, defaults=JSON_OPTIONS)
    return llguidance.grammar_from(kind, spec)


def check(constraint: Constraint) -> None:
    """GrammarError when ``constraint`` does not compile; needs no tokenizer (for engines that compile elsewhere).
    Each (kind, spec) is validated once per process, like the builtin engine's compiled-grammar cache."""
    _validated(constraint)


@functools.lru_cache(maxsize=CACHE_SIZE)
def _validated(constraint: Constraint) -> None:
    """Raises GrammarError, uncached, for a constraint that does not compile (Constraint hashes by kind and spec:
    the error names the first request's field, as every request of that spec gives the same one)."""
    _check_in_sandbox(constraint, serialize(constraint))


def json_schema_with_options(constraint: Constraint) -> dict | bool:
    """A "json" constraint's schema carrying the JSON layout llmctl writes (``JSON_OPTIONS``), for a
    grammar engine that compiles the schema itself (a schema's own "x-guidance" keys win)."""
    schema = json.loads(constraint.spec)
    if not isinstance(schema, dict):
        return schema
    return {**schema, "x-guidance": {**JSON_OPTIONS, **(schema.get("x-guidance") or {})}}


_executor_lock = threading.Lock()
_executor = None


def _shared_executor():
    """llguidance's thread pool for filling masks in parallel: one per process."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        return _executor


class BatchMasks:
    """Fills the bitmasks of a batch's constrained rows and applies them to the logits."""

    @classmethod
    def of(cls, matchers: Sequence[Matcher | None], vocab_size: int, device) -> BatchMasks | None:
        """The masking work for one batch composition; None when no row is constrained."""
        if all(m is None for m in matchers):
            return None
        return cls(matchers, vocab_size, device)

    def __init__(self, matchers: Sequence[Matcher | None], vocab_size: int, device) -> None:
        self.executor = _shared_executor()
        self.rows = [i for i, m in enumerate(matchers) if m is not None]
        self.matchers = [m for m in matchers if m is not None]  # row self.rows[j]'s is matchers[j]
        self.vocab_size = vocab_size
        self.index = torch.tensor(self.rows, device=device)
        self.bitmask = torch.zeros((len(self.rows), (vocab_size + 31) // 32), dtype=torch.int32)
        self.device = device

    def apply(self, logits: torch.Tensor, active: list[bool] | None = None) -> torch.Tensor:
        """Logits [B, V] with every token the rows' grammars forbid at -inf (a new tensor); only the ``active``
        rows' masks are computed (the others' rows are left meaningless)."""
        pairs = [(m.raw, j) for j, (row, m) in enumerate(zip(self.rows, self.matchers, strict=True))
                 if active is None or active[row]]
        self.executor.unsafe_compute_mask_ptr(pairs, self.bitmask.data_ptr(), self.bitmask.shape[1] * 4,
                                              self.bitmask.shape[0])
        width = logits.shape[-1]
        # Token i is bit i % 32 of word i // 32 (little-endian words): numpy unpacks that in one pass.
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, bitorder="little")
        allowed = torch.from_numpy(bits).view(torch.bool)[:, :width]
        for j, matcher in enumerate(self.matchers):
            if matcher.also is not None and matcher.also < allowed.shape[1]:
                allowed[j, matcher.also] = True
        if allowed.shape[1] < width:  # logits wider than the grammar's vocabulary: the rest stays masked
            allowed = torch.nn.functional.pad(allowed, (0, width - allowed.shape[1]), value=False)
        allowed = allowed.to(logits.device, non_blocking=True)
        if len(self.rows) == logits.shape[0]:
            return torch.where(allowed, logits, float("-inf"))
        rows = torch.where(allowed, logits.index_select(0, self.index), float("-inf"))
        return logits.index_put((self.index,), rows)

    def accept(self, tokens: list[int], active: list[bool] | None = None) -> None:
        """Advance each (``active``) constrained row by the token it sampled."""
        for row, matcher in zip(self.rows, self.matchers, strict=False):
            if active is None or active[row]:
                matcher.accept(tokens[row])


def attach_matchers(grammars: Grammars | None, seqs: Iterable) -> None:
    """Give each constrained sequence its own matcher (n > 1: one per choice, over the one cached grammar).

    Called in the request's thread, so a grammar that does not compile is that request's 400.
    """
    for seq in seqs:
        if seq.params.constraint is None:
            continue
        if grammars is None:
            raise InvalidRequest("This engine was built without a tokenizer: it cannot constrain output.",
                                 param=seq.params.constraint.param)
        seq.matcher = grammars.matcher(seq.params.constraint)


def end_reason(matcher: Matcher | None) -> tuple[str, GrammarFailed | None] | None:
    """After a token: ("stop", None) when the grammar is complete and allows nothing more,
    ("error", ...) when the grammar engine gave up on it (a limit of its parser), None while the row goes on."""
    if matcher is None or not matcher.stopped:
        return None
    error = matcher.error
    if error:
        log.warning("The grammar of '%s' failed during generation: %s", matcher.param, excerpt(error))
        return "error", GrammarFailed(
            f"The constraint in '{matcher.param}' failed during generation: {_first_line(error)}. Simplify it "
            "(fewer alternatives, smaller repetition counts, no required property that leads back to itself).",
            param=matcher.param)
    return "stop", None


def _describe(constraint: Constraint) -> str:
    return {"json": "JSON schema", "regex": "regex", "choice": "choice list",
            "grammar": "grammar"}[constraint.kind] + f" in '{constraint.param}'"


def _first_line(message: str) -> str:
    return excerpt(message.strip().splitlines()[0]) if message.strip() else "the grammar engine rejected it"


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    """At most ``limit`` characters of ``text``, saying how long it was when cut."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
