"""LoRA adapters on an 8-bit or 4-bit model (bitsandbytes, which runs on CPU too), as PEFT's QLoRA applies them: the
adapter's factors sit beside the quantized layers, and the tokens equal PEFT's own model of the same quantized
weights with the adapter on top (float32 compute, greedy)."""

from __future__ import annotations

import pytest

from llmctl.core import hardware
from llmctl.core.adapters import AdapterSpec
from llmctl.core.loader import LoadOptions, load_model
from llmctl.engine import EngineConfig, SamplingParams, Sequence
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import build_tiny_model
from tests.lora.adapters import make_adapter
from tests.lora.test_lora_engine import PROMPT, TOKENS, tokens

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.skipif(not hardware.probe_bitsandbytes().nf4, reason="bitsandbytes cannot run here")


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A model whose layers bitsandbytes quantizes (blocks of 64), and an adapter for it."""
    folder = tmp_path_factory.mktemp("qlora")
    model = build_tiny_model(folder / "wide", hidden=256, layers=2)
    return model, make_adapter(model, folder / "adapter", rank=8, std=0.2)


def peft_greedy(model_path, adapter, mode: str) -> list[int]:
    """PEFT's answer: the adapter on top of the same quantized model (not merged: 4-bit weights cannot take it)."""
    import torch
    from peft import PeftModel

    loaded = load_model(LoadOptions(model_path=model_path, dtype="float32", device="cpu", quantization=mode))
    model = PeftModel.from_pretrained(loaded.model, adapter).eval()
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([PROMPT]), max_new_tokens=TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize(("mode", "layer_type"), [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_adapter_on_a_quantized_model(wide, mode, layer_type):
    model_path, adapter = wide
    quant = load_model(LoadOptions(model_path=model_path, dtype="float32", device="cpu", quantization=mode))
    assert type(quant.model.model.layers[0].self_attn.q_proj).__name__ == layer_type
    service = Service(ServiceSettings(engine=EngineConfig(max_num_seqs=4), loras=(AdapterSpec("qlora", adapter),)),
                      loader=lambda _: quant)
    service.load()
    assert service.status == "ready", service.error
    try:
        got = {}
        for name in ("qlora", None):
            seq = Sequence(list(PROMPT), SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True),
                           adapter=name)
            got[name] = tokens(service.engine.submit(seq))
        assert got["qlora"] == peft_greedy(model_path, adapter, mode)
        assert got["qlora"] != got[None]
        assert service.loras.host.nbytes > 0
    finally:
        service.shutdown()
