"""The builtin engine with adaptive compute threads: a count that changes between decode steps changes no token."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmctl.core.loader import LoadOptions, load_model
from llmctl.core.threads import ThreadPolicy, ThreadTuner, set_torch_threads
from llmctl.engine import BuiltinEngine, EngineConfig, Finish, SamplingParams, Sequence
from tests.conftest import REAL_MODEL, SMOLLM2_GGUF

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]


def flapping() -> tuple[ThreadTuner, list[int]]:
    """A tuner whose every trial (one step at the other count, one at its own) wins and whose next trial is
    due at once: the count changes at most decode steps, and switches every second step. Each count it sets
    is recorded."""
    applied: list[int] = []

    def apply(threads: int) -> None:
        applied.append(threads)
        set_torch_threads(threads)

    tuner = ThreadTuner(ThreadPolicy(cores=2, fixed=None, current=2), trial_steps=1, baseline_steps=1,
                        margin=-1e9, give_up=float("inf"), first_interval_s=0, max_interval_s=0, apply=apply)
    return tuner, applied


def generate(model, eos: frozenset[int], prompts: list[list[int]], tokens: int,
             threads: ThreadTuner | None = None) -> list[list[int]]:
    engine = BuiltinEngine(model, eos, EngineConfig(max_num_seqs=len(prompts)), threads=threads)
    engine.start()
    try:
        seqs = [engine.submit(Sequence(list(p), SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)))
                for p in prompts]
        out = []
        for seq in seqs:
            ids = []
            while not isinstance(event := seq.events.get(timeout=600), Finish):  # a bound for a hang only
                ids.append(event)
            out.append(ids)
        return out
    finally:
        engine.stop()


@pytest.fixture()
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tokens_do_not_change_when_the_thread_count_does(torch_threads):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)).float().eval()
    fixed = generate(model, frozenset(), PROMPTS, 40)
    tuner, applied = flapping()
    assert generate(model, frozenset(), PROMPTS, 40, tuner) == fixed
    assert set(applied) == {1, 2} and tuner.policy.switches >= 15


@REAL_MODEL[0]
@REAL_MODEL[1]
def test_smollm2_bf16_greedy_text_is_the_same_at_changing_thread_counts(torch_threads):
    loaded = load_model(LoadOptions(model_path=SMOLLM2_GGUF, dtype="bfloat16", device="cpu"))
    chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.",
                                                         "Write a haiku about the sea.")]
    tok = loaded.tokenizer
    prompts = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for m in chat]
    fixed = generate(loaded.model, loaded.eos_token_ids, prompts, 32)
    tuner, applied = flapping()
    assert generate(loaded.model, loaded.eos_token_ids, prompts, 32, tuner) == fixed
    assert set(applied) == {1, 2} and tuner.policy.switches >= 12


@pytest.mark.parametrize("spec", [None, '{"method": "ngram", "num_speculative_tokens": 4}'])
def test_speculation_keeps_the_thread_count_it_starts_with(tmp_path, torch_threads, spec):
    """With --speculative-config the engine has no tuner: whether drafts pay is judged from steps timed at one
    count, and a tuner's trials switch it step by step."""
    from llmctl.core import speculation
    from llmctl.core.threads import configure_cpu_threads, reset_policy
    from llmctl.engine.builtin_setup import BuiltinOptions
    from llmctl.server.testing import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    policy = configure_cpu_threads(None)
    try:
        if policy.cores < 2:
            pytest.skip("one usable core: there is no other count to try")
        config = EngineConfig(max_num_seqs=2, speculative=speculation.parse(spec) if spec else None)
        _, engine = BuiltinOptions().build(LoadOptions(model_path=folder, dtype="float32", device="cpu"),
                                           config, load_model)
        assert (engine.threads is None) == (spec is not None)
        assert policy.mode == ("fixed" if spec else "adaptive")
    finally:
        reset_policy()
