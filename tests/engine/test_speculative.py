"""Speculative decoding: the same output as without it, through the real server and real forward passes.

The tiny random model seldom repeats its prompt, so besides n-gram lookup these tests use the draft-model
method with drafts that are mostly right (a slightly perturbed copy of the model) or always right (the
model itself): rows then accept different numbers of drafts in one step, which is what the KV bookkeeping
must get right. Greedy text, seeded sampling, logprobs, stop strings, structured outputs, penalties and n
are compared with a server without speculation.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import re
import shutil
import time
import unittest.mock
from pathlib import Path

import httpx
import pytest
import torch

from llmctl.core.loader import LoadOptions, load_model
from llmctl.core.speculation import parse
from llmctl.engine import BuiltinEngine, EngineConfig, Finish, SamplingParams, Sequence
from llmctl.engine.speculative import CostModel
from llmctl.server.testing import build_tiny_model
from tests.conftest import make_service, serving_all, slow_serving, wait_for

NGRAM = '{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3, "prompt_lookup_min": 1}'
PROMPTS = [f"Question number {i}: {'why ' * (i % 5)}? Repeat: one two three one two three" for i in range(8)]
SHORT = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
         "required": ["ok", "tag"], "additionalProperties": False}


def engine_config(spec: str | None, **bounds) -> EngineConfig:
    return EngineConfig(**{"max_num_seqs": 16, "max_waiting": 64, "kv_cache_tokens": 16384, **bounds},
                        speculative=parse(spec) if spec else None)


@pytest.fixture(scope="module")
def noisy_draft(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its weights nudged: its greedy drafts are right most of the time, not always."""
    folder = tmp_path_factory.mktemp("draft") / "noisy"
    model = load_model(LoadOptions(model_path=tiny_model, dtype="float32", device="cpu")).model
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in model.parameters():
            weight.add_(torch.randn_like(weight) * 0.01)
    model.save_pretrained(folder)
    for name in tiny_model.iterdir():
        if "token" in name.name or name.name.endswith(".jinja"):
            shutil.copy(name, folder / name.name)
    return folder


@pytest.fixture(scope="module")
def servers(tiny_model, noisy_draft):
    """Servers without speculation, with n-gram lookup, with the noisy draft model and with the model as its own
    draft; yields {name: (service, url)}."""
    specs = {"plain": None, "ngram": NGRAM,
             "noisy": f'{{"model": "{noisy_draft}", "num_speculative_tokens": 4}}',
             "same": f'{{"model": "{tiny_model}", "num_speculative_tokens": 3}}'}
    with serving_all({name: make_service(tiny_model, engine=engine_config(spec)) for name, spec in specs.items()}) \
            as served:
        yield served


def chat(url: str, prompt: str, **fields) -> dict:
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": 40, "temperature": 0,
            "ignore_eos": True, **fields}
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def texts(url: str, prompts: list[str], together: bool, **fields) -> list[str]:
    def ask(prompt: str) -> str:
        return chat(url, prompt, **fields)["choices"][0]["message"]["content"]

    if not together:
        return [ask(p) for p in prompts]
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(ask, prompts))


@contextlib.contextmanager
def always_speculating(speculator):
    """Every draft proposed is verified, whatever the steps' timings say: a draft model as large as the tiny
    target (these tests' drafts) never pays, and the engine would rightly stand down. The cost model of every
    thread count says drafts cost nothing (the speculator keeps one for each count it has seen run)."""
    speculator.pays = lambda rows: True
    try:
        with unittest.mock.patch.object(CostModel, "coefficients", lambda self: (1.0, 0.0)):
            yield
    finally:
        del speculator.pays  # the method again


@pytest.mark.parametrize("method", ["ngram", "noisy", "same"])
def test_greedy_text_is_the_text_without_speculation(servers, method):
    reference = texts(servers["plain"][1], PROMPTS, together=False)
    service, url = servers[method]
    before = service.engine.stats.speculative.draft_tokens
    with always_speculating(service.engine.speculator):
        assert texts(url, PROMPTS, together=False) == reference
        assert texts(url, PROMPTS, together=True) == reference
    stats = service.engine.stats.speculative
    assert stats.draft_tokens > before, "no draft was verified"
    if method == "same":  # its own greedy continuation: every draft verified is accepted
        assert stats.accepted_tokens == stats.draft_tokens and stats.tokens_per_step > 2
    if method == "noisy":
        assert 0 < stats.accepted_tokens < stats.draft_tokens


