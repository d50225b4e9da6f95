"""The engines `llmctl serve` can run, by name: each is a module in llmctl/engine/ plus its options type
(`llmctl.engine.base.EngineOptions`), which holds its own flags, their checks, its preflight and how it is
built. The service only ever sees that type and the `llmctl.engine.Engine` protocol. A new engine is one
module, its options type, and one entry in `EngineName` and `ENGINES`; a flag only it honours is one
field of its options type (and the `llmctl serve` option of that name)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, Field, fields
from typing import TYPE_CHECKING, Any, Literal

from llmctl.engine.builtin_setup import BuiltinOptions
from llmctl.engine.vllm_setup import VllmOptions
from llmctl.errors import ModelLoadError

if TYPE_CHECKING:
    from llmctl.engine.base import EngineOptions

EngineName = Literal["builtin", "vllm"]
ENGINES: dict[str, type[EngineOptions]] = {"builtin": BuiltinOptions, "vllm": VllmOptions}


def engine_options(name: str, flags: Mapping[str, Any]) -> EngineOptions:
    """Engine ``name``'s options from `llmctl serve`'s flags (by parameter name). Another engine's flag set
    away from its default is refused, naming the engine it applies to."""
    chosen = ENGINES[name]
    own = {f.name for f in fields(chosen)}
    for other, options in ENGINES.items():
        for f in fields(options):
            if f.name not in own and f.name in flags and flags[f.name] != _default(f):
                raise ModelLoadError(f"--{f.name.replace('_', '-')} applies to {options.title}: "
                                     f"add --engine {other}.")
    return chosen(**{key: flags[key] for key in own if key in flags})


def _default(f: Field[Any]) -> Any:
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default
