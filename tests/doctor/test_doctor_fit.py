"""`llmctl doctor`'s fit prediction: the KV cache against serve's budget, MoE and tied-embedding
estimates against transformers' own models, and which weight files count.

Parameter counts are checked against models transformers builds on the meta device (shapes only, no
memory). The GPUs are faked as in tests/doctor/test_doctor.py: only llmctl.core.hardware's CUDA queries are
replaced, since this machine has no CUDA device; the Machine objects below are built by hand, as
its docstring intends.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmctl.core import hardware
from llmctl.core.loader import LoadOptions, load_model
from llmctl.doctor import checks as doc
from llmctl.doctor.fit import (
    GIB,
    SERVE_KV_CACHE_TOKENS,
    WeightInventory,
    attention_from_config,
    inventory_from_config,
    predict_fit,
    tied_embeddings,
)
from llmctl.doctor.modelcheck import ModelInfo, check_model
from tests.doctor.test_doctor import (
    BNB_MISSING,
    BNB_OK,
    LLAMA3_8B,
    by_id,
    doctor_json,
    fake_gpus,
    gpu,
    make_llama_1b,
)

LLAMA31_8B = {**LLAMA3_8B, "max_position_embeddings": 131072, "rope_theta": 500000.0}
LLAMA31_70B = {**LLAMA31_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_hidden_layers": 80,
               "num_attention_heads": 64}
# Qwen3-30B-A3B's config.json; transformers builds it on the meta device with 30,532,122,624 parameters.
QWEN3_30B_A3B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": 2048,
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_hidden_layers": 48, "num_attention_heads": 32,
    "num_key_value_heads": 4, "head_dim": 128, "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936,
    "hidden_act": "silu", "max_position_embeddings": 40960, "tie_word_embeddings": False, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "rope_theta": 1000000.0,
}


def machine(*gpus: hardware.GPUDevice) -> doc.Machine:
    return doc.Machine(cuda_build="12.4", driver="550.54.15", cuda_available=True, cuda_error=None, gpus=gpus,
                       cpu_cores=16, ram_total=128 * GIB, ram_available=100 * GIB, cpu_flags=frozenset())


def config_only(config: dict) -> ModelInfo:
    """A model known from its config.json alone, as when no weight header can be read."""
    from llmctl.core.modelfiles import ModelSource

    return ModelInfo(ModelSource(Path("/nowhere")), "config", config, inventory_from_config(config))


# ---- the KV cache is bounded by serve's budget, not reserved per sequence -------------------------

def test_doctor_default_budget_is_serves():
    from llmctl.engine import EngineConfig

    assert SERVE_KV_CACHE_TOKENS == EngineConfig().kv_cache_tokens


def test_batch_of_long_contexts_is_capped_at_the_kv_budget():
    inventory, attention = inventory_from_config(LLAMA31_8B), attention_from_config(LLAMA31_8B)
    per_token = attention.kv_bytes_per_token(2)

    def bf16_kv(batch: int, budget: int = SERVE_KV_CACHE_TOKENS) -> int:
        fit = predict_fit(inventory, attention, context_length=131072, batch_size=batch, available_bytes=80 * GIB,
                          device="cuda", default="bf16", kv_cache_tokens=budget)
        return next(r for r in fit.rows if r.precision == "bf16").kv_bytes

    # serve holds at most --kv-cache-tokens slots over all sequences, however many run.
    assert bf16_kv(1) == bf16_kv(8) == 65536 * per_token == 8 * GIB
    assert bf16_kv(8, budget=16384) == 16384 * per_token


def test_8b_that_fits_in_bf16_with_a_smaller_cache_says_so_before_quantizing():
    info = config_only(LLAMA31_8B)
    check, fit = doc.check_fit(info, machine(gpu(22, 24)), BNB_OK, None, 1)
    # bf16 weights are 15 GiB; 8 GiB of KV (65536 tokens) push the total past 22 GiB.
    assert check.status == "warning" and check.finding.startswith("bf16 (the default) fits only with a smaller KV")
    n = check.details["smaller_kv_cache"]["kv_cache_tokens"]
    assert 40_000 <= n < 65536 and f"--kv-cache-tokens {n} --max-model-len {n}" in check.fix
    assert "--max-num-seqs" in check.fix and check.fix.index("--kv-cache-tokens") < check.fix.index("--load-in-8bit")
    assert fit.choice.precision == "8bit"
    # Without bitsandbytes this is no longer a failure: the smaller cache alone makes it work.
    check, _ = doc.check_fit(info, machine(gpu(22, 24)), BNB_MISSING, None, 1)
    assert check.status == "warning" and "--load-in" not in check.fix
    bf16 = next(r for r in fit.rows if r.default)
    assert fit.kv_tokens_that_fit(bf16) == n and bf16.weights_bytes + bf16.runtime_bytes + n * bf16.kv_bytes_per_token \
        <= fit.available_bytes


def test_70b_in_4bit_with_a_smaller_cache_instead_of_a_failure():
    check, fit = doc.check_fit(config_only(LLAMA31_70B), machine(gpu(47, 48)), BNB_OK, None, 1)
    assert check.status == "warning" and check.finding.startswith("Needs --load-in-4bit and a smaller KV cache")
    n = check.details["smaller_kv_cache"]["kv_cache_tokens"]
    assert check.fix.startswith(f"llmctl serve --load-in-4bit --kv-cache-tokens {n} --max-model-len {n}")
    assert 20_000 < n < 30_000 and fit.choice is None
    # Truly too big is still a failure.
    check, _ = doc.check_fit(config_only(LLAMA31_70B), machine(gpu(30, 32)), BNB_OK, None, 1)
    assert check.status == "failure" and check.finding.startswith("Does not fit")


def test_kv_flags_reach_the_report(monkeypatch, llama_1b):
    fake_gpus(monkeypatch, gpu(20))
    per_token = 2 * 16 * 8 * 64 * 2
    _, report = doctor_json("--model-path", str(llama_1b), "--batch-size", "16")
    bf16 = next(r for r in report["fit"]["rows"] if r["precision"] == "bf16")
    assert report["fit"]["kv_tokens"] == 65536 and bf16["kv_cache_bytes"] == 65536 * per_token  # not 16 x 8192
    _, report = doctor_json("--model-path", str(llama_1b), "--batch-size", "16", "--kv-cache-tokens", "4096")
    assert report["fit"]["kv_tokens"] == 4096 and report["fit"]["kv_cache_tokens"] == 4096


def test_fit_table_title_states_the_cap(monkeypatch, llama_1b):
    from typer.testing import CliRunner

    from llmctl.cli.app import app
    from llmctl.server.testing import free_port

    fake_gpus(monkeypatch, gpu(20))
    result = CliRunner().invoke(app, ["doctor", "--model-path", str(llama_1b), "--batch-size", "16", "--port",
                                      str(free_port())], env={"COLUMNS": "200"})
    title = " ".join(result.stdout.split())  # the title wraps at the table's width
    assert "KV cache for 65,536 tokens (16 x 8,192, capped at --kv-cache-tokens 65,536)" in title


@pytest.fixture(scope="module")
def llama_1b(tmp_path_factory, tiny_model) -> Path:
    return make_llama_1b(tmp_path_factory.mktemp("fake"), tiny_model)


# ---- config estimates against transformers' own models ----------------------------------------

def meta_parameters(config: dict) -> int:
    """The parameter count of the model transformers builds from ``config`` (on the meta device: no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    built = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(built)
    return sum(p.numel() for p in model.parameters())


SMALL = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 2,
         "vocab_size": 1000, "hidden_act": "silu"}
