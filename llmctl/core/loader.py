"""Load a causal LM and its tokenizer with the chosen dtype, device and quantization.

Every check that can fail fast (paths, files, flags, bitsandbytes) runs before the first weight
is read, so a wrong flag costs milliseconds, not a minute of loading.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from llmctl.core import hardware
from llmctl.core.embedded import MODEL_NAME as EMBEDDED_NAME
from llmctl.core.embedded import ensure_embedded_model
from llmctl.core.modelfiles import ModelSource, inspect_model_path, read_config
from llmctl.errors import ModelLoadError

log = logging.getLogger(__name__)

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
Device = Literal["auto", "cpu", "cuda"]
Quantization = Literal["none", "8bit", "4bit"]

# Used when a model ships no chat template: plain "role: content" lines.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
FALLBACK_STOPS = ("\nuser:", "\nsystem:")
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


@dataclass(frozen=True)
class LoadOptions:
    """How to load a model. Validated on creation, so bad combinations fail before any I/O."""

    model_path: Path | None = None
    dtype: Dtype = "auto"
    device: Device = "auto"
    quantization: Quantization = "none"
    max_model_len: int | None = None
    served_model_name: str | None = None

    def __post_init__(self) -> None:
        if self.max_model_len is not None and self.max_model_len < 16:
            raise ModelLoadError("--max-model-len must be at least 16 tokens.")
        if self.quantization != "none" and self.dtype == "float32" and self.device == "cuda":
            log.warning("8-bit/4-bit weights compute in half precision on CUDA; --dtype float32 is ignored there.")

    @staticmethod
    def quantization_from_flags(load_in_8bit: bool, load_in_4bit: bool) -> Quantization:
        if load_in_8bit and load_in_4bit:
            raise ModelLoadError("--load-in-8bit and --load-in-4bit cannot be used together: choose one.")
        return "8bit" if load_in_8bit else "4bit" if load_in_4bit else "none"


@dataclass
class LoadedModel:
    """A model ready to generate, with what the service reports about it."""

    model: Any
    tokenizer: Any
    name: str
    source: ModelSource
    device: str
    dtype: str
    quantization: Quantization
    context_length: int
    eos_token_ids: frozenset[int]
    load_seconds: float
    weights_bytes: int
    default_stops: tuple[str, ...] = field(default_factory=tuple)

    @property
    def input_device(self):
        return self.model.get_input_embeddings().weight.device

    def unload(self) -> None:
        """Drop the weights and give the memory back."""
        self.model = None
        free_memory()


def free_memory() -> None:
    import torch

    gc.collect()
    hardware.trim_heap()
    if hardware.torch_cuda_available():
        torch.cuda.empty_cache()


def resolve_device(device: Device) -> str:
    if device == "auto":
        return "cuda" if hardware.torch_cuda_available() else "cpu"
    if device == "cuda" and not hardware.torch_cuda_available():
        raise ModelLoadError(
            "--device cuda was asked for but PyTorch sees no CUDA device. Check the driver with nvidia-smi, "
            "install a CUDA build of torch, or use --device cpu. `llmctl doctor` shows the details."
        )
    return device


def resolve_dtype(dtype: Dtype, device: str):
    """The torch dtype for a --dtype choice; auto: bf16 where the hardware supports it."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device == "cuda":
        return torch.bfloat16 if hardware.bf16_supported("cuda") else torch.float16
    flags = hardware.cpu_flags()
    # bf16 halves memory traffic; only worth it where the CPU has native bf16 instructions.
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32


def quantization_config(quantization: Quantization, device: str, compute_dtype):
    """The BitsAndBytesConfig for a quantization mode, after checking bitsandbytes can do it here."""
    if quantization == "none":
        return None
    status = hardware.probe_bitsandbytes()
    usable = status.int8 if quantization == "8bit" else status.nf4
    if not usable:
        raise ModelLoadError(f"--load-in-{quantization} needs bitsandbytes: {status.problem}")
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        if device == "cpu":
            log.warning("8-bit weights on CPU are slower than bf16; use them only to save memory.")
        # bitsandbytes' int8 matmul computes in float16 and logs a warning at every call whose input is
        # bf16 or fp32: one line per linear layer per decode step would bury the service's log.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def resolve_source(model_path: Path | None) -> ModelSource:
    if model_path is None:
        return ModelSource(ensure_embedded_model())
    return inspect_model_path(model_path)


def context_length_of(config: dict, cap: int | None) -> int:
    sizes = [config.get(k) for k in CONTEXT_KEYS]
    found = next((s for s in sizes if isinstance(s, int) and s > 0), None)
    if found is None:
        found = cap or 2048
        log.warning("The model config states no context length; assuming %d tokens.", found)
    return min(found, cap) if cap else found


