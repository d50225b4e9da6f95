"""The engine driven directly: other architectures (sliding-window attention among them), failures
after a prefill or in a decode step, and per-row sampling settings as rows join and leave.

Each model is a tiny random one built from a config; the reference is a greedy loop without any
cache, one forward pass over the whole sequence per token, so it shares no code with the engine.
"""

from __future__ import annotations

import functools
import threading
import time

import pytest
import torch
import transformers

from llmctl.engine import BuiltinEngine, EngineConfig, Finish, SamplingParams, Sequence, sampling
from llmctl.engine import prefill as engine_module
from tests.conftest import wait_for

VOCAB, NEW_TOKENS = 300, 30
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=512),
    # Windows shorter than the sequences, so the sliding mask really cuts.
    "mistral-sliding": lambda: transformers.MistralConfig(**COMMON, sliding_window=12),
    "qwen2-sliding": lambda: transformers.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=12,
                                                      max_window_layers=0),
    "gemma2-sliding": lambda: transformers.Gemma2Config(**COMMON, head_dim=16, sliding_window=12),
}


def build(name: str):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(CONFIGS[name]()).float().eval()


def reference(model, prompt: list[int]) -> list[int]:
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(NEW_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def tokens_of(seq: Sequence, timeout: float = 30) -> tuple[list[int], Finish]:
    tokens = []
    while True:
        event = seq.events.get(timeout=timeout)
        if isinstance(event, Finish):
            return tokens, event
        tokens.append(event)


def greedy(max_tokens: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rows_joining_at_different_steps_match_the_reference(name):
    model = build(name)
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (3, 9, 20, 33)]
    expected = [reference(model, p) for p in prompts]
    real_forward = model.forward

    @functools.wraps(real_forward)  # keeps the signature the engine reads
    def slow_forward(*args, **kwargs):  # ~0.3 s per sequence, so the later ones join mid-decode
        time.sleep(0.01)
        return real_forward(*args, **kwargs)

    model.forward = slow_forward
    engine = BuiltinEngine(model, frozenset(), EngineConfig(max_num_seqs=8))
    engine.start()
    try:
        seqs = []
        for prompt in prompts:  # each joins a batch that is already decoding: after the last one's second token
            seqs.append(engine.submit(Sequence(list(prompt), greedy())))
            assert wait_for(lambda: seqs[-1].generated >= 2 or seqs[-1].done, 120)  # a bound for a hang only
        results = [tokens_of(seq) for seq in seqs]
        assert engine.stats.max_batch_size >= 3  # they really overlapped
    finally:
        engine.stop()
    for (tokens, finish), want in zip(results, expected, strict=False):
        assert finish.reason == "length", finish
        assert tokens == want


def test_a_failure_after_the_prefill_fails_only_the_new_request(monkeypatch):
    """Sampling raises once for a newcomer: it ends at once with an error; the running row goes on."""
    model = build("llama")
    engine = BuiltinEngine(model, frozenset(), EngineConfig(max_num_seqs=8))
    engine.start()
    real, armed = sampling.BatchSampler.sample, threading.Event()

    def sample(self, logits, *args):
        if armed.is_set() and logits.shape[0] == 1 and engine._admitting:
            armed.clear()
            raise RuntimeError("injected failure while sampling a prefill")
        return real(self, logits, *args)

    monkeypatch.setattr(sampling.BatchSampler, "sample", sample)
    try:
        running = engine.submit(Sequence([5, 6, 7], greedy(200)))
        first_token = running.events.get(timeout=30)
        armed.set()
        deadline = time.monotonic() + 600
        newcomer = engine.submit(Sequence([8, 9], greedy(), deadline=deadline))
        tokens, finish = tokens_of(newcomer, timeout=120)
        assert finish.reason == "error" and not tokens
        assert time.monotonic() < deadline  # failed by the error, not expired at its deadline
        rest, finish = tokens_of(running)
        assert finish.reason == "length" and len(rest) + 1 == 200
        assert isinstance(first_token, int)
        after, finish = tokens_of(engine.submit(Sequence([8, 9], greedy())))
        assert finish.reason == "length" and len(after) == NEW_TOKENS
    finally:
        engine.stop()


def run_in_steps(engine: BuiltinEngine, schedule: dict[int, list[Sequence]], max_steps: int = 200) -> None:
    """Drive the engine step by step on this thread (no engine thread), so that which request joins
    or leaves at which step is fixed and the tests below are deterministic."""
    with torch.inference_mode():
        for step in range(max_steps):
            for seq in schedule.get(step, []):
                engine.submit(seq)
            if step > max(schedule) and not (engine._waiting or engine._batch or engine._prefilling):
                return
            engine._step()
    raise AssertionError("the engine did not finish within max_steps")


def drain(seq: Sequence) -> tuple[list[int], Finish]:
    return tokens_of(seq, timeout=0)


EOS = 299


@pytest.mark.parametrize("neighbour", [
    SamplingParams(max_tokens=1, temperature=0),  # leaves right after its prefill
    SamplingParams(max_tokens=20, temperature=1.0, logit_bias={EOS: 100.0}),  # ends on its first token
])
@pytest.mark.parametrize("own", [
    SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True),
    SamplingParams(max_tokens=20, temperature=0, frequency_penalty=2.0, ignore_eos=True),
])
def test_a_row_keeps_its_own_settings_when_a_neighbour_leaves_after_the_prefill(own, neighbour):
    """Rows prefilled together, one of which finishes at once: the other samples as if it ran alone."""
    model = build("llama")
    alone = Sequence([5, 6, 7, 8, 9], own)
    run_in_steps(BuiltinEngine(model, frozenset({EOS}), EngineConfig()), {0: [alone]})
    together, other = Sequence([5, 6, 7, 8, 9], own), Sequence([10, 11, 12], neighbour)
    run_in_steps(BuiltinEngine(model, frozenset({EOS}), EngineConfig()), {0: [other, together]})
    assert drain(other)[1].reason in ("stop", "length")
    assert drain(together) == drain(alone)


