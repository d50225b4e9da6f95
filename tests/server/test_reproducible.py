"""Reproducible answers at temperature 0 and with a seed: the same tokens and log-probabilities whether the
prompt's prefix was in the prefix cache or not (by default), and whichever requests share the batch
(--deterministic), on the builtin engine in bfloat16. Real servers on 127.0.0.1 with a tiny random bf16 model
(one with the prefix cache off), and the real SmolLM2."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from llmctl.core.loader import LoadOptions
from llmctl.engine import EngineConfig
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.reproducible import CHUNK_TOKENS
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import build_tiny_model, serve_in_thread
from tests.conftest import REAL_MODEL, SMOLLM2_GGUF


def bf16_service(model, deterministic: bool = False, **engine) -> Service:
    settings = dict(max_num_seqs=16, max_waiting=32, kv_cache_tokens=32768) | engine
    load = LoadOptions(model_path=model, dtype="bfloat16", device="cpu")
    # No request timeout: these tests compare answers, and a slow or busy machine must not cut one short.
    service = Service(ServiceSettings(load=load, engine=EngineConfig(**settings), request_timeout=3600,
                                      engine_options=BuiltinOptions(deterministic=deterministic)))
    service.load()
    assert service.status == "ready", service.error
    return service


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    # Large initial weights give peaked, far-apart logits nowhere: bf16 rounding then moves them visibly.
    return build_tiny_model(tmp_path_factory.mktemp("tiny-bf16") / "model", context=2048, seed=3)


@pytest.fixture(scope="module")
def cached_url(bf16_model):
    service = bf16_service(bf16_model)
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


@pytest.fixture(scope="module")
def uncached_url(bf16_model):
    service = bf16_service(bf16_model, prefix_cache_tokens=0)
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


def conversation(words: int = 90) -> list[dict]:
    """A prompt longer than two reproducible chunks that no other test sends."""
    rules = " ".join(f"rule {n} says {uuid.uuid4().hex[:6]}" for n in range(words // 4))
    return [{"role": "system", "content": rules}, {"role": "user", "content": "Which rule comes first?"}]


def answer(url: str, messages: list[dict], **fields) -> tuple[list[tuple[str, float]], dict]:
    """The answer's (token, logprob) pairs and its usage."""
    body = {"messages": messages, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "logprobs": True,
            **fields}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=None)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    return [(t["token"], t["logprob"]) for t in content], r.json()["usage"]


@pytest.mark.parametrize("fields", [{}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_a_cached_prefix_changes_no_token_and_no_logprob(cached_url, uncached_url, fields):
    messages = conversation()
    cold, usage = answer(uncached_url, messages, **fields)
    assert usage["prompt_tokens"] > 2 * CHUNK_TOKENS
    runs = [answer(cached_url, messages, **fields) for _ in range(5)]
    # The first run filled the cache; the others took whole chunks of the prompt from it.
    assert runs[0][1]["prompt_tokens_details"]["cached_tokens"] == 0
    expected = (usage["prompt_tokens"] - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert all(u["prompt_tokens_details"]["cached_tokens"] == expected for _, u in runs[1:])
    assert all(tokens == cold for tokens, _ in runs)


def test_the_next_turn_of_a_conversation_is_the_same_with_the_cache_as_without(cached_url, uncached_url):
    messages = conversation()
    first, _ = answer(cached_url, messages)
    messages += [{"role": "assistant", "content": "".join(t for t, _ in first)},
                 {"role": "user", "content": "And the last one? " + "Say it twice. " * 8}]
    warm, usage = answer(cached_url, messages)
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 2 * CHUNK_TOKENS
    assert warm == answer(uncached_url, messages)[0]


def repeat_test(url: str, messages: list[dict], others: list[list[dict]], **fields) -> None:
    """The greedy repeat test: ``messages`` five times alone (cold, then warm cache), then five times among
    ``others`` sent at the same moment: the same tokens and log-probabilities every time."""
    alone = [answer(url, messages, **fields) for _ in range(5)]
    assert alone[0][1]["prompt_tokens_details"]["cached_tokens"] == 0
    assert all(u["prompt_tokens_details"]["cached_tokens"] >= CHUNK_TOKENS for _, u in alone[1:])
    with ThreadPoolExecutor(len(others) + 1) as pool:
        for _ in range(5):
            futures = [pool.submit(answer, url, m, **fields) for m in [*others[:8], messages, *others[8:]]]
            together = [f.result() for f in futures]
            assert together[8][0] == alone[0][0]
    assert all(tokens == alone[0][0] for tokens, _ in alone)


def others(count: int = 15) -> list[list[dict]]:
    """Requests of many lengths (each row's cache is padded to the longest in a batch), some seeded."""
    return [[{"role": "user", "content": f"Say {uuid.uuid4().hex[:4]} " + "and more " * (5 * n)}] for n in range(count)]


@pytest.fixture(scope="module")
def deterministic_url(bf16_model):
    service = bf16_service(bf16_model, deterministic=True)
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


@pytest.mark.parametrize("fields", [{}, {"temperature": 0.9, "seed": 11}], ids=["greedy", "seeded"])
def test_deterministic_answers_do_not_depend_on_the_other_requests(deterministic_url, fields):
    repeat_test(deterministic_url, conversation(), others(), **fields)


@pytest.mark.timeout(1800)  # 85 requests on the real model, 80 of them with a forward pass per row
@pytest.mark.parametrize("mark", [pytest.param(None, marks=REAL_MODEL)])
def test_smollm2_answers_the_same_with_a_warm_prefix_cache_and_among_others(mark):
    from llmctl.core.embedded import ensure_embedded_model

    assert SMOLLM2_GGUF is not None
    messages = [{"role": "system", "content": "You are a helpful assistant who answers in French. " * 20},
                {"role": "user", "content": f"Name a city in France ({uuid.uuid4().hex[:4]})."}]
    service = bf16_service(ensure_embedded_model())
    with serve_in_thread(service) as url:  # by default: the same answer cold and warm
        runs = [answer(url, messages, max_tokens=24) for _ in range(5)]
    service.shutdown()
    assert all(u["prompt_tokens_details"]["cached_tokens"] >= CHUNK_TOKENS for _, u in runs[1:])
    assert all(tokens == runs[0][0] for tokens, _ in runs)
    service = bf16_service(ensure_embedded_model(), deterministic=True)
    with serve_in_thread(service) as url:  # --deterministic: and among 15 others
        # Every row of a step is a forward pass of its own here: 12 tokens keep 80 requests' work in bounds.
        repeat_test(url, messages, others(), max_tokens=12)
    service.shutdown()
