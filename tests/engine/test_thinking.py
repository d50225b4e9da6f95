"""The builtin engine's side of thinking: a budget closed by the engine at exactly N tokens, and a grammar that
starts where the thinking ends (free thinking, constrained answer), for plain, sampled and forked rows, without
and with n-gram speculation.

The tiny model is steered by a table of "after token a, write token b" (a bonus on b's logit after the real
forward pass), so each test fixes what the model thinks and when it would end its thinking by itself.
"""

from __future__ import annotations

import json

import pytest
import torch

from llmctl.core.speculation import parse
from llmctl.engine import EngineConfig, Finish, Sequence
from llmctl.engine.sampling import SamplingParams
from llmctl.engine.structured import Constraint
from llmctl.engine.thinking import Thinking
from tests.conftest import make_service
from tests.engine.test_speculative import NGRAM

PROMPT_END = 201  # "\n": the chat template's generation prompt ends with it
HMM, DOG, PARIS, ROME, ONE, TWO, SEA = 403, 445, 442, 443, 405, 396, 412  # " fox" " dog" " Paris" ...
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
          "additionalProperties": False}


@pytest.fixture(scope="module", params=[None, NGRAM])
def steered(request, tiny_model):
    """The tiny model's engine (plain, and with n-gram speculation, whose drafts the thinking must not outrun),
    and a function that sets the table its model follows."""
    service = make_service(tiny_model, engine=EngineConfig(
        max_num_seqs=8, max_waiting=16, kv_cache_tokens=4096,
        speculative=parse(request.param) if request.param else None))
    model = service.engine.model
    real = model.forward
    table: dict[int, int] = {}

    def forward(*args, **kwargs):
        out = real(*args, **kwargs)
        width = out.logits.shape[1]  # a prefill keeps the last position's logits; a verification, every one's
        for row, fed in enumerate(kwargs["input_ids"][:, -width:].tolist()):
            for position, last in enumerate(fed):
                if last in table:
                    out.logits[row, position, table[last]] += 100.0
        return out

    model.forward = forward

    def follow(pairs: dict[int, int]) -> None:
        table.clear()
        table.update(pairs)

    yield service, follow
    service.shutdown()


def generate(service, params: SamplingParams, n: int = 1) -> list[list[int]]:
    """Every choice's tokens, each ended by a stop or length finish."""
    tokenizer = service.loaded.tokenizer
    prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": "Think first."}],
                                                            tokenize=False, add_generation_prompt=True))
    assert prompt[-1] == PROMPT_END
    seq = Sequence(prompt, params, deadline=None)
    members = seq.fork(n) if n > 1 else [seq]
    service.engine.submit(seq)
    outs = []
    for member in members:
        tokens = []
        while not isinstance(event := member.events.get(timeout=120), Finish):
            tokens.append(event)
        assert event.reason in ("stop", "length"), event
        outs.append(tokens)
    return outs


def test_the_engine_closes_thinking_at_exactly_the_budget(steered):
    service, follow = steered
    eos = service.loaded.tokenizer.eos_token_id
    follow({PROMPT_END: HMM, HMM: HMM, SEA: ONE, ONE: eos})  # thinks forever unless stopped
    spec = Thinking(end=(DOG,), close=(DOG, SEA))
    for budget in (0, 1, 7):
        out, = generate(service, SamplingParams(max_tokens=40, temperature=0.0,
                                                thinking=Thinking(spec.end, spec.close, budget=budget)))
        assert out == [HMM] * budget + [DOG, SEA, ONE]
    if service.engine.config.speculative is not None:  # the drafts of HMM were verified, and some kept
        assert service.engine.stats.speculative.accepted_tokens > 0


def test_thinking_that_ends_by_itself_is_left_alone(steered):
    service, follow = steered
    eos = service.loaded.tokenizer.eos_token_id
    follow({PROMPT_END: HMM, HMM: PARIS, PARIS: DOG, DOG: ONE, ONE: eos})
    out, = generate(service, SamplingParams(max_tokens=40, temperature=0.0,
                                            thinking=Thinking(end=(PARIS, DOG), close=(TWO,), budget=5)))
    assert out == [HMM, PARIS, DOG, ONE]


def test_the_budget_counts_from_the_start_marker_when_the_prompt_left_thinking_closed(steered):
    service, follow = steered
    eos = service.loaded.tokenizer.eos_token_id
    follow({PROMPT_END: ROME, ROME: HMM, HMM: HMM, DOG: ONE, ONE: eos})
    out, = generate(service, SamplingParams(max_tokens=40, temperature=0.0, thinking=Thinking(
        end=(DOG,), start=(ROME,), inside=False, budget=3)))
    assert out == [ROME, HMM, HMM, HMM, DOG, ONE]


def test_a_grammar_constrains_the_answer_not_the_thinking(steered):
    service, follow = steered
    tokenizer = service.loaded.tokenizer
    follow({PROMPT_END: HMM, HMM: HMM})  # the thinking is no JSON: a grammar from the first token forbids it
    constraint = Constraint.json_schema(SCHEMA)
    for budget in (0, 4):
        outs = generate(service, SamplingParams(max_tokens=60, temperature=0.0, seed=1, constraint=constraint,
                                                thinking=Thinking(end=(DOG,), close=(DOG, SEA), budget=budget)), n=2)
        for out in outs:
            assert out[:budget + 2] == [HMM] * budget + [DOG, SEA]
            assert json.loads(tokenizer.decode(out[budget + 2:])) in ({"ok": True}, {"ok": False})
    # Without thinking the same grammar holds from the first token: no room for the model's HMM.
    out, = generate(service, SamplingParams(max_tokens=60, temperature=0.0, constraint=constraint))
    assert HMM not in out and json.loads(tokenizer.decode(out)) in ({"ok": True}, {"ok": False})


def test_a_sampled_row_closes_at_its_budget_too(steered):
    service, follow = steered
    follow({PROMPT_END: HMM, HMM: HMM})
    torch.manual_seed(0)
    out, = generate(service, SamplingParams(max_tokens=30, temperature=1.0, seed=3,
                                            thinking=Thinking(end=(DOG,), close=(DOG, SEA), budget=6)))
    assert out[:8] == [HMM] * 6 + [DOG, SEA]


def test_an_output_that_may_open_its_thinking_is_constrained_unless_it_does(steered):
    service, follow = steered
    tokenizer = service.loaded.tokenizer
    constraint = Constraint.json_schema(SCHEMA)
    spec = Thinking(end=(DOG,), start=(ROME,), inside=False, budget=2)
    # The model answers at once: the grammar holds from the first token (HMM is no JSON).
    follow({PROMPT_END: HMM, HMM: HMM})
    out, = generate(service, SamplingParams(max_tokens=60, temperature=0.0, constraint=constraint, thinking=spec))
    assert HMM not in out and json.loads(tokenizer.decode(out)) in ({"ok": True}, {"ok": False})
    # It opens its thinking: free until the budget closes it, then the grammar.
    follow({PROMPT_END: ROME, ROME: HMM, HMM: HMM})
    out, = generate(service, SamplingParams(max_tokens=60, temperature=0.0, constraint=constraint, thinking=spec))
    assert out[:4] == [ROME, HMM, HMM, DOG]
    assert json.loads(tokenizer.decode(out[4:])) in ({"ok": True}, {"ok": False})
