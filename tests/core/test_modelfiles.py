"""The fast model-path checks that run before any weight is loaded."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llmctl.core.loader import LoadOptions
from llmctl.core.modelfiles import inspect_model_path
from llmctl.errors import ModelLoadError


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_healthy_folder(tiny_model):
    source = inspect_model_path(tiny_model)
    assert source.folder == tiny_model.resolve() and not source.is_gguf


def test_missing_path(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        inspect_model_path(tmp_path / "nope")


def test_no_config(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        inspect_model_path(folder)


def test_bad_config_json(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        inspect_model_path(folder)


def test_no_weights(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no weights"):
        inspect_model_path(folder)


def test_index_names_missing_shard(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing: model-00002-of-00002.safetensors"):
        inspect_model_path(folder)


MALFORMED_INDEXES = [
    ({"weight_map": None}, "it needs a \"weight_map\" object"),
    ({"weight_map": ["model.safetensors"]}, "it needs a \"weight_map\" object"),
    (["model.safetensors"], "it needs a \"weight_map\" object"),
    ({"weight_map": {"lm_head.weight": 5}}, "tensor 'lm_head.weight' maps to 5, not a shard file name"),
]


@pytest.mark.parametrize(("index", "words"), MALFORMED_INDEXES)
def test_malformed_weight_index(tiny_model, tmp_path, index, words):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="is not a valid weight index") as info:
        inspect_model_path(folder)
    assert words in info.value.message


def test_serve_reports_a_malformed_index_in_one_line(tiny_model, tmp_path):
    """`llmctl serve` runs the same checks before it opens its port: one red line, no traceback."""
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": None}))
    command = [sys.executable, "-m", "llmctl", "serve", "--port", "0", "--model-path", str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "COLUMNS": "300"})
    assert result.returncode == 1 and "Traceback" not in result.stderr + result.stdout
    assert "Error:" in result.stderr and "is not a valid weight index" in result.stderr


def test_no_tokenizer(tiny_model, tmp_path):
    folder = copy_model(tiny_model, tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        inspect_model_path(folder)


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"nope")
    with pytest.raises(ModelLoadError, match="not a GGUF model"):
        inspect_model_path(path)


def test_gguf_file_is_accepted(tmp_path):
    path = tmp_path / "m.gguf"
    path.write_bytes(b"GGUF" + b"\0" * 16)
    source = inspect_model_path(path)
    assert source.is_gguf and source.gguf_file == "m.gguf" and source.name == "m"


def test_both_quantization_flags_is_an_error():
    with pytest.raises(ModelLoadError, match="cannot be used together"):
        LoadOptions.quantization_from_flags(True, True)
    assert LoadOptions.quantization_from_flags(False, True) == "4bit"
