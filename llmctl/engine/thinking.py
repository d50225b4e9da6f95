"""A request's thinking as the engine sees it: where it ends, its budget, and the answer's grammar held until then.

Reasoning models write their thinking first and close it with a marker (``</think>``; gpt-oss' switch to its
final channel). The engine knows only token ids: the server's reasoning parser gives it the marker that ends
thinking, the text that closes it at a budget and whether the prompt already opened it (`Thinking`). Per
sequence (`ThinkingState`), the engine then:

- counts the thinking tokens, and once the budget is spent writes the closing text itself, one token per
  step, in place of what the model sampled (vLLM's ``thinking_token_budget`` does the same);
- holds the request's grammar (structured outputs, an enforced tool call) until the end marker, so the
  thinking is free and the answer constrained: the matcher neither masks nor advances before it. Where the
  model may open its thinking or answer at once (the prompt did not open it: Qwen3), its first token is
  the grammar's or the opening marker's first token: the answer is constrained from its start, as the
  reasoning parser reads such an output as answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Thinking:
    """How one request's thinking ends, in token ids of the model's tokenizer.

    ``end``: what the model writes to end its thinking (``</think>``); ``close``: what the engine writes when
    the budget is spent (``</think>\\n\\n``; empty: ``end``); ``start``: what opens thinking when the prompt
    has not (``<think>``; empty: thinking counts from the first token); ``inside``: the prompt leaves the
    model inside its thinking; ``budget``: the most thinking tokens, None for no bound.
    """

    end: tuple[int, ...]
    close: tuple[int, ...] = ()
    start: tuple[int, ...] = ()
    inside: bool = True
    budget: int | None = None

    def __post_init__(self) -> None:
        if not self.end:
            raise ValueError("the end of thinking needs at least one token")
        if self.budget is not None and self.budget < 0:
            raise ValueError("a thinking budget must be 0 or more")

    @property
    def closing(self) -> tuple[int, ...]:
        return self.close or self.end


class ThinkingState:
    """One sequence's place in its thinking; it goes with the sequence through preemption and resumption."""

    __slots__ = ("spec", "phase", "tokens", "held", "forced", "tail")

    def __init__(self, spec: Thinking, matcher: Any = None) -> None:
        self.spec = spec
        # "before": waiting for the model to open its thinking; "inside": thinking; "after": answering.
        self.phase = "inside" if spec.inside or not spec.start else "before"
        self.tokens = 0  # thinking tokens so far (the markers not counted)
        self.held = matcher  # the answer's grammar (a structured.Matcher), handed back when thinking ends
        self.forced: list[int] = []  # what is left to write of the closing text
        self.tail: list[int] = []  # the last tokens, to find a marker that spans several

    def next_forced(self) -> int | None:
        """The token the engine writes in place of the model's at this step, if it is closing the thinking."""
        if self.phase == "inside" and not self.forced and self.spec.budget is not None \
                and self.tokens >= self.spec.budget:
            self.forced = list(self.spec.closing)
        return self.forced[0] if self.forced else None

    def observe(self, token: int) -> bool:
        """Take the token just generated; True when it ended the thinking (the answer's grammar starts now)."""
        if self.phase == "after":
            return False
        if self.forced:  # the engine is writing the closing text: it ends the thinking with its last token
            self.forced.pop(0)
            if not self.forced:
                self.phase = "after"
            return self.phase == "after"
        self.tail = (self.tail + [token])[-max(len(self.spec.end), len(self.spec.start)):]
        if _ends_with(self.tail, self.spec.end):
            self.phase = "after"
            return True
        if self.phase == "before":
            if _ends_with(self.tail, self.spec.start):
                self.phase, self.tail = "inside", []
        else:
            self.tokens += 1
            if self.tokens == len(self.spec.start) and _ends_with(self.tail, self.spec.start):
                self.tokens = 0  # the model opened the thinking the prompt had opened: the marker is no thinking
        return False


def _ends_with(tail: list[int], marker: tuple[int, ...]) -> bool:
    return bool(marker) and len(tail) >= len(marker) and tuple(tail[-len(marker):]) == marker


def attach(seqs: Iterable) -> None:
    """Give each sequence whose request thinks its own state, holding its grammar until the thinking ends
    (call after the matchers are attached: n > 1 gives each choice its own)."""
    for seq in seqs:
        spec = seq.params.thinking
        if spec is None:
            seq.thinking = None
            continue
        state = seq.thinking = ThinkingState(spec, seq.matcher)
        if state.phase == "before" and seq.matcher is not None:
            seq.matcher.also = spec.start[0]  # the first token: the answer's, or the opening of the thinking
        else:
            seq.matcher = None


def force(seqs: Sequence, tokens) -> None:
    """Write the closing text's next token in place of the sampled one for rows at their budget
    (``tokens``: the step's [B] tensor, changed in place)."""
    for row, seq in enumerate(seqs):
        state = seq.thinking
        if state is not None and state.phase != "after" and (token := state.next_forced()) is not None:
            tokens[row] = token


def observe(seqs: Sequence, tokens) -> bool:
    """Advance the rows' thinking by the tokens they generated (the step's [B] tensor); True when a row's
    answer grammar starts (the batch's masks must then be rebuilt)."""
    if all(seq.thinking is None for seq in seqs):
        return False
    changed = False
    for seq, token in zip(seqs, tokens.tolist(), strict=False):
        state = seq.thinking
        if state is None or state.phase == "after":
            continue
        if seq.matcher is not None:  # the first token of an output that may open its thinking (see `attach`)
            seq.matcher.also, changed = None, True
            if token != state.spec.start[0]:  # the answer, which the grammar took: no thinking
                state.phase, state.held = "after", None
                continue
            seq.matcher = None  # the thinking opens: the grammar waits for its end
        if state.observe(token) and state.held is not None:
            seq.matcher, state.held = state.held, None
            changed = True
    return changed
