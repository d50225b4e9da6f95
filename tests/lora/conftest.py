"""Adapters for the tiny test model, made once per session with PEFT, and the merged models they must equal."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.lora.adapters import make_adapter, merged_model


@pytest.fixture(scope="session")
def adapter_one(tiny_model, tmp_path_factory) -> Path:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "one", seed=1)


@pytest.fixture(scope="session")
def adapter_two(tiny_model, tmp_path_factory) -> Path:
    # Another rank, other layers, rsLoRA scaling: the mixed batch adds different shapes side by side.
    return make_adapter(tiny_model, tmp_path_factory.mktemp("lora") / "two", seed=2, rank=8, alpha=4.0,
                        targets=("q_proj", "k_proj", "up_proj", "down_proj"), use_rslora=True)


@pytest.fixture(scope="session")
def merged_one(tiny_model, adapter_one, tmp_path_factory) -> Path:
    return merged_model(tiny_model, adapter_one, tmp_path_factory.mktemp("merged") / "merged-one")


@pytest.fixture(scope="session")
def merged_two(tiny_model, adapter_two, tmp_path_factory) -> Path:
    return merged_model(tiny_model, adapter_two, tmp_path_factory.mktemp("merged") / "merged-two")
