"""Speculative decoding for the builtin engine: draft tokens per row, verified in one forward pass per step.

Drafts come from the row's own prompt and output (n-gram prompt lookup: the tokens that followed an
earlier occurrence of its last n tokens) or from a smaller draft model (`llmctl.engine.draft`).
A step feeds each row its next token followed by its drafts, ``[B, 1 + K]`` with shorter rows padded
at the right (masked), and samples position by position with the row's own sampler: the token sampled
at position j is compared with draft j + 1; the row keeps going while they agree. Every draft is a single
token chosen without randomness, so this is exactly the standard rejection-sampling rule (accept draft x
with probability min(1, p(x) / q(x)) = p(x), else draw from the rest of p renormalised): each token
emitted is drawn from the target model's distribution, with the row's temperature, top-p, penalties,
grammar and logprobs applied as in a plain step, and greedy rows emit the tokens a plain step would.
The KV of the rejected drafts (the right end of each row) is then dropped and the rows right-aligned again.

Whether to speculate is decided per step by `CostModel`: it fits a step's time to the tokens fed
(``seconds = a + b * tokens``; on a CPU in the engine thread's CPU seconds, which other programs' work does
not inflate) and adds a draft token only while its expected gain (the row's acceptance rate to the power of its
depth) raises tokens per second, so drafts thin out and stop as the batch grows. `Speculator.pays`
then checks the model against what was measured: at each batch size, steps with drafts run only while they
have cost less per token than plain steps there. Both are kept for each compute-thread count the engine runs at
(`Timings`): the engine thread's CPU seconds for one step differ by count, and the thread tuner
(`llmctl.core.threads`) runs trial steps at another count now and then.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from llmctl.core.speculation import SpeculativeConfig
from llmctl.engine.base import Sequence, SpeculativeStats
from llmctl.engine.batch import Batch, sample_rows
from llmctl.engine.kv import kv_layers

log = logging.getLogger(__name__)

PRIOR_ACCEPTANCE = 0.5  # a new row's acceptance rate before the engine has seen any
PRIOR_COST_RATIO = 1 / 16  # b / a before steps of different sizes were timed: 16 extra tokens double a step
DECAY = 0.97  # weight of the past per new observation (timings and acceptance)
RETRY_EVERY = 16  # at one batch size, the mode that measured slower is tried again once in this many steps


def step_clock(device: torch.device) -> Callable[[], float]:
    """The clock decode steps are timed with: on a CPU the engine thread's CPU seconds (the time it computed, not
    the time other programs held the cores meanwhile), elsewhere the wall clock (an accelerator's work is not CPU
    time). The engine thread's, not the process's: the process's would count every compute thread, and the engine
    tries other thread counts while it runs (`llmctl.core.threads`)."""
    return time.thread_time if device.type == "cpu" else time.perf_counter


def ngram_draft(context: list[int], k: int, low: int, high: int, majority: bool = True) -> list[int]:
    """Up to ``k`` tokens that followed an earlier occurrence of ``context``'s last n tokens, n from ``high`` down
    to ``low``; [] when none of them occurred before. Of several occurrences, the latest of those followed by the
    token that follows most of them (on a tie, by any of the tied tokens): in structured text (JSON, code) a short
    n-gram recurs, and what usually follows it is a better guess than what followed it last
    (`scripts/spec_ceiling.py` measures both: ``majority=False`` takes the latest occurrence)."""
    length = len(context)
    if k < 1 or length < low + 1:
        return []
    tokens = np.asarray(context, dtype=np.int64)
    for n in range(min(high, length - 1), low - 1, -1):
        suffix = tokens[length - n:]
        # Starts i of earlier occurrences, with at least one token after them (i + n < length).
        hits = tokens[:length - n] == suffix[0]
        for t in range(1, n):
            hits &= tokens[t:length - n + t] == suffix[t]
        found = np.flatnonzero(hits)
        if len(found):
            if not majority:
                return tokens[found[-1] + n:found[-1] + n + k].tolist()
            following = tokens[found + n]
            values, counts = np.unique(following, return_counts=True)
            start = int(found[np.isin(following, values[counts == counts.max()])][-1]) + n  # ties: the latest
            return tokens[start:start + k].tolist()
    return []


class CostModel:
    """A step's time as ``a + b * tokens fed``, fitted by least squares over recent decode steps.

    Times are what `step_clock` reads: on a CPU the engine thread's CPU time, which other programs running on the
    machine meanwhile do not add to (wall time there can double from one step to the next on a shared machine,
    and would charge drafts for the load of the moments they happened to run in)."""

    def __init__(self) -> None:
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, tokens: int, seconds: float) -> None:
        self.n, self.sx, self.sy = self.n * DECAY + 1, self.sx * DECAY + tokens, self.sy * DECAY + seconds
        self.sxx, self.sxy = self.sxx * DECAY + tokens * tokens, self.sxy * DECAY + tokens * seconds

    def coefficients(self) -> tuple[float, float]:
        """(a, b); until steps of different sizes were timed, b is `PRIOR_COST_RATIO` of a."""
        if self.n == 0:
            return 1.0, PRIOR_COST_RATIO
        mean_x, mean_y = self.sx / self.n, self.sy / self.n
        spread = self.sxx / self.n - mean_x * mean_x
        if spread > 0.25:
            b = (self.sxy / self.n - mean_x * mean_y) / spread
            a = mean_y - b * mean_x
            if a > 0 and b > 0:
                return a, b
        a = mean_y / (1 + PRIOR_COST_RATIO * mean_x)
        return a, a * PRIOR_COST_RATIO


@dataclass
class Timings:
    """What decode steps cost at one compute-thread count: the cost model, and by batch size class (with drafts
    or not) the recent cost per token emitted; how often `Speculator.pays` was asked at each size class."""

    cost: CostModel = field(default_factory=CostModel)
    seconds_per_token: dict[tuple[int, bool], float] = field(default_factory=dict)
    tries: dict[int, int] = field(default_factory=dict)


class Speculator:
    """Proposes drafts for a batch's rows, decides how many pay, and keeps each row's acceptance rate."""

    def __init__(self, config: SpeculativeConfig, eos: frozenset[int], kv_cache_tokens: int,
                 proposer: Callable[[list[Sequence], list[int]], list[list[int]]] | None = None,
                 stats: SpeculativeStats | None = None) -> None:
        self.config = config
        self.eos = eos
        self.kv_cache_tokens = kv_cache_tokens
        self.proposer = proposer or self._ngram
        self.stats = stats if stats is not None else SpeculativeStats()
        self._acceptance: dict[int, tuple[float, float]] = {}  # seq id -> (accepted, tried), decayed
        self._global = (PRIOR_ACCEPTANCE * 4, 4.0)
        self.threads: int | None = None  # the compute-thread count steps run at (None: not tuned)
        self._timings: dict[int | None, Timings] = {}

    def timings(self, threads: int | None = None) -> Timings:
        """The timings of steps at ``threads`` compute threads (default: the count steps run at)."""
        key = self.threads if threads is None else threads
        return self._timings.setdefault(key, Timings())

    @property
    def cost(self) -> CostModel:
        """The cost model of the count steps run at."""
        return self.timings().cost

    def _ngram(self, seqs: list[Sequence], limits: list[int]) -> list[list[int]]:
        c = self.config
        return [ngram_draft(seq.context_ids, k, c.prompt_lookup_min, c.prompt_lookup_max) if k else []
                for seq, k in zip(seqs, limits, strict=True)]

    def plan(self, batch: Batch) -> list[list[int]] | None:
        """Each row's drafts for this step (some may be empty), or None when no row should speculate."""
        rows = len(batch.seqs)
        k = self.config.num_speculative_tokens
        cap = self.config.disable_by_batch_size
        if (cap is not None and rows >= cap) or batch.kv_slots + rows * (1 + k) > self.kv_cache_tokens:
            return None
        # The last token emitted is the next input: a draft may run up to max_tokens, not past it.
        limits = [max(0, min(k, s.params.max_tokens - s.generated - 1)) for s in batch.seqs]
        if not any(limits):
            return None
        # Asked before proposing, as is how many drafts of each row would pay if proposed (what they pay depends on
        # the row's acceptance and the step's cost, not on the tokens): a draft model's proposals cost forward passes.
        if self.pays(rows):
            limits = [len(d) for d in self._worth(batch.seqs, [[0] * n for n in limits])]
        else:
            limits = []
        if not any(limits):
            self.stats.stood_down_steps += 1
            return None
        drafts = [self._legal(seq, d) for seq, d in zip(batch.seqs, self.proposer(batch.seqs, limits), strict=True)]
        return drafts if any(drafts) else None

    def pays(self, rows: int) -> bool:
        """Whether steps with drafts have given more tokens per second than plain steps at this batch size (in
        powers of two, so that a draining batch is not timed anew at each size), as
        measured (the cost model extrapolates; this checks it): each side is timed before it is trusted, and the
        side that lost is tried again every `RETRY_EVERY` steps (drafts: times how many times slower they were),
        as the rows' contents change."""
        size = rows.bit_length()  # batch sizes by powers of two: 1, 2-3, 4-7, 8-15, 16-31, ...
        timings = self.timings()
        tries = timings.tries[size] = timings.tries.get(size, 0) + 1
        plain, spec = timings.seconds_per_token.get((size, False)), timings.seconds_per_token.get((size, True))
        if spec is None or plain is None:
            return plain is not None  # time a plain step at this size first, then one with drafts
        if spec < plain:
            return tries % RETRY_EVERY != 0
        # Drafts lost: retried the less often the more they lost, so that retries cost about 1 / RETRY_EVERY of the
        # time (a draft model proposing for many rows, one row after another, can cost ten plain steps).
        return tries % (RETRY_EVERY * math.ceil(spec / plain)) == 0

    @staticmethod
    def _legal(seq: Sequence, draft: list[int]) -> list[int]:
        """The draft cut where the row's grammar would reject it: such tokens cannot be accepted, so they are
        not verified."""
        if draft and seq.matcher is not None:
            return draft[:seq.matcher.raw.validate_tokens(draft)]
        return draft

    def _worth(self, seqs: list[Sequence], drafts: list[list[int]]) -> list[list[int]]:
        """The drafts cut to the tokens whose expected gain raises the step's tokens per second."""
        a, b = self.cost.coefficients()
        tokens = float(len(seqs))  # expected tokens from the step: one per row, plus accepted drafts
        seconds = a + b * len(seqs)
        candidates = []
        for row, (seq, draft) in enumerate(zip(seqs, drafts, strict=True)):
            rate = self.acceptance(seq)
            candidates += [(rate ** depth, row, depth) for depth in range(1, len(draft) + 1)]
        candidates.sort(reverse=True)
        keep = [0] * len(seqs)
        for gain, row, depth in candidates:  # gains fall with depth, so each row's kept drafts are a prefix
            if gain * seconds <= tokens * b:
                break
            tokens, seconds = tokens + gain, seconds + b
            keep[row] = max(keep[row], depth)
        return [draft[:n] for draft, n in zip(drafts, keep, strict=True)]

    def acceptance(self, seq: Sequence) -> float:
        accepted, tried = self._acceptance.get(seq.id, self._global)
        return (accepted + 1) / (tried + 2)

    def record(self, seqs: list[Sequence], drafts: list[list[int]], accepted: list[int], tokens_fed: int,
               seconds: float, threads: int | None = None) -> None:
        """Account one step: its timing, with those at the compute-thread count it ran at (``threads``; default: the
        count steps run at), and each row's accepted drafts (a geometric acceptance model: a row tried its drafts in
        order until the first rejection). Rows no longer in the batch are forgotten."""
        timings = self.timings(threads)
        timings.cost.observe(tokens_fed, seconds)
        key = (len(seqs).bit_length(), any(drafts))
        per_token = seconds / (len(seqs) + sum(accepted))
        last = timings.seconds_per_token.get(key)
        timings.seconds_per_token[key] = per_token if last is None else last * 0.8 + per_token * 0.2
        ga, gt = self._global
        rates = {}
        for seq, draft, n in zip(seqs, drafts, accepted, strict=True):
            if not draft:  # forgotten while the row verifies nothing, so that it is tried again (its text changes)
                if seq.id in self._acceptance:
                    accepted_before, tried_before = self._acceptance[seq.id]
                    rates[seq.id] = (accepted_before * DECAY, tried_before * DECAY)
                continue
            tried = n + (n < len(draft))
            old_a, old_t = self._acceptance.get(seq.id, self._global)
            rates[seq.id] = (old_a * DECAY ** tried + n, old_t * DECAY ** tried + tried)
            ga, gt = ga * DECAY ** tried + n, gt * DECAY ** tried + tried
            self.stats.drafts += 1
            self.stats.draft_tokens += len(draft)
            self.stats.accepted_tokens += n
            self.stats.emitted_tokens += n + 1
        self._global = (ga, gt)
        self._acceptance = rates


