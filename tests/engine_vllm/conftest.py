"""vLLM's CPU build, for real: one engine per module (building it takes a while), on a tiny model saved here.

These tests skip where vLLM is not installed (the plain `make test`), unless LLMCTL_REQUIRE_VLLM=1,
which `make test-vllm` (and so CI) sets: there a missing vLLM is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from llmctl.server.testing import build_tiny_model

VLLM_MISSING = importlib.util.find_spec("vllm") is None and os.environ.get("LLMCTL_REQUIRE_VLLM") != "1"


def pytest_collection_modifyitems(config, items):
    if VLLM_MISSING:
        skip = pytest.mark.skip(reason="vLLM is not installed (make install ENGINE=vllm; CI runs make test-vllm)")
        for item in items:
            if "engine_vllm" in str(item.path):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def vllm_model(tmp_path_factory) -> Path:
    """A tiny random Llama whose head size (64) vLLM's CPU attention kernels support."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm") / "tiny-llama", hidden=256, context=1024)
