"""The real embedded SmolLM2-135M-Instruct with a LoRA adapter made for it by PEFT: served beside the model through
the openai SDK, its tokens those of the adapter merged into the model (float32, greedy)."""

from __future__ import annotations

import openai
import pytest

from llmctl.core.adapters import AdapterSpec
from llmctl.core.embedded import ensure_embedded_model
from llmctl.core.loader import LoadOptions
from llmctl.engine import EngineConfig
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import serve_in_thread
from tests.conftest import REAL_MODEL
from tests.lora.adapters import make_adapter, merged_greedy

pytestmark = REAL_MODEL
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    folder = ensure_embedded_model()
    adapter = make_adapter(folder, tmp_path_factory.mktemp("smol") / "smol-lora", rank=8, alpha=16,
                           targets=("q_proj", "v_proj", "up_proj"), std=0.1)
    service = Service(ServiceSettings(load=LoadOptions(dtype="float32", device="cpu"),
                                      engine=EngineConfig(max_num_seqs=4, kv_cache_tokens=4096),
                                      loras=(AdapterSpec("smol-lora", adapter),)))
    service.load()
    assert service.status == "ready", service.error
    yield service, folder, adapter
    service.shutdown()


def test_smollm2_with_an_adapter(smol):
    service, folder, adapter = smol
    from llmctl.engine import SamplingParams, Sequence

    tokenizer = service.loaded.tokenizer
    text = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    eos = service.loaded.tokenizer.eos_token_id
    want = merged_greedy(folder, adapter, prompt, 20, eos=eos)
    assert want != merged_greedy(folder, None, prompt, 20, eos=eos)  # the adapter changes the answer
    base, lora = (service.engine.submit(Sequence(list(prompt), SamplingParams(max_tokens=20, temperature=0),
                                                 adapter=name)) for name in (None, "smol-lora"))
    assert tokens_until_end(lora) == want
    assert "Paris" in service.loaded.tokenizer.decode(tokens_until_end(base))
    with serve_in_thread(service) as url:
        sdk = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert [m.id for m in sdk.models.list().data] == ["SmolLM2-135M-Instruct", "smol-lora"]
        answer = sdk.chat.completions.create(model="smol-lora", messages=QUESTION, temperature=0, max_tokens=20)
        assert answer.model == "smol-lora"
        assert answer.choices[0].message.content == service.loaded.tokenizer.decode(want, skip_special_tokens=True)


def tokens_until_end(seq) -> list[int]:
    """The sequence's tokens, whether it stopped at end of sequence or at max_tokens."""
    from llmctl.engine import Finish

    out = []
    while not isinstance(event := seq.events.get(timeout=300), Finish):
        out.append(event)
    return out