def verify(batch: Batch, drafts: list[list[int]], forward: Callable[..., torch.Tensor], device: torch.device,
           emit: Callable[[Sequence, int], bool]) -> list[int]:
    """One forward pass over each row's next token and its drafts; emits the tokens each row keeps (``emit``
    returns False once the row has finished) and returns how many drafts each row accepted. The batch is
    left as after that many plain steps: cache, mask, positions and next input."""
    rows, width = len(batch.seqs), 1 + max(len(d) for d in drafts)
    ids = batch.last[:, None].repeat(1, width)  # padding reads the row's own token: any id would do
    fed = torch.zeros((rows, width), dtype=batch.mask.dtype)
    for row, draft in enumerate(drafts):
        if draft:
            ids[row, 1:1 + len(draft)] = torch.tensor(draft, device=ids.device)
        fed[row, :1 + len(draft)] = 1
    fed = fed.to(device)
    mask = torch.cat([batch.mask, fed], dim=1)
    positions = batch.positions[:, None] + torch.arange(width, device=device)
    logits = forward(input_ids=ids, attention_mask=mask, position_ids=positions)
    batch.mask = mask
    accepted = [0] * rows
    active = [True] * rows
    last = batch.last.clone()
    for j in range(width):
        tokens = sample_rows(batch, logits[:, j, :], device, active).tolist()
        for row in range(rows):
            if not active[row]:
                continue
            token, draft = tokens[row], drafts[row]
            going = emit(batch.seqs[row], token)
            if going and j < len(draft) and token == draft[j]:
                continue  # the draft is what the model gives here: the next position stands
            active[row], accepted[row] = False, j
            last[row] = token
        if not any(active):
            break
    batch.last = last
    batch.positions = batch.positions + torch.tensor(accepted, device=device) + 1
    drop_tail(batch, [width - 1 - n for n in accepted])
    return accepted


