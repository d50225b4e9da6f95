"""`llmctl doctor` flags: --url as bench takes it, --config, and the CUDA queries themselves.

The service tests talk to real servers on 127.0.0.1. CUDA cannot exist on this CPU-only machine, so
the one CUDA test fakes torch.cuda's query functions (and nothing of llmctl), so that the code that
calls them, llmctl.core.hardware, runs for real.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from llmctl.core import hardware
from llmctl.core.loader import resolve_dtype
from llmctl.doctor import checks as doc
from llmctl.doctor.fit import GIB
from tests.doctor.test_doctor import by_id, doctor_json, fake_server  # noqa: F401 - fake_server is a fixture

# ---- --url ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["{url}/v1", "{url}/v1/", "{hostport}"])
def test_url_is_normalised_as_bench_does(base_url, shape):
    url = shape.format(url=base_url, hostport=base_url.removeprefix("http://"))
    _, report = doctor_json("--model-path", "/nonexistent", "--url", url)
    service = by_id(report)["service"]
    assert service["status"] == "ok" and f"{base_url} is ready" in service["finding"], service
    assert service["details"]["url"] == base_url


def test_foreign_health_shows_the_status_code_not_the_body(fake_server):  # noqa: F811 - the fixture
    url, _ = fake_server(404, {"error": {"message": "Not Found", "type": "not_found_error"}})
    check = doc.check_service(url)
    assert check.status == "failure"
    assert "is not an llmctl/OpenAI-compatible service's (HTTP 404: Not Found)" in check.finding
    assert "{" not in check.finding and check.details["http_status"] == 404


@pytest.mark.parametrize(("url", "words"), [
    ("http://[::1", "not a valid URL (Invalid IPv6 URL): 'http://[::1'"),  # crashed with httpx.InvalidURL
    ("http://127.0.0.1:99999", "not a valid URL (Port out of range 0-65535)"),  # said "Connection refused"
    ("ftp://127.0.0.1:8080", "must be an http:// or https:// URL with a host"),
])
def test_a_bad_url_is_a_failure_that_says_so(url, words):
    code, report = doctor_json("--model-path", "/nonexistent", "--url", url)
    service = by_id(report)["service"]
    assert code == 1 and service["status"] == "failure", service
    assert service["finding"].startswith(f"--url: {words}")
    assert "Connection refused" not in service["finding"] and "port from 1 to 65535" in service["fix"]


# ---- --config --------------------------------------------------------------------------------------

def test_config_gives_the_model_path(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMCTL_MODEL_PATH", raising=False)
    config = tmp_path / "llmctl.yaml"
    config.write_text(f"llm:\n  model_path: {tiny_model}\n")
    code, report = doctor_json("--config", str(config))
    assert code == 0 and report["model"] == str(tiny_model)
    # --model-path wins over the file.
    _, report = doctor_json("--config", str(config), "--model-path", str(tmp_path / "elsewhere"))
    assert by_id(report)["model_path"]["status"] == "failure"


def test_bad_config_is_one_clean_error(tmp_path):
    from typer.testing import CliRunner

    from llmctl.cli.app import app

    config = tmp_path / "bad.yaml"
    config.write_text("llm: [not, a, mapping]\n")
    result = CliRunner().invoke(app, ["doctor", "--config", str(config)])
    assert result.exit_code == 1 and "'llm' must be a mapping" in result.stderr and "Traceback" not in result.output


# ---- CUDA, through torch.cuda itself -------------------------------------------------------------

@pytest.fixture()
def fake_torch_cuda(monkeypatch):
    """Pretend torch sees the given GPUs: only torch.cuda's queries are replaced (CUDA cannot exist here)."""
    def install(*gpus: tuple[str, tuple[int, int], float, float]) -> None:
        props = [SimpleNamespace(name=n, major=c[0], minor=c[1], total_memory=int(t * GIB)) for n, c, t, _ in gpus]
        free = [int(f * GIB) for *_, f in gpus]
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: props[i].name)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i=0: props[i])
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: (props[i].major, props[i].minor))
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda i=0: (free[i], props[i].total_memory))
        monkeypatch.setattr(torch.version, "cuda", "12.4")
        _clear_caches()

    yield install
    _clear_caches()  # later tests must not see the fake devices' cached answers


def _clear_caches() -> None:
    hardware.gpu_names.cache_clear()
    hardware.probe_bitsandbytes.cache_clear()


@pytest.mark.parametrize(("name", "capability", "precision"), [
    ("Tesla T4", (7, 5), "fp16"), ("Tesla V100-SXM2-16GB", (7, 0), "fp16"), ("NVIDIA A100-SXM4-40GB", (8, 0), "bf16"),
])
def test_doctor_default_precision_is_the_loaders(fake_torch_cuda, name, capability, precision):
    fake_torch_cuda((name, capability, 16, 15))
    loader = {torch.bfloat16: "bf16", torch.float16: "fp16"}[resolve_dtype("auto", "cuda")]
    assert doc.probe_machine().default_precision == loader == precision


def test_doctor_json_through_torch_cuda_queries(fake_torch_cuda, tiny_model):
    fake_torch_cuda(("Tesla T4", (7, 5), 16, 14.5), ("NVIDIA A10G", (8, 6), 24, 20))
    code, report = doctor_json("--model-path", str(tiny_model))
    cuda = by_id(report)["cuda"]
    assert cuda["details"]["device_count"] == 2, cuda
    assert "GPU 0 Tesla T4: 16.0 GiB, 14.5 GiB free, compute 7.5, bf16 no" in cuda["finding"]
    assert "GPU 1 NVIDIA A10G: 24.0 GiB, 20.0 GiB free, compute 8.6, bf16 yes" in cuda["finding"]
    fit = report["fit"]
    assert fit["device"] == "cuda" and fit["available_bytes"] == int(34.5 * GIB) and fit["devices"] == 2
    assert [r["precision"] for r in fit["rows"] if r["default"]] == ["fp16"] and fit["choice"] == "fp16"
    assert code == 0, [c for c in report["checks"] if c["status"] == "failure"]
