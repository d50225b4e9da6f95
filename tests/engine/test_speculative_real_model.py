"""Speculative decoding on the real SmolLM2 in bf16: greedy tokens and log-probabilities are those without it.

Copying records and fixing a function (answers that repeat the prompt, where drafts are accepted): before
one-row products ran as two rows (`llmctl.engine.invariant`), the function's fix parted from the plain text
after 71 characters (docs/benchmarks.md)."""

from __future__ import annotations

import httpx

from llmctl.core.loader import LoadOptions
from llmctl.core.speculation import parse
from llmctl.engine import EngineConfig
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import serve_in_thread
from tests.conftest import REAL_MODEL, SMOLLM2_GGUF

pytestmark = REAL_MODEL
RECORDS = "\n".join(f"id={i}; name=Customer {i}; city=Springfield; plan=gold; balance={100 + 7 * i}.00"
                    for i in range(5))
FUNCTION = ("def average(values):\n    total = 0\n    for value in values:\n        total += value\n"
            "    return total / len(values)  # fails on an empty list\n")
PROMPTS = [f"Copy these records exactly, one per line:\n{RECORDS}",
           f"Turn these records into a JSON list of objects with the keys id, name, city, plan, balance:\n{RECORDS}",
           f"Fix this function so that it returns 0.0 for an empty list. Reply with the whole corrected function."
           f"\n\n{FUNCTION}"]


def _service(spec: str | None) -> Service:
    service = Service(ServiceSettings(
        load=LoadOptions(model_path=SMOLLM2_GGUF, dtype="bfloat16", device="cpu"),
        engine=EngineConfig(max_num_seqs=4, speculative=parse(spec) if spec else None)))
    service.load()
    assert service.status == "ready", service.error
    return service


def _texts(service: Service) -> list[tuple[str, list[float]]]:
    """Each prompt's greedy answer and its tokens' log-probabilities."""
    with serve_in_thread(service) as url:
        out = []
        for prompt in PROMPTS:
            r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
                "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": 120,
                "logprobs": True})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append((choice["message"]["content"], [t["logprob"] for t in choice["logprobs"]["content"]]))
        return out


def test_greedy_text_on_smollm2_bf16_is_the_text_without_speculation():
    plain = _service(None)
    try:
        reference = _texts(plain)
    finally:
        plain.shutdown()
    spec = _service('{"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4, '
                    '"prompt_lookup_min": 2}')
    try:
        assert _texts(spec) == reference  # log-probabilities compared exactly
        stats = spec.engine.stats.speculative
    finally:
        spec.shutdown()
    assert "id=3; name=Customer 3" in reference[0][0]  # the model did copy: there was something to accept
    # How much is drafted depends on measured step times (the engine stands down where drafts do not pay),
    # so only that drafts were accepted is fixed, not the rate.
    assert stats.accepted_tokens >= 20, stats