def test_penalty_history_survives_rows_joining_and_leaving():
    """frequency_penalty counts every token a row generated, across changes of the batch around it."""
    model = build("llama")
    penalized = SamplingParams(max_tokens=30, temperature=0, frequency_penalty=2.0, presence_penalty=1.0,
                               ignore_eos=True)
    alone = Sequence([5, 6, 7], penalized)
    run_in_steps(BuiltinEngine(model, frozenset(), EngineConfig()), {0: [alone]})
    busy = Sequence([5, 6, 7], penalized)
    schedule = {0: [busy, Sequence([8, 9], greedy(3))],  # leaves at step 3
                5: [Sequence([10, 11, 12, 13], greedy(4))],  # joins, then leaves
                12: [Sequence([14], greedy(10))]}
    run_in_steps(BuiltinEngine(model, frozenset(), EngineConfig()), schedule)
    assert drain(busy) == drain(alone)


def test_out_of_memory_in_a_decode_step_spares_a_prompt_being_prefilled_in_chunks():
    """The decode batch fails; a long prompt half-way through its chunked prefill carries on."""
    model = build("llama")
    real_forward = model.forward
    armed = {"on": False}

    @functools.wraps(real_forward)
    def forward(*args, **kwargs):
        if armed["on"] and kwargs["input_ids"].shape[1] == 1:  # a decode step
            armed["on"] = False
            raise torch.OutOfMemoryError("out of memory (injected)")
        return real_forward(*args, **kwargs)

    model.forward = forward
    engine = BuiltinEngine(model, frozenset(), EngineConfig(max_batched_tokens=4))
    running, long_prompt = Sequence([5, 6, 7], greedy(20)), Sequence(list(range(3, 23)), greedy(10))
    with torch.inference_mode():
        engine.submit(running)
        engine._step()  # prefill of the running row
        engine.submit(long_prompt)
        engine._step()  # first chunk of the long prompt, then a decode step
        assert long_prompt.prefilled == 4
        armed["on"] = True
        engine._step()  # second chunk, then the decode step fails
    run_in_steps(engine, {0: []})
    assert drain(running)[1].reason == "error"
    tokens, finish = drain(long_prompt)
    assert finish.reason == "length" and len(tokens) == 10
    assert engine.stats.oom_events == 1


@pytest.mark.parametrize("params", [
    greedy(),
    SamplingParams(max_tokens=NEW_TOKENS, temperature=0, frequency_penalty=1.5, presence_penalty=0.5,
                   ignore_eos=True),
    SamplingParams(max_tokens=NEW_TOKENS, temperature=1.0, seed=11, ignore_eos=True),
])
def test_rows_preempted_when_the_kv_budget_fills_resume_where_they_stopped(params, monkeypatch):
    """A budget too small for all rows at their full length: the newest rows are preempted and later
    resume from their prompt plus what they had generated, and every answer is the one it has alone."""
    monkeypatch.setattr(engine_module, "ADMIT_HEADROOM", 8)  # admit more rows than fit at full length
    model = build("llama")
    generator = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in (3, 9, 20, 33)]
    alone = []
    for prompt in prompts:
        seq = Sequence(list(prompt), params)
        run_in_steps(BuiltinEngine(model, frozenset(), EngineConfig()), {0: [seq]})
        alone.append(drain(seq))
    if params.greedy and not params.penalized:
        assert [tokens for tokens, _ in alone] == [reference(model, p) for p in prompts]
    # Admitted together, three rows would grow to 3 x 50 slots in the padded layout; the budget is 120.
    engine = BuiltinEngine(model, frozenset(), EngineConfig(kv_cache_tokens=120))
    seqs = [Sequence(list(p), params) for p in prompts]
    run_in_steps(engine, {0: seqs}, max_steps=500)
    assert engine.stats.preemptions >= 1
    assert [drain(seq) for seq in seqs] == alone
    assert engine.stats.prompt_tokens == sum(len(p) for p in prompts)  # a resumption is not a new prompt