def test_rows_that_do_not_speculate_share_the_batch(servers):
    """Half the rows get no drafts (the proposer is wrapped to withhold them) while the others speculate."""
    service, url = servers["noisy"]
    speculator = service.engine.speculator
    real = speculator.proposer
    mixed = []

    def half(seqs, limits):
        drafts = [d if seq.id % 2 else [] for seq, d in zip(seqs, real(seqs, limits), strict=True)]
        mixed.append(any(drafts) and not all(drafts))
        return drafts

    speculator.proposer = half
    try:
        with always_speculating(speculator):
            assert texts(url, PROMPTS, together=True) == texts(servers["plain"][1], PROMPTS, together=False)
    finally:
        speculator.proposer = real
    assert any(mixed), "no step had rows with and without drafts"


def test_seeded_sampling_draws_the_same_tokens(servers):
    """Each emitted token is drawn from the target distribution with the row's own generator, one draw per token,
    as without speculation: a seeded request gives the same text."""
    fields = {"temperature": 0.9, "top_p": 0.95, "seed": 7, "max_tokens": 60}
    for prompt in PROMPTS[:3]:
        plain = chat(servers["plain"][1], prompt, **fields)["choices"][0]["message"]["content"]
        assert chat(servers["same"][1], prompt, **fields)["choices"][0]["message"]["content"] == plain


def test_logprobs_penalties_stops_and_n_are_kept(servers):
    plain, spec = servers["plain"][1], servers["same"][1]
    fields = {"logprobs": True, "top_logprobs": 3}
    a, b = chat(plain, PROMPTS[1], **fields), chat(spec, PROMPTS[1], **fields)
    assert a["choices"][0]["message"] == b["choices"][0]["message"]
    for x, y in zip(a["choices"][0]["logprobs"]["content"], b["choices"][0]["logprobs"]["content"], strict=True):
        assert x["token"] == y["token"] and math.isclose(x["logprob"], y["logprob"], abs_tol=1e-4)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
    penalized = {"frequency_penalty": 1.5, "presence_penalty": 0.5, "max_tokens": 60}
    assert texts(spec, PROMPTS[:2], together=True, **penalized) == texts(plain, PROMPTS[:2], False, **penalized)
    text = a["choices"][0]["message"]["content"]
    stop = text[len(text) // 2:len(text) // 2 + 3]
    cut = [chat(url, PROMPTS[1], stop=[stop]) for url in (plain, spec)]
    assert cut[0]["choices"] == cut[1]["choices"] and cut[1]["choices"][0]["finish_reason"] == "stop"
    choices = [chat(url, PROMPTS[2], n=3, temperature=0.8, seed=11)["choices"] for url in (plain, spec)]
    assert [c["message"]["content"] for c in choices[0]] == [c["message"]["content"] for c in choices[1]]


@pytest.mark.parametrize("method", ["ngram", "same"])
def test_structured_output_is_kept(servers, method):
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "short", "schema": SHORT}},
              "ignore_eos": False, "max_tokens": 60}
    reference = texts(servers["plain"][1], PROMPTS[:4], together=False, **fields)
    assert texts(servers[method][1], PROMPTS[:4], together=True, **fields) == reference


def test_grammar_cuts_drafts_it_would_reject(servers, tiny_model):
    """Draft tokens the grammar forbids are not verified: a proposer offering only forbidden tokens gets none
    verified for a constrained row, and the row's output is unchanged."""
    service, url = servers["noisy"]
    speculator = service.engine.speculator
    real, forbidden = speculator.proposer, service.engine.eos  # end of sequence is never allowed mid-object
    speculator.proposer = lambda seqs, limits: [[min(forbidden)] * k for k in limits]
    before = speculator.stats.draft_tokens
    fields = {"response_format": {"type": "json_schema", "json_schema": {"name": "short", "schema": SHORT}},
              "ignore_eos": False, "max_tokens": 60}
    try:
        constrained = chat(url, PROMPTS[0], **fields)["choices"][0]["message"]["content"]
    finally:
        speculator.proposer = real
    assert constrained == chat(servers["plain"][1], PROMPTS[0], **fields)["choices"][0]["message"]["content"]
    assert speculator.stats.draft_tokens == before


