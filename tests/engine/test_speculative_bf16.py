"""Speculative decoding in bfloat16: greedy tokens and their log-probabilities are those without it, bit for bit.

The tiny model's MLP is wider than 1,024 features (as SmolLM2's down-projection is), where a one-row bf16
product on a CPU runs another kernel than a product of several rows, and its chat prompts are shorter than
`attention.MIN_KEYS`, where a short softmax row runs scalar code: both parted the two paths before
`llmctl.engine.invariant` and the padded attention rows (docs/engine.md, "Exactness").
"""

from __future__ import annotations

import copy

import httpx
import pytest
import torch
from transformers import DynamicCache

from llmctl.core.loader import LoadOptions, load_model
from llmctl.core.speculation import parse
from llmctl.engine import EngineConfig, attention, invariant
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import build_tiny_model
from tests.conftest import serving_all

PROMPTS = ["Hi", "Repeat: one two three one two three", "Tell me a story about a cat and a dog.",
           f"Copy this list: {', '.join(f'item {i}' for i in range(12))}. Again: item 1, item 2"]


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("wide") / "tiny-wide", hidden=256, intermediate=1536, seed=3)


def _service(model, spec: str | None) -> Service:
    service = Service(ServiceSettings(
        load=LoadOptions(model_path=model, dtype="bfloat16", device="cpu"),
        engine=EngineConfig(max_num_seqs=8, kv_cache_tokens=8192, speculative=parse(spec) if spec else None)))
    service.load()
    assert service.status == "ready", service.error
    return service


@pytest.fixture(scope="module")
def servers(wide_model):
    """bf16 servers without speculation, with n-gram lookup and with the model as its own draft (every draft
    accepted: each step verifies k + 1 tokens); yields {name: (service, url)}."""
    specs = {"plain": None,
             "ngram": '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, '
                      '"prompt_lookup_min": 1}',
             "same": f'{{"model": "{wide_model}", "num_speculative_tokens": 4}}'}
    services = {name: _service(wide_model, spec) for name, spec in specs.items()}
    for name in ("ngram", "same"):  # every draft verified, whatever the step timings would choose
        speculator = services[name].engine.speculator
        speculator.pays = lambda rows: True
        speculator._worth = lambda seqs, drafts: drafts
    with serving_all(services) as served:
        yield served


def _answer(url: str, prompt: str) -> tuple[str, list[tuple[str, float]]]:
    r = httpx.post(url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": prompt}], "max_tokens": 48, "temperature": 0, "ignore_eos": True,
        "logprobs": True})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return choice["message"]["content"], [(t["token"], t["logprob"]) for t in choice["logprobs"]["content"]]


@pytest.mark.parametrize("method", ["ngram", "same"])
def test_bf16_greedy_tokens_and_logprobs_are_those_without_speculation(servers, method):
    reference = [_answer(servers["plain"][1], p) for p in PROMPTS]
    service, url = servers[method]
    stats = service.engine.stats.speculative
    drafted, accepted = stats.draft_tokens, stats.accepted_tokens
    assert [_answer(url, p) for p in PROMPTS] == reference  # log-probabilities compared exactly
    assert stats.draft_tokens > drafted, "no draft was verified"
    if method == "same":  # its own greedy continuation (its own KV, so not every draft in bf16)
        assert stats.accepted_tokens - accepted > (stats.draft_tokens - drafted) / 2 > 40


def test_one_token_steps_compute_what_a_verifying_pass_does(wide_model):
    """The model itself: k + 1 one-token steps and one pass over the same k + 1 tokens give bit-identical
    logits and KV in bf16, from contexts shorter and longer than `attention.MIN_KEYS`."""
    model = load_model(LoadOptions(model_path=wide_model, dtype="bfloat16", device="cpu")).model
    attention.select(model, "grouped")
    assert invariant.widen(model) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer, and the output layer
    generator = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for context, k in [(3, 8), (9, 16), (40, 5), (150, 12)]:
            prompt = torch.randint(0, 512, (1, context), generator=generator)
            cache = DynamicCache()
            model(input_ids=prompt, attention_mask=torch.ones(1, context, dtype=torch.long), past_key_values=cache)
            tokens = torch.randint(0, 512, (1, k + 1), generator=generator)
            stepped, steps = copy.deepcopy(cache), []
            for j in range(k + 1):
                steps.append(model(input_ids=tokens[:, j:j + 1], past_key_values=stepped,
                                   attention_mask=torch.ones(1, context + j + 1, dtype=torch.long),
                                   position_ids=torch.tensor([[context + j]])).logits[0, 0])
            verified = copy.deepcopy(cache)
            logits = model(input_ids=tokens, past_key_values=verified,
                           attention_mask=torch.ones(1, context + k + 1, dtype=torch.long),
                           position_ids=torch.arange(context, context + k + 1)[None]).logits[0]
            assert all(torch.equal(steps[j], logits[j]) for j in range(k + 1)), (context, k)
            for a, b in zip(stepped.layers, verified.layers, strict=True):
                assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), (context, k)


def test_one_row_is_computed_as_two():
    linear = torch.nn.Linear(1536, 64).to(torch.bfloat16)
    rows = torch.randn(3, 1536, dtype=torch.bfloat16)
    with torch.inference_mode():
        pair = linear(rows[:2])
        assert invariant.widen(linear) == 1 and invariant.widen(linear) == 0  # once
        assert torch.equal(linear(rows[:1]), pair[:1])
        assert torch.equal(linear(rows[None, :1]), pair[None, :1])  # [1, 1, features]: the shape is kept
        assert torch.equal(linear(rows), torch.nn.functional.linear(rows, linear.weight, linear.bias))
    assert invariant.widen(torch.nn.Linear(8, 8)) == 0  # float32 is left as it is