def load_model(options: LoadOptions) -> LoadedModel:
    """Load the model described by ``options`` and log each step with its timing."""
    import torch
    from transformers import AutoModelForCausalLM

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    source = resolve_source(options.model_path)
    started = time.perf_counter()
    if source.is_gguf and options.quantization != "none":
        raise ModelLoadError("--load-in-8bit/--load-in-4bit apply to Hugging Face folders, not GGUF files.")
    quant = quantization_config(options.quantization, device, dtype)
    where = str(source.path)
    log.info(
        "Loading %s (device=%s, dtype=%s, quantization=%s)",
        where, device, str(dtype).removeprefix("torch."), options.quantization,
    )

    kwargs: dict[str, Any] = {"dtype": dtype}
    if source.is_gguf:
        kwargs["gguf_file"] = source.gguf_file
    if quant is not None:
        kwargs["quantization_config"] = quant
        kwargs["device_map"] = "auto" if device == "cuda" else "cpu"
    elif device == "cuda":
        kwargs["device_map"] = "auto"
    tokenizer, default_stops = load_tokenizer(source)
    log.info("Tokenizer loaded in %.2f s", time.perf_counter() - started)
    weights_started = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, **kwargs)
    except torch.OutOfMemoryError as exc:
        raise ModelLoadError(
            "Out of memory while loading the weights. Try --load-in-8bit or --load-in-4bit, a smaller model, "
            "or free the GPU (`llmctl doctor` shows what fits)."
        ) from exc
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"Could not load the model from {where}: {exc}") from exc
    model.eval()
    log.info("Weights loaded in %.2f s", time.perf_counter() - weights_started)

    config = model.config.to_dict() if source.is_gguf else read_config(source.folder)
    eos = eos_ids(getattr(model.generation_config, "eos_token_id", None), tokenizer)
    name = options.served_model_name or (EMBEDDED_NAME if options.model_path is None else source.name)
    free_memory()
    loaded = LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        source=source,
        device=_describe_device(model, device),
        dtype=str(model.dtype).removeprefix("torch."),
        quantization=options.quantization,
        context_length=context_length_of(config, options.max_model_len),
        eos_token_ids=eos,
        load_seconds=time.perf_counter() - started,
        weights_bytes=model.get_memory_footprint(),
        default_stops=default_stops,
    )
    _log_memory(loaded)
    return loaded


def load_tokenizer(source: ModelSource) -> tuple[Any, tuple[str, ...]]:
    """The model's tokenizer, with a plain chat template where it has none (and the stops that template needs)."""
    from transformers import AutoTokenizer

    where = str(source.path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.folder, **({"gguf_file": source.gguf_file} if source.is_gguf else {}))
    except Exception as exc:
        raise ModelLoadError(f"Could not load the tokenizer from {where}: {exc}") from exc
    default_stops: tuple[str, ...] = ()
    if not tokenizer.chat_template:
        log.warning("%s has no chat template; using a plain 'role: content' template.", source.name)
        tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        default_stops = FALLBACK_STOPS
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, default_stops


def eos_ids(configured: int | list[int] | None, tokenizer) -> frozenset[int]:
    """The end-of-sequence ids: the generation config's (one or several) and the tokenizer's."""
    ids: set[int] = set()
    if isinstance(configured, int):
        ids.add(configured)
    elif isinstance(configured, list):
        ids.update(i for i in configured if isinstance(i, int))
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)


def _describe_device(model, device: str) -> str:
    if device != "cuda":
        return "cpu"
    devices = sorted({str(d) for d in getattr(model, "hf_device_map", {}).values()} or {str(model.device)})
    return devices[0] if len(devices) == 1 else f"cuda ({len(devices)} devices: {', '.join(devices)})"


def _log_memory(loaded: LoadedModel) -> None:
    gpu = hardware.gpu_memory()
    log.info(
        "Model %s ready in %.2f s: weights %.3f GiB, context %d tokens, process RSS %.2f GiB%s",
        loaded.name, loaded.load_seconds, loaded.weights_bytes / hardware.GIB, loaded.context_length,
        hardware.process_rss_gb(),
        f", GPU allocated {gpu.allocated_gb:.2f} GiB / reserved {gpu.reserved_gb:.2f} GiB"
        if hardware.torch_cuda_available() else "",
    )


def preflight(options: LoadOptions) -> None:
    """The checks that take milliseconds, run before a server opens its port or a load starts."""
    device = resolve_device(options.device)
    quantization_config(options.quantization, device, resolve_dtype(options.dtype, device))
    files_preflight(options)


def safetensors_folder(options: LoadOptions) -> Path | None:
    """The Hugging Face folder the model loads from when it exists already (the embedded model's once converted),
    for checks that read its weights' headers; None for a GGUF file."""
    if options.model_path is None:
        from llmctl.core.embedded import embedded_model_dir

        folder = embedded_model_dir()
        return folder if (folder / "config.json").is_file() else None
    source = inspect_model_path(options.model_path)
    return None if source.is_gguf else source.folder


def files_preflight(options: LoadOptions) -> None:
    """The checks of the model files (path, config, shards, tokenizer): they need no torch, so they come first."""
    if options.model_path is None:
        from llmctl.core.embedded import embedded_gguf_path, embedded_model_dir

        if not (embedded_model_dir() / "config.json").is_file():
            embedded_gguf_path()
        return
    source = inspect_model_path(options.model_path)
    if source.is_gguf and options.quantization != "none":
        raise ModelLoadError("--load-in-8bit/--load-in-4bit apply to Hugging Face folders, not GGUF files.")