MOE_CONFIGS = {
    "qwen3_moe": {**SMALL, "model_type": "qwen3_moe", "intermediate_size": 768, "moe_intermediate_size": 96,
                  "head_dim": 64, "num_experts": 16, "num_experts_per_tok": 4, "tie_word_embeddings": False},
    "qwen3_moe_dense_layers": {**SMALL, "model_type": "qwen3_moe", "intermediate_size": 768,
                               "moe_intermediate_size": 96, "num_experts": 16, "mlp_only_layers": [0],
                               "decoder_sparse_step": 2},
    "mixtral": {**SMALL, "model_type": "mixtral", "intermediate_size": 512, "num_local_experts": 8},
    "qwen2_moe": {**SMALL, "model_type": "qwen2_moe", "intermediate_size": 768, "moe_intermediate_size": 96,
                  "shared_expert_intermediate_size": 384, "num_experts": 16},
    "deepseek_v3": {**SMALL, "model_type": "deepseek_v3", "num_key_value_heads": 8, "intermediate_size": 768,
                    "moe_intermediate_size": 96, "n_routed_experts": 16, "n_shared_experts": 1,
                    "num_experts_per_tok": 4, "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2,
                    "q_lora_rank": 128, "kv_lora_rank": 64, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16,
                    "v_head_dim": 32},
}


