"""Prefix caching as a client sees it: usage.prompt_tokens_details.cached_tokens in plain and streamed
answers, the same text with the cache as without it, and the counters in /metrics (JSON and Prometheus).
Real servers on 127.0.0.1 with the tiny model; one of them has the cache off."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

from llmctl.engine import EngineConfig
from llmctl.engine.reproducible import CHUNK_TOKENS
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service


def long_system_prompt() -> list[dict]:
    """Messages whose first tokens no other test sends, so the first request finds nothing cached."""
    words = uuid.uuid4().hex + " " + " ".join(f"rule {n}" for n in range(20))
    return [{"role": "system", "content": words}, {"role": "user", "content": "Which rule comes first?"}]


def ask(url: str, messages: list[dict], stream: bool = False) -> tuple[str, dict]:
    body = {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": stream}
    if not stream:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"], r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    text, usage = "", None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                text += "".join(c["delta"].get("content") or "" for c in chunk["choices"])
                usage = chunk.get("usage") or usage
    return text, usage


@pytest.fixture(scope="module")
def cache_off_url(tiny_model):
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, kv_cache_tokens=16384,
                                                           prefix_cache_tokens=0))
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


def test_a_repeated_prompt_reports_its_cached_tokens_and_gives_the_same_text(base_url, cache_off_url):
    messages = long_system_prompt()
    text, first = ask(base_url, messages)
    assert first["prompt_tokens_details"] == {"cached_tokens": 0}
    again, second = ask(base_url, messages)
    # Every whole reproducible chunk of the prompt but the last token, which is always computed.
    expected = (second["prompt_tokens"] - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert expected > 0 and second["prompt_tokens_details"] == {"cached_tokens": expected}
    streamed, usage = ask(base_url, messages, stream=True)
    assert usage["prompt_tokens_details"] == {"cached_tokens": expected}
    off_text, off_usage = ask(cache_off_url, messages)
    assert again == streamed == text == off_text
    assert ask(cache_off_url, messages)[1]["prompt_tokens_details"] == {"cached_tokens": 0}


def test_metrics_report_prefix_cache_queries_hits_and_size(base_url, cache_off_url):
    before = httpx.get(base_url + "/metrics").json()["prefix_cache"]
    messages = long_system_prompt()
    _, first = ask(base_url, messages)
    _, second = ask(base_url, messages)
    after = httpx.get(base_url + "/metrics").json()
    cache = after["prefix_cache"]
    assert cache["queries_tokens_total"] - before["queries_tokens_total"] >= first["prompt_tokens"] * 2
    assert cache["hits_tokens_total"] - before["hits_tokens_total"] >= second["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cache["size_tokens"] <= cache["capacity_tokens"] == EngineConfig().prefix_cache_tokens
    assert 0 < cache["hit_rate"] < 1 and 0 <= after["kv_cache_usage"] <= 1
    text = httpx.get(base_url + "/metrics", params={"format": "prometheus"}).text
    values = {name: float(value) for name, value in
              re.findall(r"^(llmctl_prefix_cache_\w+|llmctl_kv_cache_usage_ratio) (\S+)$", text, re.M)}
    assert values["llmctl_prefix_cache_queries_total"] >= cache["queries_tokens_total"]
    assert values["llmctl_prefix_cache_hits_total"] >= cache["hits_tokens_total"] > 0
    assert values["llmctl_prefix_cache_tokens"] > 0 and "llmctl_kv_cache_usage_ratio" in values
    off = httpx.get(cache_off_url + "/metrics").json()["prefix_cache"]
    assert off == {"capacity_tokens": 0, "size_tokens": 0, "queries_tokens_total": 0, "hits_tokens_total": 0,
                   "hit_rate": None}


def test_n_choices_from_a_cached_prefix_are_the_choices_without_the_cache(base_url, cache_off_url):
    """n > 1: the prompt (partly from the cache) is prefilled once and forked; each seeded choice is what
    the server without the cache gives, and the cached tokens are counted once, like the prompt."""
    messages = long_system_prompt()
    body = {"messages": messages, "max_tokens": 8, "temperature": 1.0, "seed": 7, "n": 3, "ignore_eos": True}

    def choices(url: str) -> tuple[list[str], dict]:
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        return [c["message"]["content"] for c in r.json()["choices"]], r.json()["usage"]

    first, usage = choices(base_url)
    assert usage["prompt_tokens_details"] == {"cached_tokens": 0} and len(set(first)) > 1
    again, usage = choices(base_url)
    expected = (usage["prompt_tokens"] - 1) // CHUNK_TOKENS * CHUNK_TOKENS
    assert expected > 0 and usage["prompt_tokens_details"] == {"cached_tokens": expected}
    assert again == first == choices(cache_off_url)[0]