def test_metrics_and_health_report_speculation(servers):
    service, url = servers["noisy"]
    chat(url, PROMPTS[0])
    health = httpx.get(url + "/health").json()
    assert health["speculative"]["num_speculative_tokens"] == 4
    assert "speculative" not in httpx.get(servers["plain"][1] + "/health").json()
    spec = httpx.get(url + "/metrics").json()["speculative"]
    assert spec["method"] == "draft_model" and spec["draft_tokens_total"] > 0
    assert 0 < spec["acceptance_rate"] <= 1 and spec["tokens_per_step"] > 1
    assert spec["accepted_tokens_total"] == service.engine.stats.speculative.accepted_tokens
    text = httpx.get(url + "/metrics", params={"format": "prometheus"}).text
    values = {name: float(value) for name, value in re.findall(r"^(llmctl_spec_decode_\w+) (\S+)$", text, re.M)}
    assert values["llmctl_spec_decode_draft_tokens_total"] >= spec["draft_tokens_total"]
    assert values["llmctl_spec_decode_accepted_tokens_total"] >= spec["accepted_tokens_total"]
    assert 0 < values["llmctl_spec_decode_acceptance_ratio"] <= 1
    assert values["llmctl_spec_decode_tokens_per_step"] > 1
    assert httpx.get(servers["plain"][1] + "/metrics").json()["speculative"] is None


def test_timeout_stops_a_speculating_request(tiny_model):
    # 200 tokens at up to 4 a step and 50 ms a forward pass take well over the request's half second.
    with slow_serving(tiny_model, 0.05, engine_config(f'{{"model": "{tiny_model}", "num_speculative_tokens": 3}}',
                                                      max_num_seqs=4)) as (service, url):
        r = httpx.post(url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 200, "ignore_eos": True,
            "timeout": 0.5})
        assert r.status_code == 408 and r.json()["error"]["type"] == "timeout_error"
        assert wait_for(lambda: service.engine.running == 0, 60)
        assert service.engine.stats.speculative.draft_tokens > 0


def test_draft_model_with_another_tokenizer_is_refused(tiny_model, tmp_path):
    other = build_tiny_model(tmp_path / "other", vocab_size=300)
    from llmctl.server.service import Service, ServiceSettings

    service = Service(ServiceSettings(
        load=LoadOptions(model_path=tiny_model, dtype="float32", device="cpu"),
        engine=engine_config(f'{{"model": "{other}", "num_speculative_tokens": 3}}')))
    service.load()
    assert service.status == "error" and "different tokenizer" in service.error, service.error


def test_sampling_follows_the_target_distribution(tiny_model):
    """The rejection rule: with a draft the model gives probability p, the token at that place is still drawn
    from the model's distribution (top_k 4, temperature 1). A chi-square test over 1,200 seeded draws, on the
    second token given the most frequent first one."""
    loaded = load_model(LoadOptions(model_path=tiny_model, dtype="float32", device="cpu"))
    model, prompt = loaded.model, list(range(40, 60))
    with torch.inference_mode():
        first = model(torch.tensor([prompt])).logits[0, -1].topk(4).indices.tolist()
        nexts = {t: model(torch.tensor([prompt + [t]])).logits[0, -1].float() for t in first}
    # The draft for each first token is its second most likely follower: accepted about as often as it is likely.
    drafts = {t: int(logits.topk(2).indices[1]) for t, logits in nexts.items()}
    engine = BuiltinEngine(model, loaded.eos_token_ids, engine_config(NGRAM, max_num_seqs=64, max_waiting=2048),
                           tokenizer=loaded.tokenizer)
    speculator = engine.speculator
    speculator.proposer = lambda seqs, limits: [[drafts[s.context_ids[len(prompt)]]][:k] for s, k in zip(
        seqs, limits, strict=True)]
    speculator.cost.coefficients = lambda: (1.0, 0.0)  # drafts cost nothing: verify every one of them
    speculator.pays = lambda rows: True
    engine.start()
    try:
        seqs = [engine.submit(Sequence(prompt, SamplingParams(max_tokens=3, temperature=1.0, top_k=4, seed=i)))
                for i in range(1200)]
        pairs = []
        for seq in seqs:
            tokens = []
            while not isinstance(event := seq.events.get(timeout=120), Finish):
                tokens.append(event)
            pairs.append(tuple(tokens))
    finally:
        engine.stop()
    assert speculator.stats.draft_tokens >= 1000
    top = max(first, key=lambda t: sum(p[0] == t for p in pairs))
    seconds = [p[1] for p in pairs if p[0] == top]
    logits = nexts[top]
    allowed = logits.topk(4).indices.tolist()
    expected = torch.softmax(logits[allowed], dim=-1).tolist()
    observed = [seconds.count(t) for t in allowed]
    assert sum(observed) == len(seconds)
    chi2 = sum((o - e * len(seconds)) ** 2 / (e * len(seconds)) for o, e in zip(observed, expected, strict=True))
    assert chi2 < 16.27, (observed, expected)  # 3 degrees of freedom, p = 0.001
    assert drafts[top] in allowed


