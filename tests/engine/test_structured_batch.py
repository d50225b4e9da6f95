"""Constrained and free rows in one running batch: each row's text is what it is alone (greedy), also
when the KV budget makes rows wait, or be preempted and resume (each keeps its grammar state)."""

from __future__ import annotations

import concurrent.futures
import json
import re
import threading
import time

import httpx

from llmctl.engine import EngineConfig
from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service

LONG = {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                                 "maximum": 99}, "minItems": 80}},
        "required": ["values"], "additionalProperties": False}
SHORT = {"type": "object", "properties": {"ok": {"type": "boolean"}, "tag": {"enum": ["a", "b"]}},
         "required": ["ok", "tag"], "additionalProperties": False}


def _requests() -> list[dict]:
    out = []
    for i in range(8):
        body = {"messages": [{"role": "user", "content": f"Question {i}: {'why ' * (i % 4)}?"}], "temperature": 0,
                "max_tokens": 200, "timeout": 300}
        if i % 4 == 0:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "long", "schema": LONG}}
        elif i % 4 == 1:
            body["response_format"] = {"type": "json_schema", "json_schema": {"name": "short", "schema": SHORT}}
        elif i % 4 == 2:
            body["structured_outputs"] = {"regex": "[a-z ]{10,80}"}
        else:
            body["ignore_eos"] = True
        out.append(body)
    return out


def test_mixed_batch_matches_each_row_alone(tiny_model):
    # A KV budget too small for all eight rows at full length: admission charges each row its context plus
    # 128 tokens of headroom, so at least three rows, mixed constrained and free, run together; whether the
    # newest are also preempted depends on when rows finish, so the test does not count on it.
    service = make_service(tiny_model, engine=EngineConfig(max_num_seqs=8, max_waiting=16, kv_cache_tokens=640))
    model, engine = service.engine.model, service.engine
    real, gate = model.forward, threading.Event()

    def forward(*args, **kwargs):  # hold the first step until all eight requests are queued
        gate.wait(30)
        return real(*args, **kwargs)

    try:
        with serve_in_thread(service) as url:
            def ask(body: dict) -> tuple[str, str]:
                # Past the requests' own 300 s timeout (a 408 then says why): the eight rows together took
                # 13 s to 65 s on a shared 2-core machine; under heavier load 120 s was not enough.
                r = httpx.post(url + "/v1/chat/completions", json=body, timeout=330)
                assert r.status_code == 200, r.text
                choice = r.json()["choices"][0]
                return choice["message"]["content"], choice["finish_reason"]

            alone = [ask(body) for body in _requests()]
            assert engine.stats.preemptions == 0
            model.forward = forward
            gate.clear()
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(ask, body) for body in _requests()]
                deadline = time.monotonic() + 60
                while engine.waiting + engine.running < 8 and time.monotonic() < deadline:
                    time.sleep(0.02)
                gate.set()
                together = [f.result() for f in futures]
        assert together == alone
        assert engine.stats.max_batch_size >= 3
        for i, (text, finish) in enumerate(alone):
            if i % 4 == 1:
                assert finish == "stop" and set(json.loads(text)) == {"ok", "tag"}
            if i % 4 == 0:  # the long array cannot fit in 200 tokens
                assert finish == "length" and text.startswith('{"values": [')
    finally:
        service.shutdown()


def test_preempted_constrained_rows_resume_with_their_grammar_state(tiny_model, monkeypatch):
    """Deterministic, at the engine: a KV budget too small for four rows at their full length preempts the
    newest; each resumes from its prompt plus its tokens with its matcher where it was, and every row's
    answer (constrained or free) is the one it gets alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmctl.engine import BuiltinEngine, SamplingParams, Sequence
    from llmctl.engine import prefill as engine_module
    from llmctl.engine.structured import Constraint
    from tests.engine.test_engine_architectures import drain, run_in_steps

    monkeypatch.setattr(engine_module, "ADMIT_HEADROOM", 8)  # admit more rows than fit at full length
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    eos = frozenset({tokenizer.eos_token_id})
    constraints = [Constraint.json_schema(LONG), None, Constraint("regex", "[a-z ]{30,60}"),
                   Constraint.json_schema({"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "minItems": 20, "maxItems": 20})]
    prompts = [tokenizer.encode(f"Question {i}: {'why ' * (2 * i)}?") for i in range(4)]

    def sequences():
        return [Sequence(list(p), SamplingParams(max_tokens=40, temperature=0, ignore_eos=c is None, constraint=c))
                for p, c in zip(prompts, constraints, strict=False)]

    alone = []
    for seq in sequences():
        run_in_steps(BuiltinEngine(model, eos, EngineConfig(), tokenizer=tokenizer), {0: [seq]}, max_steps=300)
        alone.append(drain(seq))
    engine = BuiltinEngine(model, eos, EngineConfig(kv_cache_tokens=150, prefix_cache_tokens=0), tokenizer=tokenizer)
    together = sequences()
    run_in_steps(engine, {0: together}, max_steps=1000)
    assert engine.stats.preemptions >= 1
    assert [drain(seq) for seq in together] == alone
    texts = [tokenizer.decode(tokens) for tokens, _ in alone]
    assert alone[1][1].reason == "length" and len(alone[1][0]) == 40  # the free row
    assert texts[0].startswith('{"values": [') and alone[0][1].reason == "length"
    assert re.fullmatch("[a-z ]{30,60}", texts[2]) or (alone[2][1].reason == "length" and re.fullmatch("[a-z ]*",
                                                                                                       texts[2]))
    assert alone[3][1].reason == "length" or len(json.loads(texts[3])) == 20
