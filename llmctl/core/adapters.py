"""LoRA adapter folders (PEFT's `save_pretrained` output): what one holds, checked against the served model's
weights before anything is loaded, with no torch (serve's preflight, `llmctl doctor --lora`, the load route).

An adapter is `adapter_config.json` plus `adapter_model.safetensors`, whose tensors are named
``base_model.model.<module>.lora_A.weight`` ([rank, in]) and ``...lora_B.weight`` ([out, rank]). It fits the
served model when every ``<module>`` is a linear layer of it with that [out, in] shape: the module names
carry the architecture, the shapes the hidden sizes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmctl.errors import ModelLoadError

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_MAX_LORA_RANK = 64
DEFAULT_MAX_LORAS = 8
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,127}")
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
# PEFT options that change what the adapter computes beyond y += scale * B(A(x)) on linear layers: llmctl refuses
# them rather than serve something else than what was trained.
UNSUPPORTED = {"use_dora": "DoRA (use_dora)", "modules_to_save": "modules_to_save (whole replaced layers)",
               "fan_in_fan_out": "fan_in_fan_out (Conv1D layers)", "lora_bias": "lora_bias",
               "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
               "layer_replication": "layer_replication", "use_qalora": "QALoRA", "alora_invocation_tokens": "aLoRA"}


class AdapterError(ModelLoadError):
    """An adapter that cannot be served: its message is one line naming the adapter."""


@dataclass(frozen=True)
class AdapterSpec:
    """An adapter the operator names: ``NAME=PATH``."""

    name: str
    path: Path

    @classmethod
    def parse(cls, text: str) -> AdapterSpec:
        """``NAME=PATH`` (vLLM's --lora-modules also allows a bare PATH, named after its folder, and a JSON object
        with name and path)."""
        text = text.strip()
        if text.startswith("{"):
            try:
                obj = json.loads(text)
                return cls.checked(str(obj["name"]), Path(str(obj["path"])))
            except (ValueError, KeyError, TypeError):
                raise AdapterError(f"--lora {text!r}: a JSON adapter needs \"name\" and \"path\".") from None
        name, sep, path = text.partition("=")
        if not sep:
            return cls.checked(Path(text).name, Path(text))
        return cls.checked(name.strip(), Path(path.strip()))

    @classmethod
    def checked(cls, name: str, path: Path) -> AdapterSpec:
        if not NAME_PATTERN.fullmatch(name):
            raise AdapterError(f"LoRA adapter name {name!r} must be 1-128 letters, digits or ._:/@+- (NAME=PATH).")
        return cls(name, path.expanduser())


@dataclass(frozen=True)
class LoraModule:
    """One adapted linear layer: its low-rank factors' shapes and the scale of their product."""

    rank: int
    in_features: int
    out_features: int
    scale: float


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter folder holds, checked."""

    name: str
    path: Path
    rank: int  # the largest rank of its layers
    modules: dict[str, LoraModule] = field(default_factory=dict)  # module name (as in the base model) -> layer
    weights_bytes: int = 0

    @property
    def weights_file(self) -> Path:
        return self.path / WEIGHTS_FILE


def read_adapter(spec: AdapterSpec, max_rank: int = DEFAULT_MAX_LORA_RANK) -> AdapterInfo:
    """Read and check an adapter folder's files (not yet against a model); raise AdapterError naming it."""
    from safetensors import safe_open

    where = f"LoRA adapter '{spec.name}' ({spec.path})"
    if not spec.path.is_dir():
        raise AdapterError(f"{where}: the folder does not exist.")
    config_path = spec.path / CONFIG_FILE
    if not config_path.is_file():
        raise AdapterError(f"{where}: {CONFIG_FILE} is missing; is it a PEFT adapter folder (save_pretrained)?")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise AdapterError(f"{where}: {CONFIG_FILE} cannot be read: {exc}.") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{where}: {CONFIG_FILE} must hold a JSON object.")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise AdapterError(f"{where}: it is a {config.get('peft_type')} adapter; llmctl serves LoRA adapters.")
    for key, what in UNSUPPORTED.items():
        if config.get(key):
            raise AdapterError(f"{where}: {what} is not supported; merge the adapter instead (merge_and_unload).")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{where}: trained biases (bias={config['bias']!r}) are not supported.")
    if not (spec.path / WEIGHTS_FILE).is_file():
        extra = " (only adapter_model.bin: save it with safe_serialization=True)" \
            if (spec.path / "adapter_model.bin").is_file() else ""
        raise AdapterError(f"{where}: {WEIGHTS_FILE} is missing{extra}.")
    shapes: dict[str, dict[str, list[int]]] = {}
    try:
        with safe_open(str(spec.path / WEIGHTS_FILE), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                match = _KEY.match(key)
                if match is None:
                    raise AdapterError(f"{where}: tensor {key!r} is not a LoRA factor of a linear layer "
                                       "(embedding or other layers are not supported).")
                shapes.setdefault(match[1], {})[match[2]] = list(f.get_slice(key).get_shape())
    except AdapterError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file: say so in one line
        raise AdapterError(f"{where}: {WEIGHTS_FILE} cannot be read: {exc}.") from None
    if not shapes:
        raise AdapterError(f"{where}: {WEIGHTS_FILE} holds no LoRA weights.")
    modules = {}
    for module, pair in shapes.items():
        a, b = pair.get("A"), pair.get("B")
        if a is None or b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise AdapterError(f"{where}: layer {module} lacks a matching lora_A/lora_B pair.")
        rank = a[0]
        if rank > max_rank:
            raise AdapterError(f"{where}: rank {rank} (layer {module}) is above this server's --max-lora-rank "
                               f"{max_rank}.")
        modules[module] = LoraModule(rank, a[1], b[0], _scale(config, module, rank))
    size = (spec.path / WEIGHTS_FILE).stat().st_size
    return AdapterInfo(spec.name, spec.path, max(m.rank for m in modules.values()), modules, size)


def _scale(config: dict, module: str, rank: int) -> float:
    """PEFT's scaling of B @ A for ``module``: lora_alpha (or its alpha_pattern entry) over the rank, or over its
    square root with rsLoRA."""
    alpha = float(config.get("lora_alpha", 8))
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = float(value)
            break
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def check_fits(info: AdapterInfo, linear_shapes: dict[str, tuple[int, int]], model: str) -> None:
    """Raise AdapterError unless every adapted layer is a linear layer of ``model`` (``linear_shapes``: module name
    -> (out, in)) with the adapter's shape."""
    where = f"LoRA adapter '{info.name}' ({info.path})"
    for module, layer in info.modules.items():
        shape = linear_shapes.get(module)
        if shape is None:
            raise AdapterError(f"{where}: it adapts {module}, which {model} does not have as a linear layer; "
                               "was it trained for another model?")
        if shape != (layer.out_features, layer.in_features):
            raise AdapterError(f"{where}: layer {module} is {layer.out_features}x{layer.in_features} in the adapter "
                               f"but {shape[0]}x{shape[1]} in {model}; it was trained for another model size.")


def folder_linear_shapes(folder: Path) -> dict[str, tuple[int, int]] | None:
    """The 2-D weights of a model folder's safetensors files (module name -> (out, in)), read from their headers;
    None when the folder has none (GGUF, .bin): the check then waits for the loaded model."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    shapes: dict[str, tuple[int, int]] = {}
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for key in f.keys():  # noqa: SIM118
                if key.endswith(".weight"):
                    shape = f.get_slice(key).get_shape()
                    if len(shape) == 2:
                        shapes[key.removesuffix(".weight")] = (shape[0], shape[1])
    return shapes


def check_adapters(specs: list[AdapterSpec], model_folder: Path | None, max_rank: int,
                   max_loras: int) -> list[AdapterInfo]:
    """serve's preflight and `llmctl doctor --lora`: every adapter's files, and its fit to the model folder's
    weights when they can be read without loading them."""
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise AdapterError(f"LoRA adapter name '{twice[0]}' is given twice; each adapter needs its own name.")
    if len(specs) > max_loras:
        raise AdapterError(f"{len(specs)} LoRA adapters given but --max-loras is {max_loras}.")
    infos = [read_adapter(s, max_rank) for s in specs]
    shapes = folder_linear_shapes(model_folder) if model_folder is not None else None
    if shapes is not None:
        for info in infos:
            check_fits(info, shapes, model_folder.name if model_folder else "the model")
    return infos
