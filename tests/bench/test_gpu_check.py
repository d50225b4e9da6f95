"""scripts/gpu_check.py: its CPU dry run end to end, and the pieces a GPU run depends on.

The dry run (--device cpu --small) is the GPU run on a tiny model: the same model building,
`llmctl doctor`, `llmctl serve` in its own process, `llmctl bench`, the in-process load and raw
generate. Only what needs CUDA (8-bit/4-bit on a GPU, torch.cuda memory) is not exercised here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl.core import hardware
from llmctl.core.loader import LoadOptions, load_model
from llmctl.server.testing import build_tiny_model

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


gpu_check = load_script()


def llama_parameters(c: dict) -> int:
    """Parameters of an untied Llama model with config ``c``, counted from its shape."""
    h, head = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    attention = 2 * h * h + 2 * h * c["num_key_value_heads"] * head
    per_layer = attention + 3 * h * c["intermediate_size"] + 2 * h
    return 2 * c["vocab_size"] * h + c["num_hidden_layers"] * per_layer + h


def test_full_plan_is_llama_3_8b():
    plan = gpu_check.Plan.make(small=False, modes=None)
    assert plan.modes == ("bf16", "4bit", "8bit")
    assert plan.levels == (1, 16, 64) and plan.batches == (1, 16) and plan.max_tokens == 128
    assert llama_parameters(plan.config) == 8_030_261_248  # Llama-3-8B's published parameter count
    with pytest.raises(SystemExit, match="bf16, 8bit and 4bit"):
        gpu_check.Plan.make(small=False, modes="bf16,16bit")


def test_padded_tokenizer_encodes_as_before_and_decodes_every_id(tmp_path):
    from transformers import AutoTokenizer

    tiny = build_tiny_model(tmp_path / "tiny")
    original = AutoTokenizer.from_pretrained(tiny)
    info = gpu_check.pad_tokenizer(tiny, tmp_path / "padded", vocab_size=1000)
    padded = AutoTokenizer.from_pretrained(tmp_path / "padded")
    assert info["tokens"] == len(original) and info["padded_to"] == len(padded) == 1000
    text = "Hello! The capital of France is Paris. <|im_start|>user\nhi<|im_end|>"
    assert padded(text)["input_ids"] == original(text)["input_ids"]
    assert padded.decode([len(original), 999]) == f"<|pad_{len(original)}|><|pad_999|>"
    assert original.decode([999]) == ""  # what the padding prevents: an id that decodes to nothing
    with pytest.raises(ValueError, match="more than the model's"):
        gpu_check.pad_tokenizer(tiny, tmp_path / "short", vocab_size=len(original) - 1)


@pytest.mark.skipif(not hardware.probe_bitsandbytes().nf4, reason="bitsandbytes cannot run here")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_layer_check_sees_bitsandbytes_types(tmp_path, mode):
    """The check the GPU run makes, on a model bitsandbytes really quantized (its CPU kernels)."""
    model = build_tiny_model(tmp_path / "wide", hidden=128, layers=2)
    loaded = load_model(LoadOptions(model_path=model, dtype="bfloat16", device="cpu", quantization=mode))
    assert gpu_check.layer_types(loaded.model) == {gpu_check.LAYER_TYPE[mode]: 14}
    plain = load_model(LoadOptions(model_path=model, dtype="bfloat16", device="cpu"))
    assert gpu_check.layer_types(plain.model) == {"Linear": 14}


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 2 minutes alone; much longer when the machine is busy
def test_cpu_dry_run_measures_every_step(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--small", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, check=False)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    data = json.loads((out / "gpu-check.json").read_text(encoding="utf-8"))
    plan = gpu_check.Plan.make(small=True, modes=None)
    assert not data["errors"] and all(c["pass"] for c in data["checks"])
    names = " | ".join(c["name"] for c in data["checks"])
    for expected in ("doctor found no failure", "bf16: /health reports the load", "decodes to text",
                     "bf16: bench c1 completed", "bf16: bench c4 completed",
                     "bf16: decoder linear layers are Linear"):
        assert expected in names

    model = data["model"]
    assert model["config"] == plan.config
    assert model["parameters"] == llama_parameters(plan.config)
    assert 2 * model["parameters"] <= model["bytes_on_disk"] < 2 * model["parameters"] + 100_000  # bf16
    assert model["tokenizer"]["tokens"] == 49152  # SmolLM2's
    assert model["tokenizer"]["padded_to"] == plan.config["vocab_size"]

    doctor = data["doctor"]["report"]
    assert data["doctor"]["exit_code"] == 0
    assert {"Python & packages", "CUDA", "bitsandbytes", "Fit"} <= {c["name"] for c in doctor["checks"]}
    assert doctor["fit"]["rows"]

    bf16 = data["modes"]["bf16"]
    server = bf16["server"]
    assert server["health"]["status"] == "ready" and server["health"]["dtype"] == "bfloat16"
    assert server["health"]["quantization"] == "none" and server["health"]["device"] == "cpu"
    assert 0 < server["load_s"] < server["ready_s"]
    assert server["prometheus_gauges"]["llmctl_process_resident_memory_bytes"] > 0
    assert "llmctl_gpu_memory_allocated_bytes" in server["prometheus_gauges"]
    sent = 0
    for level, requests in zip(plan.levels, plan.requests, strict=False):
        report = server["bench"][str(level)]
        assert report["config"]["ignore_eos"] and report["config"]["max_tokens"] == plan.max_tokens
        lv = report["runs"][0]["levels"][0]
        assert lv["concurrency"] == level and lv["completed"] == requests
        assert lv["completion_tokens"] == requests * plan.max_tokens and lv["output_throughput"] > 0
        sent += lv["completion_tokens"]
    assert server["metrics_after_bench"]["completion_tokens_total"] >= sent

    inproc = bf16["in_process"]
    assert inproc["layer_types"] == {"Linear": 7 * plan.config["num_hidden_layers"]}
    assert inproc["weights_bytes"] >= 2 * model["parameters"]
    raw = {lv["batch_size"]: lv for lv in bf16["raw_generate"]}
    assert sorted(raw) == list(plan.batches)
    for size, lv in raw.items():
        assert lv["completion_tokens"] == size * plan.max_tokens and lv["output_throughput"] > 0
    assert set(bf16["ratios"]) == {"server_c1_over_generate_b1", "server_c4_over_generate_b4"}

    summary = (out / "summary.txt").read_text(encoding="utf-8")
    assert f"{len(data['checks'])}/{len(data['checks'])} checks passed" in summary
    assert "bf16: serve ready" in summary and "FAILED" not in summary
    assert "ready in" in (out / "serve-bf16.log").read_text(encoding="utf-8")
