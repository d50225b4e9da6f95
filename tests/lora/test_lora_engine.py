"""The builtin engine with LoRA adapters: each row computes with its own adapter (or none), token for token what
the adapter merged into the model (PEFT's merge_and_unload) generates, alone and in mixed batches."""

from __future__ import annotations

import pytest

from llmctl.core.adapters import AdapterSpec
from llmctl.engine import EngineConfig, Finish, SamplingParams, Sequence
from tests.conftest import make_service
from tests.lora.adapters import merged_greedy

PROMPT = [5, 17, 33, 80, 91, 7, 8, 9]
LONG = [(i * 37 + 11) % 500 for i in range(40)]  # over two prefix-cache blocks
TOKENS = 16


@pytest.fixture(scope="module")
def lora_service(tiny_model, adapter_one, adapter_two):
    service = make_service(tiny_model, loras=(AdapterSpec("one", adapter_one), AdapterSpec("two", adapter_two)))
    yield service
    service.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_model, adapter_one, adapter_two):
    """What each model generates from each prompt, greedily in float32: base, and each adapter merged."""
    adapters = {None: None, "one": adapter_one, "two": adapter_two}
    return {(name, tuple(p)): merged_greedy(tiny_model, path, p, TOKENS) for name, path in adapters.items()
            for p in (PROMPT, LONG)}


def submit(service, prompt: list[int], adapter: str | None) -> Sequence:
    seq = Sequence(list(prompt), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True), adapter=adapter)
    return service.engine.submit(seq)


def tokens(seq: Sequence) -> list[int]:
    out = []
    while not isinstance(event := seq.events.get(timeout=120), Finish):
        out.append(event)
    assert event.reason == "length", event
    return out


@pytest.mark.parametrize("adapter", [None, "one", "two"])
def test_alone_equals_merged(lora_service, expected, adapter):
    assert tokens(submit(lora_service, PROMPT, adapter)) == expected[(adapter, tuple(PROMPT))]


def test_mixed_batch_equals_merged(lora_service, expected):
    """Rows of both adapters and of the base model share prefills and decode steps, and rows join a running batch
    half-way (a prefill of new rows while others decode)."""
    plan = [(PROMPT, None), (PROMPT, "one"), (LONG, "two"), (LONG, "one"), (PROMPT, "two"), (LONG, None)]
    first = [submit(lora_service, prompt, adapter) for prompt, adapter in plan[:3]]
    head = first[0].events.get(timeout=120)  # the first rows are decoding when the others arrive
    later = [submit(lora_service, prompt, adapter) for prompt, adapter in plan[3:]]
    got = [[head, *tokens(first[0])]] + [tokens(seq) for seq in first[1:] + later]
    assert lora_service.engine.stats.max_batch_size >= 2
    for (prompt, adapter), out in zip(plan, got, strict=True):
        assert out == expected[(adapter, tuple(prompt))], adapter


def test_prefix_cache_keeps_adapters_apart(lora_service, expected):
    """A prompt the base model prefilled is cached, but an adapter's row computes its own KV (the base model's
    would give other tokens); the adapter's second request then reads its own cached prefix."""
    engine = lora_service.engine
    # A prompt no other test sends, over one of the 128-token chunks whose KV the cache keeps exact.
    prompt = [(i * 53 + 7) % 500 for i in range(200)]
    want = {name: merged_greedy(lora_service.settings.load.model_path, path, prompt, TOKENS)
            for name, path in ((None, None), ("one", lora_service.settings.loras[0].path))}
    seq = submit(lora_service, prompt, None)
    assert tokens(seq) == want[None]
    first = submit(lora_service, prompt, "one")
    assert tokens(first) == want["one"]
    assert first.cached_tokens == 0  # the base model's blocks were there, and not used
    again = submit(lora_service, prompt, "one")
    assert tokens(again) == want["one"]
    assert again.cached_tokens >= 128  # its own blocks
    assert engine.stats.prefix_cache_hits > 0


def test_n_choices_fork_with_the_adapter(lora_service, expected):
    """n > 1 prefills once and forks the row: every choice keeps the adapter."""
    seq = Sequence(list(PROMPT), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True), adapter="two")
    members = seq.fork(3)
    lora_service.engine.submit(seq)
    for member in members:
        assert tokens(member) == expected[("two", tuple(PROMPT))]


def test_shared_prefixes_keep_adapters_apart(lora_service, tiny_model, adapter_one):
    """Rows that start with the same cached 48 tokens read one shared copy of their KV, but a shared prefix holds
    one adapter's KV (or the base model's): rows of the other read their own, and every row's tokens stay exact."""
    engine = lora_service.engine
    system = [(i * 29 + 3) % 500 for i in range(48)]
    prompts = [system + [100 + i, 200 + i] for i in range(4)]
    plan = [(prompts[0], None), (prompts[1], "one"), (prompts[2], "one"), (prompts[3], None)]
    for prompt, adapter in plan[:2]:  # both chains cached
        tokens(submit(lora_service, prompt, adapter))
    shared_reads: list[tuple[list, list]] = []
    real_decode = engine._decode

    def decode():
        batch = engine._batch
        if batch is not None and batch.shared is not None:
            shared_reads.append(([s.adapter for s in batch.seqs], batch.shared_lengths.tolist()))
        real_decode()

    engine.share_min_tokens, engine._decode = 16, decode
    try:
        got = [tokens(seq) for seq in [submit(lora_service, p, a) for p, a in plan]]
    finally:
        del engine.share_min_tokens, engine._decode
    paths = {None: None, "one": adapter_one}
    for (prompt, adapter), out in zip(plan, got, strict=True):
        assert out == merged_greedy(tiny_model, paths[adapter], prompt, TOKENS), adapter
    assert shared_reads, "no row read a shared prefix"
    for adapters, lengths in shared_reads:  # the readers of one shared prefix all run with one adapter (or none)
        assert len({a for a, n in zip(adapters, lengths, strict=True) if n}) == 1


def test_speculative_decoding_verifies_with_the_adapter(tiny_model, adapter_one, adapter_two):
    """n-gram drafts verified several tokens per row in one pass: each row of the pass runs with its adapter, so
    greedy tokens stay the merged model's."""
    from llmctl.core.speculation import parse

    spec = parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}')
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, kv_cache_tokens=8192, speculative=spec),
                           loras=(AdapterSpec("one", adapter_one), AdapterSpec("two", adapter_two)))
    try:
        prompt = [7, 8, 9, 10, 11] * 6  # repeats: the n-gram drafter finds drafts in it
        plan = [("one", adapter_one), ("two", adapter_two), (None, None)]
        seqs = [Sequence(list(prompt), SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), adapter=name)
                for name, _ in plan]
        for seq in seqs:
            service.engine.submit(seq)
        for seq, (name, path) in zip(seqs, plan, strict=True):
            assert tokens(seq) == merged_greedy(tiny_model, path, prompt, 24), name
        assert service.engine.stats.speculative.draft_tokens > 0
    finally:
        service.shutdown()
