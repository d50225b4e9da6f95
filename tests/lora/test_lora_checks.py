"""LoRA adapters checked before anything loads: serve's preflight (one line naming the adapter, exit 1, torch not
imported yet) and `llmctl doctor --lora` (a check per adapter)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmctl.server.testing import build_tiny_model
from tests.doctor.test_doctor import by_id, doctor_json
from tests.lora.adapters import make_adapter

PREFLIGHT = ("import sys\nfrom llmctl.cli.app import main\ntry:\n    main()\nexcept SystemExit as exc:\n"
             "    print('exit', exc.code, 'torch' in sys.modules)\n")


@pytest.fixture(scope="module")
def small_adapter(tmp_path_factory):
    """An adapter for a model of another size than the tiny test model."""
    folder = tmp_path_factory.mktemp("other")
    return make_adapter(build_tiny_model(folder / "small", hidden=32), folder / "small-adapter")


@pytest.fixture(scope="module")
def dora_adapter(tiny_model, tmp_path_factory):
    return make_adapter(tiny_model, tmp_path_factory.mktemp("dora") / "dora", use_dora=True)


def test_serve_preflight_names_the_bad_adapter(tiny_model, tmp_path, adapter_one, small_adapter, dora_adapter):
    cases = [
        (["--lora", f"gone={tmp_path / 'missing'}"], "LoRA adapter 'gone'", "the folder does not exist"),
        (["--lora", f"small={small_adapter}"], "LoRA adapter 'small'", "trained for another model size"),
        (["--lora", f"one={adapter_one}", "--max-lora-rank", "2"], "LoRA adapter 'one'", "--max-lora-rank 2"),
        (["--lora", f"one={adapter_one}", "--lora-modules", f"one={adapter_one}"], "'one' is given twice", ""),
        (["--lora", f"d={dora_adapter}"], "LoRA adapter 'd'", "DoRA (use_dora) is not supported"),
        (["--lora", f"a={adapter_one}", "--lora", f"b={adapter_one}", "--max-loras", "1"], "--max-loras is 1", ""),
    ]
    for args, who, what in cases:
        result = subprocess.run([sys.executable, "-c", PREFLIGHT, "serve", "--port", "0", "--model-path",
                                 str(tiny_model), *args], capture_output=True, text=True, timeout=120)
        assert result.stdout.strip().splitlines()[-1] == "exit 1 False", result.stdout + result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and who in lines[0] and what in lines[0], result.stderr


def test_doctor_checks_each_adapter(tiny_model, adapter_one, small_adapter):
    code, report = doctor_json("--model-path", str(tiny_model), "--lora", f"one={adapter_one}",
                               "--lora", str(small_adapter))
    checks = by_id(report)
    one, small = checks["lora_one"], checks["lora_" + str(small_adapter).lower()]
    assert one["status"] == "ok" and one["details"]["rank"] == 4, one
    assert "checked against the model's weights" in one["finding"]
    assert small["status"] == "failure" and "trained for another model size" in small["finding"], small
    assert code == 1
    assert json.dumps(report)  # the report stays JSON
