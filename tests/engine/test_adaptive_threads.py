"""The builtin engine with adaptive compute threads: a count that changes between decode steps changes no token
(with speculative decoding too)."""

from __future__ import annotations

import pytest
import torch
import transformers

from llmctl.core import speculation
from llmctl.core.loader import LoadOptions, load_model
from llmctl.core.threads import ThreadPolicy, ThreadTuner, set_torch_threads
from llmctl.engine import BuiltinEngine, EngineConfig, Finish, SamplingParams, Sequence
from tests.conftest import REAL_MODEL, SMOLLM2_GGUF

PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14, 15]]
NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'


def flapping() -> tuple[ThreadTuner, list[int]]:
    """A tuner whose every trial (one step at the other count, one at its own) wins and whose next trial is
    due at once: while the steps keep one shape, the count changes at most decode steps and switches every
    second step. Each count it sets is recorded."""
    applied: list[int] = []

    def apply(threads: int) -> None:
        applied.append(threads)
        set_torch_threads(threads)

    tuner = ThreadTuner(ThreadPolicy(cores=2, fixed=None, current=2), trial_steps=1, baseline_steps=1,
                        margin=-1e9, margin_up=-1e9, give_up=float("inf"),
                        first_interval_s=0, max_interval_s=0, apply=apply)
    return tuner, applied


def generate(model, eos: frozenset[int], prompts: list[list[int]], tokens: int, threads: ThreadTuner | None = None,
             speculative: str | None = None) -> tuple[list[list[int]], BuiltinEngine]:
    """Each prompt's greedy tokens, and the engine that made them."""
    spec = speculation.parse(speculative) if speculative else None
    config = EngineConfig(max_num_seqs=len(prompts), speculative=spec)
    engine = BuiltinEngine(model, eos, config, threads=threads)
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
        return out, engine
    finally:
        engine.stop()


def tiny_llama():
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512)).float().eval()


@pytest.fixture()
def torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_tokens_do_not_change_when_the_thread_count_does(torch_threads):
    model = tiny_llama()
    fixed, _ = generate(model, frozenset(), PROMPTS, 40)
    tuner, applied = flapping()
    assert generate(model, frozenset(), PROMPTS, 40, tuner)[0] == fixed
    assert set(applied) == {1, 2} and tuner.policy.switches >= 15


def test_a_speculating_engine_tunes_its_threads_and_keeps_its_text(torch_threads):
    """Speculation and the tuner together: the tuner's trials run on steps of one shape (rows, tokens fed) while
    the drafts change the shape from step to step, and the speculator keeps each count's timings apart. The
    greedy text is the plain engine's, drafts are verified and accepted, and both counts were run and timed."""
    model = tiny_llama()
    prompts = [[5, 6, 7, 8, 9] * 4, [20, 21, 22] * 5, [14, 15]]  # the tiny model's answers repeat themselves
    plain, _ = generate(model, frozenset(), prompts, 60)
    tuner, applied = flapping()
    text, engine = generate(model, frozenset(), prompts, 60, tuner, NGRAM)
    assert text == plain
    assert set(applied) == {1, 2} and tuner.policy.switches >= 1
    speculator = engine.speculator
    assert speculator is not None and speculator.stats.drafts > 0 and speculator.stats.accepted_tokens > 0
    assert speculator.timings(1).seconds_per_token and speculator.timings(2).seconds_per_token


@REAL_MODEL[0]
@REAL_MODEL[1]
def test_smollm2_bf16_greedy_text_is_the_same_at_changing_thread_counts(torch_threads):
    loaded = load_model(LoadOptions(model_path=SMOLLM2_GGUF, dtype="bfloat16", device="cpu"))
    chat = [[{"role": "user", "content": q}] for q in ("What is the capital of France?", "Name three colours.",
                                                         "Write a haiku about the sea.")]
    tok = loaded.tokenizer
    prompts = [tok(tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False),
                   add_special_tokens=False)["input_ids"] for m in chat]
    fixed, _ = generate(loaded.model, loaded.eos_token_ids, prompts, 32)
    tuner, applied = flapping()
    assert generate(loaded.model, loaded.eos_token_ids, prompts, 32, tuner)[0] == fixed
    assert set(applied) == {1, 2} and tuner.policy.switches >= 12


@pytest.mark.parametrize("spec", [None, NGRAM])
def test_the_engine_on_cpu_tunes_its_threads_with_or_without_speculation(tmp_path, torch_threads, spec):
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
        assert engine.threads is not None and policy.mode == "adaptive"
        assert (engine.speculator is not None) == (spec is not None)
    finally:
        reset_policy()


@REAL_MODEL[0]
@REAL_MODEL[1]
def test_smollm2_bf16_speculating_stream_keeps_its_text_at_changing_thread_counts(torch_threads):
    """One stream copying records (drafts accepted), n-gram speculation beside a tuner that switches at most steps:
    the greedy text without either."""
    loaded = load_model(LoadOptions(model_path=SMOLLM2_GGUF, dtype="bfloat16", device="cpu"))
    records = "\n".join(f"id={i}; name=Customer {i}; city=Springfield; plan=gold" for i in range(4))
    tok = loaded.tokenizer
    prompt = tok(tok.apply_chat_template([{"role": "user", "content": f"Copy these records exactly:\n{records}"}],
                                         add_generation_prompt=True, tokenize=False),
                 add_special_tokens=False)["input_ids"]
    plain, _ = generate(loaded.model, loaded.eos_token_ids, [prompt], 64)
    tuner, applied = flapping()
    text, engine = generate(loaded.model, loaded.eos_token_ids, [prompt], 64, tuner, NGRAM)
    assert text == plain
    assert set(applied) == {1, 2} and tuner.policy.switches >= 1
    assert engine.speculator is not None and engine.speculator.stats.accepted_tokens > 0
