"""`--speculative-config` on vLLM's engine (its CPU build, for real): passed through as vLLM's own setting."""

from __future__ import annotations

import httpx
import pytest

from llmctl.core.speculation import parse
from llmctl.engine import EngineConfig
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.server.api import status
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import serve_in_thread
from tests.conftest import LoadOptions, make_service

pytestmark = pytest.mark.vllm
PROMPT = "Copy this line three times: alpha beta gamma delta alpha beta gamma delta"


def _config(spec: str | None) -> EngineConfig:
    return EngineConfig(max_num_seqs=4, max_waiting=4, kv_cache_tokens=8192,
                        speculative=parse(spec, strict=False) if spec else None)


def _greedy_texts(service: Service) -> tuple[list[str], dict]:
    with serve_in_thread(service) as url:
        texts = []
        for i in range(3):
            r = httpx.post(url + "/v1/chat/completions", timeout=300, json={
                "messages": [{"role": "user", "content": f"{PROMPT} ({i})"}], "temperature": 0, "max_tokens": 48,
                "ignore_eos": True})
            assert r.status_code == 200, r.text
            texts.append(r.json()["choices"][0]["message"]["content"])
        return texts, httpx.get(url + "/metrics").json()


def test_ngram_speculation_runs_on_vllm_with_the_same_greedy_text(vllm_model):
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
    service = make_service(vllm_model, engine=_config(spec),
                           engine_options=VllmOptions(enforce_eager=True))
    try:
        health_spec = status.health(service)[0]["speculative"]
        speculated, metrics = _greedy_texts(service)
    finally:
        service.shutdown()
    assert health_spec == {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3,
                           "prompt_lookup_min": 1}
    assert metrics["speculative"]["method"] == "ngram" and metrics["speculative"]["draft_tokens_total"] > 0
    plain_service = make_service(vllm_model, engine=_config(None),
                                 engine_options=VllmOptions(enforce_eager=True))
    try:
        plain, _ = _greedy_texts(plain_service)
    finally:
        plain_service.shutdown()
    assert speculated == plain


def test_a_method_this_build_cannot_run_is_a_clear_error(vllm_model):
    # EAGLE needs its draft head: vLLM refuses the settings before it loads anything.
    service = Service(ServiceSettings(load=LoadOptions(model_path=vllm_model, dtype="float32", device="cpu"),
                                      engine=_config('{"method": "eagle", "num_speculative_tokens": 2}'),
                                      engine_options=VllmOptions(enforce_eager=True)))
    service.load()
    assert service.status == "error"
    assert "speculative" in service.error.lower() and "\n" not in service.error and "Traceback" not in service.error
