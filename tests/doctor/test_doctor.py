"""`llmctl doctor`: broken and healthy model folders, the fit prediction against real loads, the service.

The CUDA tests run on CPU machines: they fake only the CUDA queries of `llmctl.core.hardware`
(torch_cuda_available, gpu_devices, torch_cuda_build, nvidia_driver_version, cuda_init_error) with
monkeypatch. Everything else (model files, headers, sockets, HTTP, loads) is real.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
from collections import namedtuple
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli.app import app
from llmctl.core import hardware
from llmctl.core.loader import LoadOptions, load_model
from llmctl.doctor import checks as doc
from llmctl.doctor.fit import (
    GIB,
    Attention,
    attention_from_config,
    inventory_from_config,
    inventory_from_tensors,
    predict_fit,
    read_safetensors_header,
    weights_bytes,
)
from llmctl.doctor.modelcheck import check_model
from llmctl.server.testing import build_tiny_model, free_port

runner = CliRunner()
DiskUsage = namedtuple("DiskUsage", "total used free")

LLAMA3_8B = {  # Meta-Llama-3-8B's config.json, the fields that matter: 8,030,261,248 parameters
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "max_position_embeddings": 8192, "hidden_act": "silu", "tie_word_embeddings": False,
}
LLAMA32_1B = {**LLAMA3_8B, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
              "tie_word_embeddings": True, "head_dim": 64}  # Llama-3.2-1B: 1,235,814,400 parameters
BNB_OK = hardware.BitsAndBytesStatus(True, "0.45.0", True, True, True)
BNB_MISSING = hardware.BitsAndBytesStatus(False, None, False, False, False,
                                          f"bitsandbytes is not installed: {hardware.INSTALL_BNB}")


def doctor_json(*args: str) -> tuple[int, dict]:
    result = runner.invoke(app, ["doctor", "--json", "--port", str(free_port()), *args])
    return result.exit_code, json.loads(result.stdout)


def by_id(report: dict) -> dict[str, dict]:
    return {c["id"]: c for c in report["checks"]}


# ---- broken and healthy model folders ------------------------------------------------------------

@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_healthy_tiny_model_passes_every_check(tiny_model):
    code, report = doctor_json("--model-path", str(tiny_model))
    checks = by_id(report)
    assert code == 0 and report["exit_code"] == 0, report
    assert list(checks) == ["python_packages", "cuda", "bitsandbytes", "model_path", "config", "architecture",
                            "weights", "tokenizer", "chat_template", "fit", "disk", "cpu_load", "port"]
    for name in ("model_path", "config", "architecture", "weights", "tokenizer", "chat_template", "fit",
                 "port"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["weights"]["details"]["parameters"] == 106_816
    packages = checks["python_packages"]["finding"]
    assert "torch" in packages and "transformers" in packages
    assert report["fit"]["choice"] is not None and report["fit"]["context_length"] == 256
    assert report["fit"]["kv_tokens"] == 256 and report["fit"]["kv_cache_tokens"] == 65536


def _no_config(m: Path) -> None:
    (m / "config.json").unlink()


def _missing_shard(m: Path) -> None:
    header = read_safetensors_header(m / "model.safetensors")
    weight_map = {t.name: "model-00001-of-00002.safetensors" for t in header}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (m / "model.safetensors").rename(m / "model-00001-of-00002.safetensors")
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _empty_weights(m: Path) -> None:
    (m / "model.safetensors").write_bytes(b"")


def _corrupt_header(m: Path) -> None:
    data = bytearray((m / "model.safetensors").read_bytes())
    data[8:40] = b"\x00garbage, not the JSON header!!\xff"
    (m / "model.safetensors").write_bytes(bytes(data))


def _cut_short(m: Path) -> None:
    data = (m / "model.safetensors").read_bytes()
    (m / "model.safetensors").write_bytes(data[: len(data) // 2])


def _no_tokenizer(m: Path) -> None:
    (m / "tokenizer.json").unlink()


def _unknown_architecture(m: Path) -> None:
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="notarealmodel", architectures=["NotARealModelForCausalLM"],
                  auto_map={"AutoModelForCausalLM": "modeling_x.NotARealModelForCausalLM"})
    (m / "config.json").write_text(json.dumps(config))


def _not_a_causal_lm(m: Path) -> None:
    config = json.loads((m / "config.json").read_text())
    config.update(model_type="t5", architectures=["T5ForConditionalGeneration"])
    (m / "config.json").write_text(json.dumps(config))


def _no_weights(m: Path) -> None:
    (m / "model.safetensors").unlink()


def _no_chat_template(m: Path) -> None:
    (m / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((m / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (m / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


def _weight_index(weight_map: object) -> Callable[[Path], None]:
    """An index beside model.safetensors whose weight_map is ``weight_map`` (as in a hand-edited download)."""
    def breakage(m: Path) -> None:
        index = {"metadata": {}, "weight_map": weight_map}
        (m / "model.safetensors.index.json").write_text(json.dumps(index))
    return breakage


def _model_type_list(m: Path) -> None:
    config = json.loads((m / "config.json").read_text())
    config["model_type"] = ["llama"]
    (m / "config.json").write_text(json.dumps(config))


def _empty_tokenizer(m: Path) -> None:
    (m / "tokenizer.json").write_bytes(b"")


def _tokenizer_not_json(m: Path) -> None:
    (m / "tokenizer.json").write_text('{"version": "1.0", "model": {')


def _chat_template_syntax_error(m: Path) -> None:
    (m / "chat_template.jinja").write_text("{% for message in messages %}{{ message.content }\n{% endfor %}")


def _tokenizer_config_template_syntax_error(m: Path) -> None:
    _no_chat_template(m)
    tokenizer_config = json.loads((m / "tokenizer_config.json").read_text())
    tokenizer_config["chat_template"] = "{% if messages %}{{ messages[0].content }}"  # no endif
    (m / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))


@pytest.mark.parametrize(("breakage", "check", "status", "words"), [
    (_no_config, "config", "failure", "has no config.json"),
    (_weight_index(None), "weights", "failure", "not a valid weight index: it needs a \"weight_map\" object"),
    (_weight_index(["model.safetensors"]), "weights", "failure", "needs a \"weight_map\" object"),
    (_weight_index({"lm_head.weight": 5}), "weights", "failure",
     "tensor 'lm_head.weight' maps to 5, not a shard file name"),
    (_model_type_list, "architecture", "failure", "model_type is ['llama'], not a name"),
    (_empty_tokenizer, "tokenizer", "failure", "Empty tokenizer file(s) (0 bytes): tokenizer.json"),
    (_tokenizer_not_json, "tokenizer", "failure", "tokenizer.json is not valid JSON"),
    (_chat_template_syntax_error, "chat_template", "failure",
     "The chat template in chat_template.jinja does not compile: line 1: unexpected '}'"),
    (_tokenizer_config_template_syntax_error, "chat_template", "failure",
     "The chat template in tokenizer_config.json does not compile: line 1: Unexpected end of template"),
    (_missing_shard, "weights", "failure", "1 missing shard(s): model-00002-of-00002.safetensors"),
    (_empty_weights, "weights", "failure", "(0 bytes): model.safetensors"),
    (_corrupt_header, "weights", "failure", "corrupt header"),
    (_cut_short, "weights", "failure", "cut short"),
    (_no_weights, "weights", "failure", "No weight files"),
    (_no_tokenizer, "tokenizer", "failure", "No tokenizer"),
    (_unknown_architecture, "architecture", "failure", "unknown to transformers"),
    (_not_a_causal_lm, "architecture", "failure", "not a text-generation (causal LM) model"),
    (_no_chat_template, "chat_template", "warning", "No chat template"),
])
def test_each_broken_folder_gets_its_finding_and_exit_code(model_copy, breakage, check, status, words):
    breakage(model_copy)
    code, report = doctor_json("--model_path", str(model_copy))
    found = by_id(report)[check]
    assert found["status"] == status and words in found["finding"], found
    assert found["fix"]
    assert code == report["exit_code"] == (1 if status == "failure" else 0)
    failures = [c["id"] for c in report["checks"] if c["status"] == "failure"]
    assert failures == ([check] if status == "failure" else [])


def test_unknown_architecture_mentions_custom_code(model_copy):
    _unknown_architecture(model_copy)
    finding = by_id(doctor_json("--model-path", str(model_copy))[1])["architecture"]
    assert "auto_map" in finding["finding"] and "pip install -U transformers" in finding["fix"]


def test_broken_weights_fall_back_to_a_config_estimate(model_copy):
    _corrupt_header(model_copy)
    fit = by_id(doctor_json("--model-path", str(model_copy))[1])["fit"]
    assert fit["details"]["parameters_from"] == "config" and fit["details"]["parameters"] == 106_816


@pytest.mark.parametrize(("make", "words"), [
    (lambda p: p / "nowhere", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("hi") and p / "notes.txt", "not a GGUF model"),
])
def test_bad_model_path_fails(tmp_path, make, words):
    code, report = doctor_json("--model-path", str(make(tmp_path)))
    path = by_id(report)["model_path"]
    assert code == 1 and path["status"] == "failure" and words in path["finding"]
    assert "config" not in by_id(report)  # nothing to inspect further
    assert by_id(report)["fit"]["status"] == "warning"


def test_damaged_gguf_file_fails(tmp_path):
    from llmctl.core.embedded import embedded_gguf_path

    broken = tmp_path / "cut.gguf"
    broken.write_bytes(embedded_gguf_path().read_bytes()[:50_000])
    checks, _ = check_model(broken)
    assert checks[-1].name == "Weights" and checks[-1].status == "failure"
    assert "damaged or cut short" in checks[-1].finding


def test_human_output_shows_tables_and_summary(tiny_model):
    result = runner.invoke(app, ["doctor", "--model-path", str(tiny_model), "--port", str(free_port())],
                           env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    for words in ("Finding and fix", "Chat template", "Memory needed", "--load-in-4bit", "No failures"):
        assert words in result.stdout


def test_help_documents_flags_and_exit_codes():
    result = runner.invoke(app, ["doctor", "--help"], env={"COLUMNS": "200"})
    for flag in ("--model-path", "--context-length", "--batch-size", "--kv-cache-tokens", "--port", "--url",
                 "--config", "--json", "Exit code 0"):
        assert flag in result.stdout


# ---- the fit prediction against reality ----------------------------------------------------------

def test_config_estimate_matches_the_headers(tiny_model):
    headers = inventory_from_tensors(read_safetensors_header(tiny_model / "model.safetensors"), "safetensors")
    config = json.loads((tiny_model / "config.json").read_text())
    estimate = inventory_from_config(config)
    assert (estimate.total, estimate.quantizable, estimate.quantizable_rows) == (
        headers.total, headers.quantizable, headers.quantizable_rows)
    assert inventory_from_config(LLAMA3_8B).total == 8_030_261_248
    assert inventory_from_config(LLAMA32_1B).total == 1_235_814_400


def test_kv_cache_bytes_per_token():
    # 2 (key and value) x 32 layers x 8 KV heads x 128 head dim x 2 bytes = 128 KiB per token.
    assert attention_from_config(LLAMA3_8B) == Attention(32, 8, 128)
    assert attention_from_config(LLAMA3_8B).kv_bytes_per_token(2) == 131_072


@pytest.mark.parametrize(("dtype", "precision"), [("float32", "fp32"), ("bfloat16", "bf16")])
def test_tiny_prediction_within_10_percent_of_the_real_footprint(tiny_model, dtype, precision):
    _, info = check_model(tiny_model)
    predicted = weights_bytes(info.inventory, precision)
    actual = load_model(LoadOptions(model_path=tiny_model, dtype=dtype, device="cpu")).weights_bytes
    assert abs(predicted - actual) <= 0.10 * actual, (predicted, actual)


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_tiny_quantized_prediction_within_10_percent(tmp_path, mode):
    if not getattr(hardware.probe_bitsandbytes(), "int8" if mode == "8bit" else "nf4"):
        pytest.skip("bitsandbytes cannot run here")
    # Wide enough for bitsandbytes' 64-weight blocks. The prediction also counts the quantization
    # scales, which get_memory_footprint() leaves out; the 10% covers them.
    model = build_tiny_model(tmp_path / "wide", hidden=256, layers=2)
    _, info = check_model(model)
    predicted = weights_bytes(info.inventory, mode, compute_bytes=2)
    options = LoadOptions(model_path=model, dtype="bfloat16", device="cpu", quantization=mode)
    actual = load_model(options).weights_bytes
    assert abs(predicted - actual) <= 0.10 * actual, (predicted, actual)
    assert predicted < weights_bytes(info.inventory, "bf16")


@pytest.mark.slow
def test_embedded_smollm2_prediction_within_10_percent():
    from llmctl.core.embedded import embedded_gguf_path, ensure_embedded_model

    folder = ensure_embedded_model()
    _, from_gguf = check_model(embedded_gguf_path())
    _, info = check_model(folder)
    assert info.inventory.source == "safetensors" and from_gguf.inventory.source == "gguf"
    assert from_gguf.inventory.total == info.inventory.total == 134_515_008
    assert inventory_from_config(info.config).total == info.inventory.total
    for dtype, precision in (("bfloat16", "bf16"), ("float32", "fp32")):
        loaded = load_model(LoadOptions(model_path=folder, dtype=dtype, device="cpu"))
        predicted = weights_bytes(info.inventory, precision)
        assert abs(predicted - loaded.weights_bytes) <= 0.10 * loaded.weights_bytes, (precision, predicted)
        loaded.unload()


def test_predict_fit_picks_the_least_lossy_precision_that_fits():
    inventory, attention = inventory_from_config(LLAMA3_8B), attention_from_config(LLAMA3_8B)

    def verdict(free_gib: float, problems=None):
        fit = predict_fit(inventory, attention, context_length=8192, batch_size=1,
                          available_bytes=int(free_gib * GIB), device="cuda", default="bf16",
                          quantization_problem=problems)
        return fit.choice.precision if fit.choice else None

    assert [verdict(g) for g in (80, 17, 11, 8, 5)] == ["bf16", "8bit", "8bit", "4bit", None]
    assert verdict(8, {"8bit": "no bitsandbytes", "4bit": "no bitsandbytes"}) is None
    # On a CPU without native bf16 the default is fp32; the first way out is --dtype bfloat16.
    fit = predict_fit(inventory, attention, context_length=8192, batch_size=1, available_bytes=24 * GIB,
                      device="cpu", default="fp32")
    assert fit.choice.precision == "bf16" and fit.choice.flag == "--dtype bfloat16"
    assert next(r for r in fit.rows if r.default).precision == "fp32" and not fit.fits(fit.rows[0])
    fit = predict_fit(inventory, attention, context_length=8192, batch_size=4, available_bytes=80 * GIB,
                      device="cuda", default="bf16")
    assert fit.rows[1].kv_bytes == 4 * 8192 * 131_072  # bf16 row: batch x context x per-token bytes


# ---- CUDA, faked on this CPU machine -------------------------------------------------------------

def fake_gpus(monkeypatch, *gpus: hardware.GPUDevice, bnb: hardware.BitsAndBytesStatus = BNB_OK) -> None:
    """Pretend CUDA works and shows ``gpus``: only the hardware module's CUDA queries are replaced."""
    monkeypatch.setattr(hardware, "torch_cuda_available", lambda: True)
    monkeypatch.setattr(hardware, "gpu_devices", lambda: gpus)
    monkeypatch.setattr(hardware, "torch_cuda_build", lambda: "12.4")
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.setattr(hardware, "probe_bitsandbytes", lambda: bnb)


