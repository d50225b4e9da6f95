"""Predict the memory a model needs in each precision from its file headers or config, loading no weight."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MIB = 1024**2
GIB = 1024**3
# Bytes per element of each safetensors dtype.
SAFETENSORS_DTYPES = {
    "F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2,
    "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "BOOL": 1, "F4": 0.5, "F6_E2M3": 0.75,
    "F6_E3M2": 0.75,
}
MAX_HEADER_BYTES = 100 * MIB  # the safetensors library's own limit
# NF4 with double quantization (what --load-in-4bit uses): 4 bits per weight, one 8-bit absmax per
# block of 64 weights, one fp32 absmax per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
# LLM.int8 keeps one fp32 scale per output row of each quantized layer.
INT8_ROW_SCALE_BYTES = 4
# Not weights or KV cache: the CUDA context (one per GPU) or PyTorch runtime, plus activations and
# allocator slack.
RUNTIME_BYTES = 512 * MIB
ACTIVATION_FRACTION = 0.05
# `llmctl serve --kv-cache-tokens`' default (EngineConfig.kv_cache_tokens; a test keeps them equal), here
# so that predicting a fit imports no torch.
SERVE_KV_CACHE_TOKENS = 65536
# A KV cache smaller than this holds too little to be worth suggesting instead of quantizing.
MIN_USEFUL_KV_TOKENS = 2048
# Tensors bitsandbytes leaves in 16-bit: input and output embeddings (transformers skips the output
# layer by default, so the prediction must too). "embed" also covers GPT-NeoX's output layer, embed_out.
_KEPT_NAME_PARTS = ("embed", "wte", "wpe", "lm_head", "token_embd", "position", "shared.weight")


class WeightFileError(ValueError):
    """A weight file is damaged; the message says how."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """The tensors a .safetensors file declares, read from its JSON header without touching the data."""
    size = path.stat().st_size
    if size < 8:
        raise WeightFileError(f"{path.name} is {size} bytes: too short to be a safetensors file.")
    with path.open("rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise WeightFileError(
                f"{path.name} declares a {length:,}-byte header in a {size:,}-byte file: "
                "not a safetensors file, or it was cut short."
            )
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise WeightFileError(f"{path.name} has a corrupt header (not JSON: {exc}).") from exc
    if not isinstance(header, dict):
        raise WeightFileError(f"{path.name} has a corrupt header (not a JSON object).")
    data_bytes = size - 8 - length
    tensors, end = [], 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            shape = tuple(int(d) for d in info["shape"])
            start, stop = (int(o) for o in info["data_offsets"])
            width = SAFETENSORS_DTYPES[info["dtype"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise WeightFileError(f"{path.name} has a corrupt header entry for {name!r} ({exc!r}).") from exc
        tensor = TensorInfo(name, shape)
        if stop - start != int(tensor.numel * width):
            raise WeightFileError(f"{path.name}: tensor {name!r} has {stop - start:,} bytes, its shape needs "
                                  f"{int(tensor.numel * width):,}. The file is corrupt.")
        tensors.append(tensor)
        end = max(end, stop)
    if end > data_bytes:
        raise WeightFileError(
            f"{path.name} is cut short: its header places tensor data up to byte {end:,}, "
            f"but the file holds only {data_bytes:,} bytes of data (an interrupted download)."
        )
    return tensors


@dataclass(frozen=True)
class WeightInventory:
    """A model's parameter count, split into what bitsandbytes quantizes and what it keeps in 16-bit."""

    source: Literal["safetensors", "gguf", "config"]
    total: int
    quantizable: int
    quantizable_rows: int

    @property
    def kept(self) -> int:
        return self.total - self.quantizable


def _quantizable(name: str, shape: tuple[int, ...]) -> bool:
    """Whether bitsandbytes turns this tensor into 8/4-bit: 2-D linear weights other than the embeddings."""
    lowered = name.lower()
    if len(shape) != 2 or not lowered.endswith("weight") or any(p in lowered for p in _KEPT_NAME_PARTS):
        return False
    return lowered != "output.weight"  # GGUF's name for the output layer


def inventory_from_tensors(tensors: Iterable[TensorInfo],
                           source: Literal["safetensors", "gguf"]) -> WeightInventory:
    total = quantizable = rows = 0
    for t in tensors:
        total += t.numel
        if _quantizable(t.name, t.shape):
            quantizable += t.numel
            # torch stores Linear weights as (out, in); GGUF lists dimensions innermost first.
            rows += t.shape[0] if source == "safetensors" else t.shape[-1]
    return WeightInventory(source, total, quantizable, rows)


