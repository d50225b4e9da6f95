"""`--speculative-config`: vLLM's JSON shape for speculative decoding, parsed and checked before torch loads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from llmctl.errors import ConfigError

SpeculativeMethod = Literal["ngram", "draft_model"]
FLAG = "--speculative-config"
MAX_SPECULATIVE_TOKENS = 16  # drafts verified per step and row: beyond this a step only grows, never pays
# The keys the builtin engine implements; vLLM's others (EAGLE, MTP, Medusa, tensor parallel drafts) it does not.
BUILTIN_KEYS = {"method", "num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min", "model",
                "disable_by_batch_size"}
# vLLM's names for the methods the builtin engine runs ("draft_model" is its name for a smaller model of the
# same tokenizer; older vLLM builds infer it from "model" alone).
METHODS: tuple[SpeculativeMethod, ...] = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding as the operator asked for it (`parse`); ``raw`` is the JSON object as given,
    which `--engine vllm` passes to vLLM."""

    method: SpeculativeMethod
    num_speculative_tokens: int
    prompt_lookup_max: int = 5
    prompt_lookup_min: int = 5
    model: Path | None = None
    disable_by_batch_size: int | None = None  # rows at which speculation stands down whatever it would gain
    raw: tuple[tuple[str, Any], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """The JSON object the operator gave."""
        return dict(self.raw)

    def describe(self) -> str:
        if self.method == "ngram":
            return (f"n-gram prompt lookup, up to {self.num_speculative_tokens} draft tokens "
                    f"(n-grams of {self.prompt_lookup_min}-{self.prompt_lookup_max})")
        return f"draft model {self.model}, up to {self.num_speculative_tokens} draft tokens"


def parse(text: str, *, strict: bool = True) -> SpeculativeConfig:
    """``text`` (a JSON object, vLLM's `--speculative-config`) checked; ConfigError says what is wrong.

    ``strict``: refuse keys the builtin engine does not implement (vLLM checks its own keys itself)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{FLAG} is not valid JSON ({exc.msg} at character {exc.pos}); "
                          'example: {"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 4}') from None
    if not isinstance(data, dict):
        raise ConfigError(f"{FLAG} must be a JSON object, not {type(data).__name__}")
    if strict and (unknown := sorted(set(data) - BUILTIN_KEYS)):
        raise ConfigError(f"{FLAG}: the builtin engine does not implement {', '.join(map(repr, unknown))}; it takes "
                          f"{', '.join(sorted(BUILTIN_KEYS))} (or run --engine vllm for vLLM's other options)")
    method = data.get("method") or ("draft_model" if data.get("model") else None)
    if method is None:
        raise ConfigError(f'{FLAG} needs "method" ("ngram") or "model" (the path of a draft model)')
    if strict and method not in METHODS:
        raise ConfigError(f"{FLAG}: the builtin engine runs the methods {' and '.join(METHODS)}, not {method!r} "
                          "(--engine vllm may run it where its build has it)")
    k = _int(data, "num_speculative_tokens", None)
    if k is None:
        raise ConfigError(f'{FLAG} needs "num_speculative_tokens" (the most draft tokens verified per step)')
    if not 1 <= k <= MAX_SPECULATIVE_TOKENS and strict:
        raise ConfigError(f"{FLAG}: num_speculative_tokens must be between 1 and {MAX_SPECULATIVE_TOKENS}, not {k}")
    # As vLLM: one of the two bounds given sets the other; neither gives n-grams of exactly 5 tokens.
    high, low = _int(data, "prompt_lookup_max", None), _int(data, "prompt_lookup_min", None)
    high, low = high or low or 5, low or high or 5
    if method == "ngram" and not 1 <= low <= high:
        raise ConfigError(f"{FLAG}: need 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}")
    model = data.get("model")
    if method == "draft_model" and not (isinstance(model, str) and model):
        raise ConfigError(f'{FLAG}: the draft_model method needs "model", the path of the draft model\'s folder')
    if method == "ngram" and model:
        raise ConfigError(f'{FLAG}: "model" goes with the draft_model method, not ngram')
    cap = _int(data, "disable_by_batch_size", None)
    if cap is not None and cap < 1:
        raise ConfigError(f"{FLAG}: disable_by_batch_size must be at least 1")
    return SpeculativeConfig(method=cast(SpeculativeMethod, method), num_speculative_tokens=k,
                             prompt_lookup_max=high, prompt_lookup_min=low,
                             model=Path(model).expanduser() if model else None, disable_by_batch_size=cap,
                             raw=tuple(data.items()))


def check_draft_path(config: SpeculativeConfig) -> None:
    """ConfigError when the draft model's folder is not there (before anything loads)."""
    if config.model is not None and not (config.model / "config.json").is_file():
        raise ConfigError(f"{FLAG}: the draft model {str(config.model)!r} is not a model folder (no config.json)")


def _int(data: dict, key: str, default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{FLAG}: {key} must be a whole number, not {json.dumps(value)}")
    return value