def gpu(free_gib: float, total_gib: float = 24, capability=(8, 6), name="NVIDIA A10G", index=0):
    return hardware.GPUDevice(index, name, int(total_gib * GIB), int(free_gib * GIB), capability)


@pytest.fixture(scope="module")
def llama_1b(tiny_model, tmp_path_factory) -> Path:
    return make_llama_1b(tmp_path_factory.mktemp("fake"), tiny_model)


def make_llama_1b(root: Path, tiny_model: Path) -> Path:
    """A Llama-3.2-1B-shaped folder: real config and header, sparse (unwritten) tensor data."""
    folder = root / "llama-1b"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, folder / name)
    (folder / "config.json").write_text(json.dumps(LLAMA32_1B))
    h, i, v, kv = 2048, 8192, 128256, 512
    shapes = {"model.embed_tokens.weight": [v, h], "model.norm.weight": [h]}
    for n in range(16):
        p = f"model.layers.{n}."
        shapes |= {p + "self_attn.q_proj.weight": [h, h], p + "self_attn.k_proj.weight": [kv, h],
                   p + "self_attn.v_proj.weight": [kv, h], p + "self_attn.o_proj.weight": [h, h],
                   p + "mlp.gate_proj.weight": [i, h], p + "mlp.up_proj.weight": [i, h],
                   p + "mlp.down_proj.weight": [h, i], p + "input_layernorm.weight": [h],
                   p + "post_attention_layernorm.weight": [h]}
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = 2 * shape[0] * (shape[1] if len(shape) > 1 else 1)
        header[name] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    with (folder / "model.safetensors").open("wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)  # a sparse file: 2.3 GiB long, nothing written
    return folder


@pytest.mark.parametrize(("free_gib", "status", "words"), [
    (20, "ok", "Fits in bf16 (the default)"),
    (2.8, "warning", "Needs --load-in-8bit"),
    (2.0, "warning", "Needs --load-in-4bit"),
    (1.0, "failure", "Does not fit: needs 1.8 GiB even in 4-bit, 1.0 GiB free GPU memory"),
])
def test_fit_verdict_names_the_flag_on_a_fake_gpu(monkeypatch, llama_1b, free_gib, status, words):
    fake_gpus(monkeypatch, gpu(free_gib))
    code, report = doctor_json("--model-path", str(llama_1b))
    fit = by_id(report)["fit"]
    assert fit["status"] == status and words in fit["finding"], fit
    assert fit["details"]["parameters"] == 1_235_814_400 and report["fit"]["device"] == "cuda"
    assert report["fit"]["context_length"] == 8192
    assert code == (1 if status == "failure" else 0)
    if status == "warning":
        assert fit["fix"] == f"llmctl serve {report['fit']['flag']}"


def test_fit_fails_when_only_bitsandbytes_would_make_it_fit(monkeypatch, llama_1b):
    fake_gpus(monkeypatch, gpu(2.0), bnb=BNB_MISSING)
    code, report = doctor_json("--model-path", str(llama_1b))
    checks = by_id(report)
    assert code == 1 and checks["fit"]["status"] == "failure"
    assert "would fit but bitsandbytes" in checks["fit"]["finding"] and "pip install" in checks["fit"]["fix"]
    assert checks["bitsandbytes"]["status"] == "warning"


def test_context_length_and_batch_size_drive_the_kv_cache(monkeypatch, llama_1b):
    fake_gpus(monkeypatch, gpu(20))
    _, report = doctor_json("--model-path", str(llama_1b), "--context-length", "1024", "--batch-size", "8")
    bf16 = next(r for r in report["fit"]["rows"] if r["precision"] == "bf16")
    assert bf16["kv_cache_bytes"] == 8 * 1024 * (2 * 16 * 8 * 64 * 2)


def test_fake_gpus_are_listed_with_memory_capability_and_bf16(monkeypatch, llama_1b):
    fake_gpus(monkeypatch, gpu(14, 16, (7, 5), "Tesla T4"), gpu(20, name="NVIDIA A10G", index=1))
    _, report = doctor_json("--model-path", str(llama_1b))
    cuda = by_id(report)["cuda"]
    assert cuda["status"] == "ok" and cuda["details"]["device_count"] == 2
    assert "GPU 0 Tesla T4: 16.0 GiB, 14.0 GiB free, compute 7.5, bf16 no" in cuda["finding"]
    assert "driver 550.54.15" in cuda["finding"]
    # serve asks the first GPU (a T4: no native bf16), so it picks fp16; the fit compares with the free
    # memory of both GPUs, and each GPU holds its own CUDA context.
    rows = {r["precision"]: r for r in report["fit"]["rows"]}
    assert list(rows) == ["fp32", "fp16", "8bit", "4bit"] and rows["fp16"]["default"]
    assert report["fit"]["available_bytes"] == 34 * GIB and report["fit"]["devices"] == 2
    assert rows["fp16"]["runtime_bytes"] == 2 * 512 * 1024**2 + int(0.05 * rows["fp16"]["weights_bytes"])


def test_bf16_first_gpu_with_a_t4_beside_it_is_a_warning(monkeypatch, llama_1b):
    fake_gpus(monkeypatch, gpu(20, name="NVIDIA A10G"), gpu(14, 16, (7, 5), "Tesla T4", index=1))
    _, report = doctor_json("--model-path", str(llama_1b))
    cuda = by_id(report)["cuda"]
    # The loader decides on the first GPU alone (torch.cuda.is_bf16_supported asks the current device).
    assert [r["precision"] for r in report["fit"]["rows"] if r["default"]] == ["bf16"]
    assert cuda["status"] == "warning" and "GPU 1 (Tesla T4) has no native bf16" in cuda["finding"]
    assert "--dtype float16" in cuda["fix"]


def test_busy_gpu_is_a_warning(monkeypatch):
    fake_gpus(monkeypatch, gpu(1, 24))
    check = doc.check_cuda(doc.probe_machine())
    assert check.status == "warning" and "another process" in check.finding and "nvidia-smi" in check.fix


def test_unusable_driver_is_a_failure(monkeypatch):
    monkeypatch.setattr(hardware, "torch_cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "torch_cuda_build", lambda: "12.4")
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "470.82.01")
    monkeypatch.setattr(hardware, "cuda_init_error", lambda: "The NVIDIA driver on your system is too old")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    check = doc.check_cuda(doc.probe_machine())
    assert check.status == "failure" and "too old" in check.finding and "470.82.01" in check.finding


def test_cpu_build_on_a_gpu_machine_is_a_warning(monkeypatch):
    monkeypatch.setattr(hardware, "torch_cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "torch_cuda_build", lambda: None)
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: "550.54.15")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    check = doc.check_cuda(doc.probe_machine())
    assert check.status == "warning" and "CPU-only build" in check.finding
    assert "download.pytorch.org" in check.fix


@pytest.mark.parametrize(("flags", "status", "default"), [
    ({"avx2", "avx512f", "avx512_bf16"}, "ok", "bf16"), ({"avx2"}, "ok", "fp32"), (set(), "warning", "fp32")])
def test_cpu_only_machine_is_stated_plainly(monkeypatch, flags, status, default):
    monkeypatch.setattr(hardware, "torch_cuda_available", lambda: False)
    monkeypatch.setattr(hardware, "torch_cuda_build", lambda: None)
    monkeypatch.setattr(hardware, "nvidia_driver_version", lambda: None)
    monkeypatch.setattr(hardware, "cpu_flags", lambda: flags)
    machine = doc.probe_machine()
    check = doc.check_cuda(machine)
    assert check.status == status and "CPU" in check.finding and "RAM" in check.finding
    assert f"AVX2 {'yes' if 'avx2' in flags else 'no'}" in check.finding
    assert machine.default_precision == default and machine.available_bytes == machine.ram_available


# ---- packages, bitsandbytes, disk ------------------------------------------------------------------

def test_old_package_is_a_failure_with_the_pip_command(monkeypatch):
    monkeypatch.setattr(doc, "_minimum_versions", lambda: {"torch": "99.0"})
    check = doc.check_packages(doc.probe_machine())
    assert check.status == "failure" and "older than the required 99.0" in check.finding
    assert check.fix == "pip install -U 'torch>=99.0'"


@pytest.mark.parametrize(("status", "result", "words"), [
    (BNB_MISSING, "warning", "Not installed"),
    (hardware.BitsAndBytesStatus(True, "0.44.1", True, False, False, "needs a CUDA GPU; upgrade"), "warning",
     "8-bit no, 4-bit no"),
    (BNB_OK, "ok", "8-bit yes, 4-bit yes"),
])
def test_bitsandbytes_modes(status, result, words):
    machine = doc.probe_machine()
    check = doc.check_bitsandbytes(status, machine)
    assert check.status == result and words in check.finding
    assert (check.fix != "") == (result != "ok")


def test_disk_too_full_to_convert_the_embedded_model(monkeypatch, tiny_model, tmp_path):
    _, info = check_model(tiny_model)
    info.embedded_unconverted = True  # as for the embedded GGUF: serve must first write a bf16 copy
    check = doc.check_disk(info, tmp_path / "not-created-yet")
    assert check.status in ("ok", "warning") and str(tmp_path / "not-created-yet") in check.finding
    # A full disk cannot be arranged here; disk_usage is the one thing faked.
    monkeypatch.setattr(doc.shutil, "disk_usage", lambda _: DiskUsage(100 * GIB, 100 * GIB - 1000, 1000))
    check = doc.check_disk(info, tmp_path / "not-created-yet")
    assert check.status == "failure" and "needs 208.6 KiB" in check.finding
    assert "LLMCTL_CACHE_DIR" in check.fix


# ---- the port and a running service --------------------------------------------------------------

class _Answer(BaseHTTPRequestHandler):
    body: bytes = b""
    code = 200

    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(self.code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def fake_server():
    """A real HTTP server on 127.0.0.1 answering every GET with a given status and body."""
    servers = []

    def start(code: int, body: dict | str) -> tuple[str, int]:
        handler = type("H", (_Answer,), {"code": code, "body": (body if isinstance(body, str) else
                                                               json.dumps(body)).encode()})
        server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}", server.server_port

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_cpu_load_shows_the_threads_and_warns_when_the_cores_are_busy():
    cores = doc.usable_cores()
    calm = doc.check_cpu_load(None, load=0.0)
    assert calm.status == "ok" and calm.details["cpu_threads"] == cores
    assert calm.details["cpu_threads_policy"] == "adaptive" and "adaptive torch threads" in calm.finding
    assert f"of {cores} usable core(s)" in calm.finding
    busy = doc.check_cpu_load(None, load=cores + 5.0)
    assert busy.status == "warning" and "keep the adaptive default" in busy.fix and "other work" in busy.finding
    fixed = doc.check_cpu_load("4", load=cores + 5.0)
    assert fixed.details == {"usable_cores": cores, "cpu_threads": 4, "cpu_threads_policy": "fixed",
                             "load_average_1m": cores + 5.0}
    assert "unset LLMCTL_CPU_THREADS" in fixed.fix and "fixed by --cpu-threads" in fixed.finding


def test_free_port_is_ok():
    assert doc.check_port(free_port()).status == "ok"


def test_port_taken_by_another_program_fails(fake_server):
    _, port = fake_server(404, "<html>not found</html>")
    check = doc.check_port(port)
    assert check.status == "failure" and "taken by another program" in check.finding and "--port" in check.fix


def test_port_held_by_llmctl_is_a_warning(base_url):
    check = doc.check_port(int(base_url.rsplit(":", 1)[1]))
    assert check.status == "warning" and "running llmctl service" in check.finding and "--url" in check.fix


def test_url_of_a_ready_service(base_url):
    _, report = doctor_json("--model-path", "/nonexistent", "--url", base_url)
    service = by_id(report)["service"]
    assert service["status"] == "ok" and "is ready" in service["finding"] and "port" not in by_id(report)
    assert service["details"]["health"]["status"] == "ready"


def test_connection_refused():
    with socket.socket() as s:  # a port that was free a moment ago and has nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = doc.check_service(f"http://127.0.0.1:{port}")
    assert check.status == "failure" and "Connection refused" in check.finding
    assert "--host 0.0.0.0" in check.fix


@pytest.mark.parametrize(("code", "body", "status", "words"), [
    (503, {"status": "loading"}, "warning", "still loading"),
    (503, {"status": "error", "error": "out of memory"}, "failure", "failed to load its model: out of"),
    (404, "<html>no</html>", "failure", "answers, but /health is not an llmctl/OpenAI-compatible service's"),
    (200, "<html>It works!</html>", "failure", "is not an llmctl/OpenAI-compatible service's (HTTP 200"),
])
def test_service_status_is_reported(fake_server, code, body, status, words):
    url, _ = fake_server(code, body)
    check = doc.check_service(url)
    assert check.status == status and words in check.finding and check.fix


@pytest.mark.parametrize(("body", "words"), [
    ("", "an OpenAI-compatible server that does not report its model or device"),  # vLLM, TGI
    ({"status": "ok"}, "an OpenAI-compatible server that does not report its model or device"),  # llama.cpp
    ({"status": "ready", "model": "m", "device": "cuda"}, "is ready: model m, device cuda"),
])
def test_other_servers_that_are_up_are_ready_without_none_fields(fake_server, body, words):
    url, _ = fake_server(200, body)
    check = doc.check_service(url)
    assert check.status == "ok" and words in check.finding and "None" not in check.finding


def test_a_check_that_crashes_is_a_failure_and_the_others_still_report(monkeypatch, tiny_model):
    """Every crash that real files could cause is fixed; the guard is for the next one, so here two checks
    are made to raise (the only fake in this test) to show what the user would then see."""
    def crash(*args):
        raise KeyError("hidden_size")

    monkeypatch.delenv("LLMCTL_DEBUG", raising=False)
    monkeypatch.setattr(doc, "check_fit", crash)
    monkeypatch.setattr(doc, "check_port", crash)
    code, report = doctor_json("--model-path", str(tiny_model))
    checks = by_id(report)
    assert code == 1 and checks["fit"]["status"] == "failure" and checks["port"]["status"] == "failure"
    assert checks["fit"]["finding"] == "Could not check: KeyError: 'hidden_size'"
    assert "LLMCTL_DEBUG=1" in checks["fit"]["fix"]
    assert checks["weights"]["status"] == "ok" and checks["disk"]["status"] == "ok"
    monkeypatch.setattr(doc, "check_model", crash)
    code, report = doctor_json("--model-path", str(tiny_model))
    assert by_id(report)["model_files"]["finding"] == "Could not check: KeyError: 'hidden_size'"


def test_piped_doctor_prints_whole_paths(tmp_path):
    """Piped (no terminal, no COLUMNS), a long path stays on one line instead of being wrapped at 80 columns."""
    missing = tmp_path / "a-rather-long-folder-name-for-models" / "another-long-sub-folder" / "SmolLM2-135M-Instruct-x"
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    done = subprocess.run([sys.executable, "-m", "llmctl", "doctor", "--model-path", str(missing)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert any(str(missing) in line for line in done.stdout.splitlines()), done.stdout