def drop_tail(batch: Batch, drop: list[int]) -> None:
    """Drop each row's last ``drop[row]`` cache columns (rejected drafts and padding) and right-align the rows
    again, trimming the left padding no row needs."""
    least = min(drop)
    if least:
        batch.mask = batch.mask[:, :-least]
        for layer in kv_layers(batch.cache):
            layer.keys, layer.values = layer.keys[:, :, :-least], layer.values[:, :, :-least]
    shifts = [d - least for d in drop]
    if any(shifts):
        width = batch.mask.shape[1]
        columns = torch.arange(width, device=batch.mask.device)
        shift = torch.tensor(shifts, device=batch.mask.device)[:, None]
        source = (columns[None, :] - shift).clamp(min=0)  # [B, W]: column c takes column c - shift
        batch.mask = batch.mask.gather(1, source) * (columns[None, :] >= shift)
        for layer in kv_layers(batch.cache):
            index = source[:, None, :, None].expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3])
            layer.keys = layer.keys.gather(2, index)
            index = source[:, None, :, None].expand(-1, layer.values.shape[1], -1, layer.values.shape[3])
            layer.values = layer.values.gather(2, index)
    trim = batch.mask.shape[1] - int(batch.own_lengths().max())
    if trim > 0:
        batch.mask = batch.mask[:, trim:]
        for layer in kv_layers(batch.cache):
            layer.keys, layer.values = layer.keys[:, :, trim:], layer.values[:, :, trim:]