@pytest.mark.parametrize("name", list(MOE_CONFIGS))
def test_moe_estimate_within_2_percent_of_transformers(name):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    config = MOE_CONFIGS[name]
    if config["model_type"] not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {config['model_type']}")
    real, estimate = meta_parameters(config), inventory_from_config(config).total
    assert abs(estimate - real) <= 0.02 * real, (name, estimate, real)


def test_qwen3_30b_a3b_is_30b_not_233b():
    estimate = inventory_from_config(QWEN3_30B_A3B)
    assert abs(estimate.total - 30_532_122_624) <= 0.02 * 30_532_122_624, estimate.total
    assert estimate.quantizable < estimate.total


def test_missing_tie_word_embeddings_takes_the_config_class_default():
    # GPT-2's config.json has no tie_word_embeddings; GPT2Config ties by default: 124M, not 163M.
    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768, "n_layer": 12, "n_head": 12,
            "vocab_size": 50257, "n_positions": 1024, "n_ctx": 1024, "activation_function": "gelu_new"}
    assert tied_embeddings(gpt2) is True
    real = meta_parameters(gpt2)
    assert real == 124_439_808 and abs(inventory_from_config(gpt2).total - real) <= 0.02 * real
    # LlamaConfig does not tie by default; an unknown model_type falls back to tied.
    llama = {k: v for k, v in LLAMA3_8B.items() if k != "tie_word_embeddings"}
    assert tied_embeddings(llama) is False and inventory_from_config(llama).total == 8_030_261_248
    assert tied_embeddings({"model_type": "not-a-model", "hidden_size": 8}) is True


# ---- which weight files count ------------------------------------------------------------------

@pytest.fixture()
def sharded(tiny_model, tmp_path) -> Path:
    """The tiny model split into two real shards with their index, as `save_pretrained` writes them."""
    folder = Path(shutil.copytree(tiny_model, tmp_path / "sharded"))
    tensors = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:]), 1):
        shard = f"model-0000{i}-of-00002.safetensors"
        save_file({n: tensors[n] for n in part}, folder / shard, metadata={"format": "pt"})
        weight_map |= {n: shard for n in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("stray", ["consolidated.safetensors", "adapter_model.safetensors"])
def test_stray_weight_files_are_noted_not_counted(tiny_model, sharded, stray):
    shutil.copy(tiny_model / "model.safetensors", sharded / stray)
    checks, info = check_model(sharded)
    weights = next(c for c in checks if c.name == "Weights")
    assert weights.status == "ok" and info.inventory.total == 106_816  # not twice that
    assert weights.details["files"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert weights.details["ignored"] == [stray] and f"not counted: {stray}" in weights.finding
    loaded = load_model(LoadOptions(model_path=sharded, dtype="float32", device="cpu"))
    assert sum(p.numel() for p in loaded.model.parameters()) == 106_816


def test_model_safetensors_beside_an_index_is_what_transformers_loads(tiny_model, sharded):
    # from_pretrained prefers model.safetensors to an index, so the shards are the ones left out.
    shutil.copy(tiny_model / "model.safetensors", sharded / "model.safetensors")
    checks, info = check_model(sharded)
    weights = next(c for c in checks if c.name == "Weights")
    assert weights.status == "ok" and info.inventory.total == 106_816
    assert weights.details["files"] == ["model.safetensors"]
    assert "transformers reads model.safetensors" in weights.finding


def test_only_unloadable_weight_files_fail(model_copy):
    (model_copy / "model.safetensors").rename(model_copy / "consolidated.safetensors")
    checks, _ = check_model(model_copy)
    weights = next(c for c in checks if c.name == "Weights")
    assert weights.status == "failure" and "No weight file transformers loads" in weights.finding
    assert "consolidated.safetensors" in weights.finding
    with pytest.raises(Exception, match="no file named model.safetensors"):  # what serve would hit
        load_model(LoadOptions(model_path=model_copy, dtype="float32", device="cpu"))


@pytest.fixture()
def model_copy(tiny_model, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_model, tmp_path / "model"))


def test_sharded_folder_in_the_cli_report(sharded, tiny_model):
    shutil.copy(tiny_model / "model.safetensors", sharded / "consolidated.safetensors")
    code, report = doctor_json("--model-path", str(sharded))
    assert code == 0 and by_id(report)["fit"]["details"]["parameters"] == 106_816


def test_inventory_is_unchanged_for_a_dense_tiny_model(tiny_model):
    _, info = check_model(tiny_model)
    estimate = inventory_from_config(info.config)
    assert isinstance(estimate, WeightInventory) and estimate.total == info.inventory.total == 106_816
