"""The engine registry: each engine's options type holds its own `llmctl serve` flags, and a flag of another
engine is refused by name before anything loads (the CLI path: tests/server/test_serve_process.py)."""

from __future__ import annotations

import inspect
from dataclasses import fields
from typing import get_args

import pytest

from llmctl.cli.serve import serve
from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.errors import ModelLoadError
from llmctl.server.engines import ENGINES, EngineName, engine_options


def test_every_engine_named_on_the_command_line_is_registered():
    assert set(get_args(EngineName)) == set(ENGINES)


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_each_option_of_an_engine_is_a_serve_flag(name):
    flags = inspect.signature(serve).parameters
    for field in fields(ENGINES[name]):
        assert field.name in flags, f"{ENGINES[name].__name__}.{field.name} has no --{field.name} on llmctl serve"
        assert flags[field.name].default == field.default, f"--{field.name}'s default differs from its option's"


def test_options_are_built_from_the_chosen_engines_flags():
    flags = {"attention": "grouped", "max_prefill_tokens": None, "tensor_parallel_size": 1, "enforce_eager": False,
             "port": 8080}
    assert engine_options("builtin", flags) == BuiltinOptions(attention="grouped")
    flags = {"attention": "auto", "tensor_parallel_size": 2, "enforce_eager": True}
    assert engine_options("vllm", flags) == VllmOptions(tensor_parallel_size=2, enforce_eager=True)


@pytest.mark.parametrize(("name", "flags", "message"), [
    ("builtin", {"tensor_parallel_size": 2}, "--tensor-parallel-size applies to vLLM's engine: add --engine vllm."),
    ("builtin", {"distributed_executor_backend": "mp"}, "--distributed-executor-backend applies to vLLM's engine"),
    ("vllm", {"prefill_wait_ms": 5.0}, "--prefill-wait-ms applies to the builtin engine: add --engine builtin."),
])
def test_another_engines_flag_is_refused_by_name(name, flags, message):
    with pytest.raises(ModelLoadError) as caught:
        engine_options(name, flags)
    assert caught.value.message == message or caught.value.message.startswith(message)
