"""Per-sequence sampling settings and the batched logits processing that applies them.

Penalties follow OpenAI's definitions (additive, over the tokens generated so far):
    logit[j] -= frequency_penalty * count[j] + presence_penalty * (count[j] > 0)
not transformers' multiplicative repetition_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from llmctl.engine.structured import BatchMasks, Constraint, Matcher
from llmctl.engine.thinking import Thinking


@dataclass(frozen=True)
class TokenLogprobs:
    """A generated token's log-probability, and the most likely tokens at its place (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off; k: sample among the k most likely tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; N >= 0: each token's log-probability and the N most likely
    constraint: Constraint | None = None  # what the output must match (JSON schema, regex, grammar)
    # A reasoning model's thinking: its end, its budget; the constraint then applies after it.
    thinking: Thinking | None = None

    @property
    def greedy(self) -> bool:
        """Temperature 0, or top_p 0 (only the most likely token is left to draw from)."""
        return self.temperature <= 1e-5 or self.top_p <= 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty)

    def make_generator(self, device) -> torch.Generator | None:
        if self.seed is None:
            return None
        generator = torch.Generator(device=device)
        generator.manual_seed(self.seed)
        return generator


class BatchSampler:
    """Picks the next token for every row of a batch, each row with its own settings.

    The per-row settings are gathered into tensors once per batch composition (``refresh``), so
    a decode step does a few vectorised operations plus a loop over sampled (non-greedy) rows only.
    """

    def __init__(self, vocab_size: int, device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self.params: list[SamplingParams] = []
        self.generators: list[torch.Generator | None] = []
        self.counts: torch.Tensor | None = None  # [B, V] generated-token counts, only when a row is penalized
        self.masks: BatchMasks | None = None  # the grammars of the constrained rows, None when there are none

    def refresh(self, params: list[SamplingParams], generators: list[torch.Generator | None],
                counts: torch.Tensor | None, matchers: list[Matcher | None] | None = None) -> None:
        self.params, self.generators, self.counts = params, generators, counts
        self.masks = BatchMasks.of(matchers, self.vocab_size, self.device) if matchers else None
        self.any_penalty = any(p.penalized for p in params)
        self.any_bias = any(p.logit_bias for p in params)
        self.all_greedy = all(p.greedy for p in params)
        self.logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        self.top_k = max((p.logprobs for p in params if p.logprobs is not None), default=0)
        if self.any_penalty:
            self.freq = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
            self.pres = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
        if self.any_bias:
            rows, cols, vals = [], [], []
            for i, p in enumerate(params):
                for token, bias in p.logit_bias.items():
                    if 0 <= token < self.vocab_size:
                        rows.append(i)
                        cols.append(token)
                        vals.append(bias)
            self.bias_index = (torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device))
            self.bias_values = torch.tensor(vals, device=self.device)

    def sample(self, logits: torch.Tensor, active: list[bool] | None = None) -> torch.Tensor:
        """logits [B, V] -> next token ids [B] (long). ``active``: the rows that take a token now (speculative
        verification, one position at a time); the others' entries are meaningless and draw nothing."""
        logits = logits.float()
        if self.any_penalty and self.counts is not None:
            logits = logits - self.freq * self.counts - self.pres * (self.counts > 0).float()
        if self.any_bias:
            logits = logits.index_put(self.bias_index, self.bias_values, accumulate=True)
        if self.masks is not None:  # after the penalties and biases, so nothing lifts a forbidden token
            logits = self.masks.apply(logits, active)
        tokens = torch.argmax(logits, dim=-1)
        if self.all_greedy:
            return tokens
        for i, p in enumerate(self.params):
            if not p.greedy and (active is None or active[i]):
                tokens[i] = self._sample_row(logits[i], p, self.generators[i])
        return tokens

    @staticmethod
    def _sample_row(row: torch.Tensor, p: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
        if 0 < p.top_k < row.shape[-1]:
            row = row.masked_fill(row < torch.topk(row, p.top_k).values[-1], float("-inf"))
        probs = torch.softmax(row / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            cumulative = torch.cumsum(sorted_probs, dim=-1)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = cumulative - sorted_probs >= p.top_p
            drop[0] = False
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            choice = torch.multinomial(sorted_probs, 1, generator=generator)
            return order[choice].squeeze(0)
        return torch.multinomial(probs, 1, generator=generator).squeeze(0)

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor,
                 active: list[bool] | None = None) -> list[tuple[int, TokenLogprobs]]:
        """(row, log-probabilities) for the (``active``) rows that asked for them, from the model's own
        distribution: before temperature, top_p, penalties and logit_bias, as other OpenAI-compatible servers
        report it."""
        wanted = [i for i in self.logprob_rows if active is None or active[i]]
        if not wanted:
            return []
        rows = torch.tensor(wanted, device=logits.device)
        logp = torch.log_softmax(logits[rows].float(), dim=-1)
        picked = tokens[rows]
        chosen = logp.gather(1, picked[:, None]).squeeze(1).tolist()
        picked_ids = picked.tolist()
        top_values: list[list[float]] = []
        top_ids: list[list[int]] = []
        if self.top_k:
            values, ids = logp.topk(self.top_k, dim=-1)
            top_values, top_ids = values.tolist(), ids.tolist()
        out = []
        for j, row in enumerate(wanted):
            k = self.params[row].logprobs
            top = list(zip(top_ids[j][:k], top_values[j][:k], strict=False)) if k else []
            out.append((row, TokenLogprobs(picked_ids[j], chosen[j], top)))
        return out

    def observe(self, tokens: torch.Tensor, active: list[bool] | None = None) -> None:
        """Count the (``active``) rows' sampled tokens for the penalties, and advance their grammars."""
        if self.counts is not None:
            rows = torch.arange(tokens.shape[0], device=self.device)
            if active is not None:
                rows = rows[torch.tensor(active, device=self.device)]
            self.counts[rows, tokens[rows]] += 1
        if self.masks is not None:
            self.masks.accept(tokens.tolist(), active)
