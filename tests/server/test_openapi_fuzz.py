"""schemathesis over every operation of the OpenAPI document (`--checks all`), against a real server.

A short run: a few cases per operation. The longer one is `python scripts/fuzz_openapi.py --examples 100`
(docs/reliability.md). Traffic goes only to a server on 127.0.0.1.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from llmctl.server.testing import serve_in_thread
from tests.conftest import make_service

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("schemathesis") is None,
                                reason="schemathesis is not installed (pip install -e '.[dev]')")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def capped_url(tiny_model):
    """A server as scripts/fuzz_openapi.py starts it: --max-tokens-cap bounds each request's work."""
    fuzz = load_script("fuzz_openapi")
    service = make_service(tiny_model, max_tokens_cap=fuzz.MAX_TOKENS)
    with serve_in_thread(service) as url:
        yield url
    service.shutdown()


def test_schemathesis_finds_no_failure(capped_url, tmp_path):
    """No 5xx, no schema-valid request rejected, every answer as documented, on every operation."""
    fuzz = load_script("fuzz_openapi")
    command = fuzz.schemathesis_command(capped_url, examples=3, seed=1, workers=2, phases="fuzzing",
                                        api_key=None)
    command.append("--no-shrink")  # a finding is shown as found: shrinking it takes minutes
    done = subprocess.run(command, env=fuzz.environment(), cwd=ROOT, capture_output=True, text=True, check=False)
    output = done.stdout + done.stderr
    paths = httpx.get(f"{capped_url}/openapi.json").json()["paths"]
    operations = sum(len(methods) for methods in paths.values())
    assert f"{operations} selected / {operations} total" in output, output[-3000:]
    # With 3 cases an operation is now and then skipped (schemathesis says no more); the rest must be tested.
    tested = re.search(r"Tested: (\d+)", output)
    assert tested and int(tested.group(1)) >= operations - 1, output[-3000:]
    for finding in ("Server error", "Schema-valid request rejected", "Network Error", "Response violates schema"):
        assert finding not in output, output[-8000:]


def test_right_refusals_are_the_documented_limits_only():
    hooks = load_script("fuzz_openapi_hooks")
    limit = {"error": {"message": "This model's maximum context length is 256 tokens, but 300 were requested."}}
    assert hooks.refusal_reason(400, json.dumps(limit))
    anthropic = {"type": "error", "error": {"type": "invalid_request_error",
                                            "message": "Unsupported regex in 'structured_outputs.regex': x"}}
    assert hooks.refusal_reason(400, json.dumps(anthropic))
    shape = {"error": {"message": "'structured_outputs' must set exactly one of: json, regex, choice, grammar."}}
    assert hooks.refusal_reason(400, json.dumps(shape)) is None
    assert hooks.refusal_reason(500, json.dumps(limit)) is None
    assert hooks.refusal_reason(400, "not json") is None


def test_script_runs_from_the_command_line():
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "fuzz_openapi.py"), "--help"], capture_output=True,
                          text=True, check=False, cwd=ROOT)
    assert done.returncode == 0 and "--examples" in done.stdout


def test_served_document_states_the_max_tokens_cap(capped_url):
    fuzz = load_script("fuzz_openapi")
    schemas = httpx.get(f"{capped_url}/openapi.json").json()["components"]["schemas"]
    for model, field in (("ChatCompletionRequest", "max_tokens"), ("CompletionRequest", "max_tokens"),
                         ("ResponsesRequest", "max_output_tokens"), ("MessagesRequest", "max_tokens")):
        prop = schemas[model]["properties"][field]
        assert {"type": "integer", "minimum": 1, "maximum": fuzz.MAX_TOKENS} in prop.get("anyOf", [prop]) or \
            prop.get("maximum") == fuzz.MAX_TOKENS, (model, prop)


def test_legacy_completions_default_obeys_the_cap(capped_url):
    """OpenAI's default of 16 tokens for /v1/completions, lowered to --max-tokens-cap (it was a 400)."""
    fuzz = load_script("fuzz_openapi")
    r = httpx.post(f"{capped_url}/v1/completions", json={"prompt": "Hello", "ignore_eos": True}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == fuzz.MAX_TOKENS