def _first(config: dict, *keys: str) -> Any:
    return next((config[k] for k in keys if isinstance(config.get(k), int) and config[k] > 0), None)


def text_config(config: dict) -> dict:
    """The language model's part of a config: its text_config where it has one (multimodal models)."""
    return config["text_config"] if isinstance(config.get("text_config"), dict) else config


@dataclass(frozen=True)
class Attention:
    """What sizes the KV cache: per token, a key and a value vector per layer and KV head."""

    layers: int
    kv_heads: int
    head_dim: int

    def kv_bytes_per_token(self, bytes_per_element: float) -> int:
        return int(2 * self.layers * self.kv_heads * self.head_dim * bytes_per_element)


def attention_from_config(config: dict) -> Attention | None:
    config = text_config(config)
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    layers = _first(config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(config, "num_attention_heads", "n_head")
    if not (hidden and layers and heads):
        return None
    kv_heads = _first(config, "num_key_value_heads", "n_head_kv", "num_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if config.get("multi_query") else heads
    head_dim = _first(config, "head_dim") or hidden // heads
    return Attention(layers, kv_heads, head_dim)


def tied_embeddings(config: dict) -> bool:
    """Whether the output layer shares the input embedding's weights, as transformers decides it.

    A config.json without the key gets its config class's default (True for GPT-2 and Gemma, False
    for Llama and Qwen), so that class is asked; True where transformers does not know the model.
    """
    for part in (text_config(config), config):
        if isinstance(part.get("tie_word_embeddings"), bool):
            return part["tie_word_embeddings"]
    model_type = config.get("model_type")
    if not isinstance(model_type, str):
        return True
    try:
        from transformers import AutoConfig

        resolved = AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    except Exception:  # an unknown model_type, or values its config class rejects
        return True
    for section in (resolved.get_text_config(), resolved):
        tied = getattr(section, "tie_word_embeddings", None)
        if isinstance(tied, bool):
            return tied
    return True


def _attention_linear(config: dict, hidden: int, heads: int, attention: Attention) -> tuple[int, int, int]:
    """One layer's attention projections: parameters, output rows, and the weights of its extra norms."""
    kv_rank = _first(config, "kv_lora_rank")
    if kv_rank:  # DeepSeek's multi-head latent attention: keys and values go through a low-rank latent
        rope = _first(config, "qk_rope_head_dim") or 0
        nope = _first(config, "qk_nope_head_dim") or 0
        v = _first(config, "v_head_dim") or nope + rope
        q_rank = _first(config, "q_lora_rank")
        q_out = heads * (nope + rope)
        if q_rank:
            q_params, q_rows = hidden * q_rank + q_rank * q_out, q_rank + q_out
        else:
            q_params, q_rows = hidden * q_out, q_out
        kv_out = heads * (nope + v)
        params = q_params + hidden * (kv_rank + rope) + kv_rank * kv_out + heads * v * hidden
        return params, q_rows + kv_rank + rope + kv_out + hidden, (q_rank or 0) + kv_rank
    hd, kv = attention.head_dim, attention.kv_heads
    params = hidden * heads * hd + 2 * hidden * kv * hd + heads * hd * hidden
    return params, heads * hd + 2 * kv * hd + hidden, 0


def _mlp(hidden: int, inter: int, gated: bool) -> tuple[int, int]:
    """Parameters and output rows of one MLP: gate (when gated), up and down projections."""
    mats = 3 if gated else 2
    return mats * hidden * inter, (mats - 1) * inter + hidden


def _is_moe_layer(config: dict, index: int) -> bool:
    """Whether layer ``index`` holds experts: Qwen-MoE's mlp_only_layers and decoder_sparse_step,
    DeepSeek's and GLM's first_k_dense_replace and moe_layer_freq leave some layers dense."""
    if index in (config.get("mlp_only_layers") or ()):
        return False
    first_dense = config.get("first_k_dense_replace")
    if isinstance(first_dense, int) and index < first_dense:
        return False
    step = _first(config, "decoder_sparse_step") or 1
    freq = _first(config, "moe_layer_freq") or 1
    return (index + 1) % step == 0 and index % freq == 0


def _mlp_layers(config: dict, layers: int, hidden: int, gated: bool) -> tuple[int, int]:
    """Parameters and output rows of every layer's MLP, dense or a mixture of experts."""
    dense_inter = _first(config, "intermediate_size", "n_inner", "ffn_dim") or 4 * hidden
    dense = _mlp(hidden, dense_inter, gated)
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 0
    if experts < 2:
        return layers * dense[0], layers * dense[1]
    # Qwen-MoE and DeepSeek give their experts a narrower MLP than the dense layers (Mixtral does not).
    expert_inter = _first(config, "moe_intermediate_size") or dense_inter
    expert = _mlp(hidden, expert_inter, gated)
    params, rows = experts * (expert[0] + hidden), experts * (expert[1] + 1)  # + the router's row per expert
    shared_inter = (_first(config, "shared_expert_intermediate_size")
                    or (_first(config, "n_shared_experts") or 0) * expert_inter)
    if shared_inter:
        shared = _mlp(hidden, shared_inter, gated)
        params, rows = params + shared[0], rows + shared[1]
        if _first(config, "shared_expert_intermediate_size"):  # Qwen2-MoE gates its shared expert
            params, rows = params + hidden, rows + 1
    sparse = sum(_is_moe_layer(config, i) for i in range(layers))
    return sparse * params + (layers - sparse) * dense[0], sparse * rows + (layers - sparse) * dense[1]


def _learned_positions(config: dict) -> int:
    """Rows of a learned position embedding (GPT-2 style n_positions), 0 for rotary models."""
    rotary = any(config.get(k) for k in ("rotary_dim", "rope_theta", "rope_scaling", "rope_parameters"))
    return 0 if rotary else _first(config, "n_positions") or 0


def inventory_from_config(config: dict) -> WeightInventory | None:
    """An estimate for a decoder-only transformer (dense or mixture of experts), when no weight header can be
    read."""
    text = text_config(config)
    attention = attention_from_config(text)
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    vocab = _first(text, "vocab_size")
    if attention is None or vocab is None:
        return None
    heads = _first(text, "num_attention_heads", "n_head")
    act = str(text.get("hidden_act") or text.get("activation_function") or "")
    gated = act in ("silu", "swish", "swiglu") or str(text.get("model_type", "")).startswith("gemma")
    attn, attn_rows, attn_norms = _attention_linear(text, hidden, heads, attention)
    mlp, mlp_rows = _mlp_layers(text, attention.layers, hidden, gated)
    linear = attention.layers * attn + mlp
    rows = attention.layers * attn_rows + mlp_rows
    embeddings = vocab * hidden * (1 if tied_embeddings(config) else 2) + _learned_positions(text) * hidden
    norms = (2 * attention.layers + 1) * hidden + attention.layers * attn_norms
    return WeightInventory("config", linear + embeddings + norms, linear, rows)


def context_length_of(config: dict) -> int | None:
    """The model's context length as its config states it."""
    from llmctl.core.loader import CONTEXT_KEYS

    return _first(text_config(config), *CONTEXT_KEYS)


Precision = Literal["fp32", "bf16", "fp16", "8bit", "4bit"]
LABELS: dict[str, str] = {"fp32": "fp32", "bf16": "bf16", "fp16": "fp16", "8bit": "8-bit", "4bit": "4-bit"}
FLAGS: dict[str, str] = {"fp32": "--dtype float32", "bf16": "--dtype bfloat16", "fp16": "--dtype float16",
                         "8bit": "--load-in-8bit", "4bit": "--load-in-4bit"}


def weights_bytes(inventory: WeightInventory, precision: Precision, compute_bytes: int = 2) -> int:
    """Memory the weights take in ``precision``; 8/4-bit keep the embeddings in the compute dtype."""
    if precision == "fp32":
        return 4 * inventory.total
    if precision in ("bf16", "fp16"):
        return 2 * inventory.total
    kept = inventory.kept * compute_bytes
    if precision == "8bit":
        return inventory.quantizable + inventory.quantizable_rows * INT8_ROW_SCALE_BYTES + kept
    return int(inventory.quantizable * NF4_BYTES_PER_PARAM) + kept


@dataclass(frozen=True)
class FitRow:
    """One precision: what it needs, and whether llmctl can load the model that way here."""

    precision: Precision
    default: bool
    weights_bytes: int
    kv_bytes: int
    runtime_bytes: int
    usable: bool = True
    note: str = ""
    kv_bytes_per_token: int = 0

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_bytes + self.runtime_bytes

    @property
    def label(self) -> str:
        return LABELS[self.precision]

    @property
    def flag(self) -> str:
        return "" if self.default else FLAGS[self.precision]


@dataclass(frozen=True)
class FitPrediction:
    """Which precision makes the model fit in the memory that is free, and the numbers behind it."""

    device: Literal["cuda", "cpu"]
    available_bytes: int
    context_length: int
    batch_size: int
    rows: tuple[FitRow, ...]
    choice: FitRow | None
    kv_cache_tokens: int = SERVE_KV_CACHE_TOKENS
    devices: int = 1

    @property
    def kv_tokens(self) -> int:
        """KV-cache slots counted: a batch of full contexts, but never more than serve's budget holds."""
        return min(self.context_length * self.batch_size, self.kv_cache_tokens)

    def fits(self, row: FitRow) -> bool:
        return row.total_bytes <= self.available_bytes

    def kv_tokens_that_fit(self, row: FitRow) -> int:
        """The most KV-cache slots that fit beside this precision's weights and runtime, rounded down."""
        room = self.available_bytes - row.weights_bytes - row.runtime_bytes
        if room <= 0:
            return 0
        if not row.kv_bytes_per_token:  # no attention shape known: the cache cannot be sized
            return self.kv_tokens
        n = min(room // row.kv_bytes_per_token, self.kv_tokens)
        return n if n == self.kv_tokens else n - n % (1024 if n >= 2048 else 16)

    def smaller_kv(self) -> tuple[FitRow, int] | None:
        """The precision to use with a smaller KV cache, when none fits with the full one.

        The default first, then the least lossy that can load here; None when even the weights do not
        fit, or the cache left would be too small to be worth it.
        """
        least = min(self.kv_tokens, MIN_USEFUL_KV_TOKENS)
        order = sorted(self.rows, key=lambda r: (not r.default, -r.total_bytes))
        for row in order:
            if row.usable and not self.fits(row) and self.kv_tokens_that_fit(row) >= least:
                return row, self.kv_tokens_that_fit(row)
        return None

    def to_dict(self) -> dict:
        return {
            "device": self.device, "available_bytes": self.available_bytes, "devices": self.devices,
            "context_length": self.context_length, "batch_size": self.batch_size,
            "kv_cache_tokens": self.kv_cache_tokens, "kv_tokens": self.kv_tokens,
            "choice": self.choice.precision if self.choice else None,
            "flag": self.choice.flag if self.choice else None,
            "rows": [{"precision": r.precision, "flag": FLAGS[r.precision], "default": r.default,
                      "weights_bytes": r.weights_bytes, "kv_cache_bytes": r.kv_bytes,
                      "runtime_bytes": r.runtime_bytes, "total_bytes": r.total_bytes,
                      "fits": self.fits(r), "kv_tokens_that_fit": self.kv_tokens_that_fit(r),
                      "usable": r.usable, "note": r.note} for r in self.rows],
        }


def predict_fit(inventory: WeightInventory, attention: Attention | None, *, context_length: int,
                batch_size: int, available_bytes: int, device: Literal["cuda", "cpu"], default: Precision,
                quantization_problem: dict[str, str | None] | None = None,
                kv_cache_tokens: int = SERVE_KV_CACHE_TOKENS, devices: int = 1) -> FitPrediction:
    """Memory per precision: weights + KV cache + runtime.

    The KV cache holds ``batch_size`` x ``context_length`` tokens, but at most ``kv_cache_tokens``:
    serve grows its cache as sequences need it and never past that budget over all of them.
    ``default`` is the precision `llmctl serve` picks on its own here; ``quantization_problem`` maps
    "8bit"/"4bit" to why that mode cannot be used (None where it can). ``devices`` is the number of
    GPUs serve spreads the model over: each holds its own CUDA context.
    """
    problems = quantization_problem or {}
    compute_bytes = 4 if default == "fp32" else 2
    half: Precision = "fp16" if default == "fp16" else "bf16"
    kv_tokens = min(context_length * batch_size, kv_cache_tokens)
    rows = []
    precisions: tuple[Precision, ...] = ("fp32", half, "8bit", "4bit")
    for precision in precisions:
        kv_element = 4 if precision == "fp32" else 2 if precision in ("bf16", "fp16") else compute_bytes
        weights = weights_bytes(inventory, precision, compute_bytes)
        per_token = attention.kv_bytes_per_token(kv_element) if attention else 0
        runtime = RUNTIME_BYTES * max(1, devices) + int(ACTIVATION_FRACTION * weights)
        problem = problems.get(precision)
        rows.append(FitRow(precision, precision == default, weights, per_token * kv_tokens, runtime,
                           problem is None, problem or "", per_token))
    # The default first, then the least lossy precision that fits.
    order = sorted(rows, key=lambda r: (not r.default, -r.total_bytes))
    choice = next((r for r in order if r.usable and r.total_bytes <= available_bytes), None)
    return FitPrediction(device, available_bytes, context_length, batch_size, tuple(rows), choice,
                         kv_cache_tokens, max(1, devices))


def fmt_bytes(n: float) -> str:
    """Bytes for people: KiB below 1 MiB, MiB below 1 GiB, GiB above."""
    if n >= GIB:
        return f"{n / GIB:.1f} GiB"
    return f"{n / MIB:.1f} MiB" if n >= MIB else f"{n / 1024:.1f} KiB"