def test_ngram_draft_takes_what_followed_the_latest_match():
    from llmctl.engine.speculative import ngram_draft

    context = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 1, 2, 3]
    assert ngram_draft(context, 3, 1, 3) == [7, 8, 5]  # the later of two earlier "1 2 3"
    assert ngram_draft(context, 10, 1, 3) == [7, 8, 5, 1, 2, 3]  # up to the end of the context
    assert ngram_draft([4, 5, 6, 4], 2, 1, 3) == [5, 6]  # falls back to shorter n-grams
    assert ngram_draft([4, 5, 6, 4], 2, 2, 3) == []  # but not below prompt_lookup_min
    assert ngram_draft([1, 2, 3], 4, 1, 2) == []


def test_ngram_draft_takes_what_usually_followed_a_recurring_match():
    from llmctl.engine.speculative import ngram_draft

    # "1 2" was followed by 5 twice and by 6 once, the latest time: the draft continues the latest "1 2 5".
    context = [1, 2, 5, 8, 1, 2, 5, 9, 1, 2, 6, 7, 1, 2]
    assert ngram_draft(context, 3, 1, 2) == [5, 9, 1]  # the latest "1 2" followed by 5
    assert ngram_draft(context, 3, 1, 2, majority=False) == [6, 7, 1]
    assert ngram_draft([1, 4, 1, 5, 1], 2, 1, 1) == [5, 1]  # a tie: the latest


def test_speculation_stands_down_as_the_batch_grows():
    """With steps timed at 30 ms plus 2 ms per token fed, drafts accepted 60% of the time pay for one row and not
    for 32 (where a draft token costs nearly what it gives)."""
    from llmctl.engine.speculative import Speculator

    speculator = Speculator(parse(NGRAM), frozenset(), 1 << 20)
    for tokens in (1, 2, 4, 8, 16, 24, 32, 5, 3):
        speculator.cost.observe(tokens, 0.030 + 0.002 * tokens)
    a, b = speculator.cost.coefficients()
    assert math.isclose(a, 0.030, rel_tol=1e-6) and math.isclose(b, 0.002, rel_tol=1e-6)
    speculator._global = (60.0, 100.0)  # acceptance seen so far: 60%

    def kept(rows: int) -> float:
        """Draft tokens verified per row."""
        seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=50)) for _ in range(rows)]
        return sum(map(len, speculator._worth(seqs, [[5, 6, 7, 8]] * rows))) / rows

    assert kept(1) == 4 and kept(32) == 0 and kept(1) > kept(4) > kept(16) > kept(32)


def test_speculation_runs_only_while_measured_faster():
    """At each batch size a plain step and a step with drafts are timed first; drafts then run only while their
    steps cost less per token, the slower mode being retried once in a while."""
    from llmctl.engine.speculative import RETRY_EVERY, Speculator

    speculator = Speculator(parse(NGRAM), frozenset(), 1 << 20)
    seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=50)) for _ in range(4)]
    assert not speculator.pays(4)  # nothing timed at 4 rows: a plain step first
    speculator.record(seqs, [[]] * 4, [0] * 4, 4, 0.040)  # 10 ms a token
    assert speculator.pays(4)  # then one with drafts
    speculator.record(seqs, [[7, 8]] * 4, [0] * 4, 12, 0.080)  # 20 ms a token: twice as slow
    assert sum(speculator.pays(4) for _ in range(4 * RETRY_EVERY)) == 2  # only the retries, half as often
    speculator.record(seqs, [[7, 8]] * 4, [2] * 4, 12, 0.048)  # 4 ms a token, again and again: faster now
    for _ in range(10):
        speculator.record(seqs, [[7, 8]] * 4, [2] * 4, 12, 0.048)
    assert sum(speculator.pays(4) for _ in range(2 * RETRY_EVERY)) == 2 * RETRY_EVERY - 2
    assert speculator.pays(5) is True and speculator.pays(1) is False  # 4-7 rows alike; 1 row on its own



