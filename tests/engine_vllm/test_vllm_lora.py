"""LoRA adapters on vLLM's engine (its CPU build, for real): served as models of their own, in mixed batches, loaded
and unloaded at run time, each adapter's tokens those of the adapter merged into the model (float32, greedy)."""

from __future__ import annotations

import httpx
import openai
import pytest

from llmctl.core.adapters import AdapterSpec
from llmctl.engine import EngineConfig, SamplingParams, Sequence
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service
from tests.lora.adapters import make_adapter, merged_greedy
from tests.lora.test_lora_engine import tokens

pytestmark = pytest.mark.vllm
TOKENS = 8


@pytest.fixture(scope="module")
def adapters(vllm_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("vllm-lora")
    return {"one": make_adapter(vllm_model, folder / "one", seed=1, rank=8, std=0.2),
            "two": make_adapter(vllm_model, folder / "two", seed=2, rank=8, std=0.2, targets=("q_proj", "up_proj")),
            "three": make_adapter(vllm_model, folder / "three", seed=3, rank=8, std=0.2)}


@pytest.fixture(scope="module")
def lora_service(vllm_model, adapters):
    service = make_service(vllm_model, engine=EngineConfig(max_num_seqs=4, max_waiting=8, kv_cache_tokens=8192),
                           engine_options=VllmOptions(enforce_eager=True), max_lora_rank=8, max_loras=3,
                           loras=(AdapterSpec("one", adapters["one"]), AdapterSpec("two", adapters["two"])))
    with serve_in_thread(service) as url:
        yield service, url
    service.shutdown()


PROMPTS = [[5, 17, 33, 80, 91, 7, 8, 9], [40, 41, 42, 43, 44, 45]]


def test_adapters_on_vllm_equal_their_merged_models(lora_service, vllm_model, adapters):
    """Both adapters and the base model, each on both prompts, submitted together: one mixed batch."""
    service, url = lora_service
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"tiny-llama", "one", "two"} and models["one"].parent == "tiny-llama"
    answer = client.chat.completions.create(model="two", messages=[{"role": "user", "content": "Hi"}],
                                            max_tokens=4, temperature=0)
    assert answer.model == "two" and answer.choices[0].message.content
    plan = [(model, prompt) for model in ("one", "two", None) for prompt in PROMPTS]
    seqs = [service.engine.submit(Sequence(list(prompt), SamplingParams(max_tokens=TOKENS, temperature=0,
                                                                         ignore_eos=True), adapter=model))
            for model, prompt in plan]
    for (model, prompt), seq in zip(plan, seqs, strict=True):
        assert tokens(seq) == merged_greedy(vllm_model, adapters.get(model), prompt, TOKENS), (model, prompt)
    assert service.engine.stats.max_batch_size > 1 or service.engine.stats.steps > 0


def test_load_and_unload_at_run_time_on_vllm(lora_service, vllm_model, adapters):
    _, url = lora_service
    with httpx.Client(base_url=url, timeout=120) as client:
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "three", "lora_path": str(adapters["three"])})
        assert r.status_code == 200, r.text
        want = merged_greedy(vllm_model, adapters["three"], PROMPTS[0], TOKENS)
        text = client.post("/detokenize", json={"tokens": want}).json()["prompt"]
        body = {"model": "three", "prompt": PROMPTS[0], "max_tokens": TOKENS, "temperature": 0, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).json()["choices"][0]["text"] == text
        r = client.post("/v1/load_lora_adapter", json={"lora_name": "four", "lora_path": str(adapters["three"])})
        assert r.status_code == 400 and "--max-loras" in r.json()["error"]["message"]
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "three"}).status_code == 200
        assert client.post("/v1/completions", json=body).status_code == 404
        assert client.get("/health").json()["lora_adapters"]["loaded"] == ["one", "two"]
