"""8-bit and 4-bit loading through bitsandbytes, which also runs on CPU (bitsandbytes >= 0.45).

The assertions check that quantization really happened (the linear layers are bitsandbytes' types
and the footprint shrank), not only that loading did not crash.
"""

from __future__ import annotations

import httpx
import pytest

from llmctl.core import hardware
from llmctl.core.loader import LoadOptions, load_model
from llmctl.engine import EngineConfig
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import build_tiny_model, serve_in_thread

bnb = pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(not hardware.probe_bitsandbytes().nf4, reason="bitsandbytes cannot run here")


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    # bitsandbytes quantizes in blocks of 64: give the layers room for a measurable saving.
    return build_tiny_model(tmp_path_factory.mktemp("q") / "wide", hidden=256, layers=2)


@pytest.mark.parametrize(("mode", "layer_type"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_load_and_generate(wide_model, mode, layer_type, caplog):
    full = load_model(LoadOptions(model_path=wide_model, dtype="float32", device="cpu"))
    quant = load_model(LoadOptions(model_path=wide_model, dtype="float32", device="cpu", quantization=mode))
    proj = quant.model.model.layers[0].self_attn.q_proj
    assert type(proj).__name__ == layer_type
    assert quant.quantization == mode
    assert quant.weights_bytes < full.weights_bytes
    if mode == "8bit":
        assert "slower than bf16" in caplog.text
    service = Service(ServiceSettings(engine=EngineConfig(max_num_seqs=4)), loader=lambda _: quant)
    service.load()
    with serve_in_thread(service) as url:
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "ignore_eos": True})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 6
        assert httpx.get(url + "/health").json()["quantization"] == mode
    service.shutdown()
    # bitsandbytes logs a warning at every 8-bit matmul whose input is not float16: one per linear
    # layer per step would bury the service's log (seen in scripts/gpu_check.py's 8-bit run).
    assert "inputs will be cast" not in caplog.text


def test_missing_bitsandbytes_is_explained_before_loading(monkeypatch, wide_model):
    from llmctl.errors import ModelLoadError

    missing = hardware.BitsAndBytesStatus(False, None, False, False, False,
                                          f"bitsandbytes is not installed: {hardware.INSTALL_BNB}")
    monkeypatch.setattr(hardware, "probe_bitsandbytes", lambda: missing)
    with pytest.raises(ModelLoadError, match="pip install"):
        load_model(LoadOptions(model_path=wide_model, quantization="4bit", device="cpu"))