def test_steps_are_timed_in_cpu_seconds_on_a_cpu():
    """Time the engine thread waits for the CPU (here: sleeps) is not a step's cost on a CPU, nor is other threads'
    work: on a shared machine other programs' work would otherwise be charged to whichever steps ran beside it."""
    import threading

    from llmctl.engine.speculative import step_clock

    until = time.monotonic() + 0.2

    def spin() -> None:  # another thread's work (the process's, as other compute threads' would be)
        while time.monotonic() < until:
            pass

    clock = step_clock(torch.device("cpu"))
    started = clock()
    spinning = threading.Thread(target=spin)
    spinning.start()
    time.sleep(0.2)  # this thread waits, as it does while other programs hold the cores
    spinning.join()
    assert clock() - started < 0.1
    assert step_clock(torch.device("cuda")) is time.perf_counter  # an accelerator's work is not CPU time


def test_a_speculation_that_stands_down_proposes_nothing():
    """Whether drafts pay is decided before they are proposed: a draft model's proposals cost forward passes."""
    from llmctl.engine.batch import Batch
    from llmctl.engine.speculative import Speculator

    calls = []
    speculator = Speculator(parse(NGRAM), frozenset(), 1 << 20,
                            proposer=lambda seqs, limits: calls.append(limits) or [[5] for _ in seqs])
    seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=50))]
    batch = Batch(seqs, None, torch.ones((1, 3)), torch.tensor([3]), torch.tensor([4]))  # type: ignore[arg-type]
    assert speculator.plan(batch) is None and calls == []  # no plain step timed yet: this one is plain
    speculator.record(seqs, [[]], [0], 1, 0.040)
    assert speculator.plan(batch) == [[5]] and len(calls) == 1
    speculator.record(seqs, [[5]], [0], 2, 0.090)  # slower per token than the plain step
    assert speculator.plan(batch) is None and len(calls) == 1 and speculator.stats.stood_down_steps == 2


def test_a_row_whose_drafts_failed_is_tried_again():
    """A row whose drafts were rejected stops getting them (they would not pay), and its acceptance is forgotten
    while it verifies nothing, so drafts come back: its text may have reached a part it copies."""
    from llmctl.engine.speculative import Speculator

    speculator = Speculator(parse(NGRAM), frozenset(), 1 << 20)
    for tokens in (1, 5):
        speculator.cost.observe(tokens, 0.040 + 0.008 * tokens)  # a draft token costs a fifth of a step
    row = [Sequence([1, 2, 3], SamplingParams(max_tokens=50))]
    for _ in range(40):
        speculator.record(row, [[7, 8, 9, 10]], [0], 5, 0.080)  # rejected, every time
        speculator.cost.observe(1, 0.048)  # another row's plain step
    assert speculator._worth(row, [[7, 8, 9, 10]]) == [[]]
    steps = 0
    while not speculator._worth(row, [[7, 8, 9, 10]])[0] and steps < 1000:
        speculator.record(row, [[]], [0], 1, 0.048)
        steps += 1
    assert 0 < steps < 200


def test_timings_are_kept_for_each_thread_count():
    """A thread tuner's trial steps run at another compute-thread count, where the engine thread's CPU seconds
    differ: they change neither what steps cost at the count in use nor whether drafts pay there."""
    from llmctl.engine.speculative import RETRY_EVERY, Speculator

    speculator = Speculator(parse(NGRAM), frozenset(), 1 << 20)
    speculator.threads = 2
    seqs = [Sequence([1, 2, 3], SamplingParams(max_tokens=50)) for _ in range(4)]
    speculator.record(seqs, [[]] * 4, [0] * 4, 4, 0.040)  # at 2 threads: 10 ms a token
    speculator.record(seqs, [[7, 8]] * 4, [2] * 4, 12, 0.048)  # with drafts: 4 ms a token
    for tokens in (4, 12, 8):
        speculator.cost.observe(tokens, 0.030 + 0.002 * tokens)
    before = speculator.cost.coefficients()
    for _ in range(20):  # trial steps at 1 thread: plain ones cheap, drafted ones dear
        speculator.record(seqs, [[]] * 4, [0] * 4, 4, 0.010, threads=1)
        speculator.record(seqs, [[7, 8]] * 4, [0] * 4, 12, 0.200, threads=1)
    assert speculator.cost.coefficients() == before
    assert sum(speculator.pays(4) for _ in range(RETRY_EVERY)) == RETRY_EVERY - 1  # drafts pay, retrying plain
    speculator.threads = 1  # the tuner switched: what was measured at 1 thread decides
    assert not any(speculator.pays(4) for _ in range(RETRY_EVERY))
    assert speculator.cost.coefficients() != before
