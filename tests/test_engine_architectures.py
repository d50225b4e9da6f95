"""The engine on other architectures (sliding-window attention among them), and failures after a prefill.

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

from llmctl.engine import Engine, EngineConfig, Finish, SamplingParams, Sequence
from llmctl.engine import sampling

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
    engine = Engine(model, frozenset(), EngineConfig(max_num_seqs=8))
    engine.start()
    try:
        seqs = []
        for prompt in prompts:  # each joins a batch that is already decoding
            seqs.append(engine.submit(Sequence(list(prompt), greedy())))
            time.sleep(0.06)
        results = [tokens_of(seq) for seq in seqs]
        assert engine.stats.max_batch_size >= 3  # they really overlapped
    finally:
        engine.stop()
    for (tokens, finish), want in zip(results, expected):
        assert finish.reason == "length", finish
        assert tokens == want


def test_a_failure_after_the_prefill_fails_only_the_new_request(monkeypatch):
    """Sampling raises once for a newcomer: it ends at once with an error; the running row goes on."""
    model = build("llama")
    engine = Engine(model, frozenset(), EngineConfig(max_num_seqs=8))
    engine.start()
    real, armed = sampling.BatchSampler.sample, threading.Event()

    def sample(self, logits):
        if armed.is_set() and logits.shape[0] == 1 and engine._admitting:
            armed.clear()
            raise RuntimeError("injected failure while sampling a prefill")
        return real(self, logits)

    monkeypatch.setattr(sampling.BatchSampler, "sample", sample)
    try:
        running = engine.submit(Sequence([5, 6, 7], greedy(200)))
        first_token = running.events.get(timeout=30)
        armed.set()
        newcomer = engine.submit(Sequence([8, 9], greedy(), deadline=time.monotonic() + 60))
        started = time.monotonic()
        tokens, finish = tokens_of(newcomer, timeout=10)
        assert finish.reason == "error" and not tokens
        assert time.monotonic() - started < 5  # at once, not at its deadline
        rest, finish = tokens_of(running)
        assert finish.reason == "length" and len(rest) + 1 == 200
        assert isinstance(first_token, int)
        after, finish = tokens_of(engine.submit(Sequence([8, 9], greedy())))
        assert finish.reason == "length" and len(after) == NEW_TOKENS
    finally:
        engine.stop()
