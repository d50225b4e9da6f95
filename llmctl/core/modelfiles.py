"""Checks of a model folder or GGUF file that run in milliseconds, before any weight is loaded.

`inspect_model_path` raises the first problem as a `ModelLoadError` with a specific fix; the
smaller helpers are shared with `llmctl doctor`, which reports every finding instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llmctl.errors import ModelLoadError

GGUF_MAGIC = b"GGUF"
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Any one of these sets makes a usable tokenizer for transformers' AutoTokenizer.
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"), ("vocab.txt",))


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are: a HF folder, or a folder plus the name of a GGUF file in it."""

    folder: Path
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        if self.gguf_file:
            return Path(self.gguf_file).stem
        return self.folder.name

    @property
    def is_gguf(self) -> bool:
        return self.gguf_file is not None

    @property
    def path(self) -> Path:
        """The GGUF file, or the folder."""
        return self.folder / self.gguf_file if self.gguf_file is not None else self.folder


def is_gguf_file(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def read_config(folder: Path) -> dict:
    """Parse config.json, or raise a ModelLoadError that says what is wrong with it."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{folder} has no config.json, so it is not a Hugging Face model folder. "
            "Point --model-path at the folder that holds config.json, or at a single .gguf file."
        )
    config = _read_json(config_path, "valid JSON")
    if not isinstance(config, dict):
        raise ModelLoadError(f"{config_path} must hold a JSON object.")
    return config


def _read_json(path: Path, what: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path} is not {what} ({exc}).") from exc
    except OSError as exc:
        raise ModelLoadError(f"Cannot read {path}: {exc.strerror}.") from exc


def weight_files(folder: Path) -> list[Path]:
    """The weight files in a folder: safetensors preferred, PyTorch .bin otherwise."""
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return safetensors
    return sorted(p for p in folder.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))


def read_weight_map(index_path: Path) -> dict[str, str]:
    """The ``weight_map`` of a weight index (tensor name -> shard file); a ModelLoadError says why not."""
    index = _read_json(index_path, "a valid weight index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ModelLoadError(f"{index_path} is not a valid weight index: it needs a \"weight_map\" object "
                             "(tensor name -> shard file).")
    bad = next((k for k, v in weight_map.items() if not isinstance(v, str) or not v), None)
    if bad is not None:
        raise ModelLoadError(f"{index_path} is not a valid weight index: tensor {bad!r} maps to "
                             f"{weight_map[bad]!r}, not a shard file name.")
    return weight_map


def missing_shards(folder: Path) -> tuple[Path | None, list[str]]:
    """The weight index in a folder (if any) and the shard files it names that are missing."""
    for index_name in WEIGHT_INDEXES:
        index_path = folder / index_name
        if index_path.is_file():
            weight_map = read_weight_map(index_path)
            shards = sorted(set(weight_map.values()))
            return index_path, [s for s in shards if not (folder / s).is_file()]
    return None, []


def tokenizer_files(folder: Path) -> list[str]:
    """The tokenizer files present in a folder (empty when there is no usable tokenizer)."""
    for names in TOKENIZER_FILE_SETS:
        if all((folder / n).is_file() for n in names):
            return list(names)
    return []


def inspect_model_path(path: Path) -> ModelSource:
    """Check that ``path`` is a loadable model and say exactly what is missing if it is not."""
    path = path.expanduser()
    if not path.exists():
        raise ModelLoadError(f"Model path {path} does not exist.")
    if path.is_file():
        if not is_gguf_file(path):
            raise ModelLoadError(
                f"{path} is a file but not a GGUF model. Pass a .gguf file or a Hugging Face model folder."
            )
        return ModelSource(path.parent.resolve(), path.name)

    folder = path.resolve()
    if not (folder / "config.json").exists():
        ggufs = [p for p in folder.glob("*.gguf") if is_gguf_file(p)]
        if len(ggufs) == 1:
            return ModelSource(folder, ggufs[0].name)
        if len(ggufs) > 1:
            names = ", ".join(sorted(p.name for p in ggufs))
            raise ModelLoadError(f"{folder} holds several GGUF files ({names}); pass one of them as --model-path.")
    read_config(folder)

    index_path, missing = missing_shards(folder)
    if index_path is not None and missing:  # only an index names shards
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(
            f"{index_path.name} in {folder} names {len(missing)} weight shard(s) that are missing: {shown}. "
            "Download the complete model again."
        )
    if index_path is None and not weight_files(folder):
        raise ModelLoadError(
            f"{folder} has a config.json but no weights (*.safetensors or pytorch_model*.bin). "
            "Download the weight files into the same folder."
        )
    if not tokenizer_files(folder):
        raise ModelLoadError(
            f"{folder} has no tokenizer (tokenizer.json, tokenizer.model, or vocab.json + merges.txt). "
            "Copy the tokenizer files of the model into the folder."
        )
    return ModelSource(folder)
