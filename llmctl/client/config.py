"""Client settings, declared once: command-line flag > environment variable > YAML file > default."""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from llmctl import envvars
from llmctl.errors import ConfigError
from llmctl.keyfile import api_key_file_keys

log = logging.getLogger(__name__)

Provider = Literal["self", "together", "openai"]
DEFAULT_URL = "http://127.0.0.1:8080"
TOGETHER_URL = "https://api.together.xyz/v1"
OPENAI_URL = "https://api.openai.com/v1"
MAX_SECONDS = 86400.0  # a day: longer than any request or cool-down anyone means

# Setting -> the environment variable that sets it. API keys are read from the environment only,
# so they never end up in a config file that gets committed.
ENV_VARS: dict[str, str] = {
    "provider": envvars.LLM_PROVIDER,
    "self_hosted_url": envvars.SELF_HOSTED_LLM_URL,
    "temperature": envvars.TEMPERATURE,
    "timeout_seconds": envvars.TIMEOUT_SECONDS,
    "max_tokens": envvars.MAX_TOKENS,
    "retry_attempts": envvars.RETRY_ATTEMPTS,
    "batch_size": envvars.BATCH_SIZE,
    "model_path": envvars.MODEL_PATH,
    "cooldown_seconds": envvars.COOLDOWN_SECONDS,
    "together_base_url": envvars.TOGETHER_BASE_URL,
    "together_model": envvars.TOGETHER_MODEL,
    "openai_base_url": envvars.OPENAI_BASE_URL,
    "openai_model": envvars.OPENAI_MODEL,
    "together_api_key": envvars.TOGETHER_API_KEY,
    "openai_api_key": envvars.OPENAI_API_KEY,
    # The same variable `llmctl serve` reads its keys from, so one export serves both sides.
    "self_hosted_api_key": envvars.API_KEY,
}
SECRETS = ("together_api_key", "openai_api_key", "self_hosted_api_key")


class LLMSettings(BaseModel):
    """The `llm:` section of the config file: which provider answers, and how requests are made."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    provider: Provider = "self"
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.7
    # Bounded: an infinite or huge timeout passes a plain "> 0" check, then overflows in socket.settimeout.
    timeout_seconds: Annotated[float, Field(gt=0, le=MAX_SECONDS, allow_inf_nan=False)] = 60.0
    max_tokens: Annotated[int, Field(ge=1)] = 512
    retry_attempts: Annotated[int, Field(ge=0, le=20)] = 3
    batch_size: Annotated[int, Field(ge=1, le=1024)] = 8
    self_hosted_url: str = DEFAULT_URL
    model_path: str | None = None
    cooldown_seconds: Annotated[float, Field(ge=0, le=MAX_SECONDS, allow_inf_nan=False)] = 60.0
    together_base_url: str = TOGETHER_URL
    together_model: str = "meta-llama/Llama-3.3-70B-Instruct-Turbo"
    openai_base_url: str = OPENAI_URL
    openai_model: str = "gpt-4o-mini"
    together_api_key: SecretStr | None = None
    openai_api_key: SecretStr | None = None
    self_hosted_api_key: SecretStr | None = None

    @field_validator("self_hosted_url", "together_base_url", "openai_base_url")
    @classmethod
    def _http_url(cls, value: str, info) -> str:
        value = value.strip().rstrip("/")
        try:
            parts = urlsplit(value)
            parts.port  # noqa: B018 - raises ValueError for a port that is not a number
        except ValueError as exc:
            raise ValueError(f"not a valid URL ({exc}): {value!r}") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, e.g. {DEFAULT_URL}; "
                             f"got {value!r}")
        if info.field_name == "self_hosted_url" and value.endswith("/v1"):
            # People paste the OpenAI base URL; /health and /metrics live at the root.
            value = value[: -len("/v1")]
        return value

    @field_validator("provider", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("together_api_key", "openai_api_key", "self_hosted_api_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: Any) -> Any:
        if isinstance(value, str):
            # LLMCTL_API_KEY may list several keys for the server; any one of them will do here.
            value = value.split(",")[0].strip()
            return value or None
        return value


class FileValues:
    """The `llm:` mapping of one YAML file, with the line each key is on."""

    def __init__(self, path: Path, values: dict[str, Any], lines: dict[str, int]) -> None:
        self.path, self.values, self.lines = path, values, lines

    def where(self, key: str) -> str:
        return f"{self.path}, line {self.lines[key]}" if key in self.lines else str(self.path)


def read_config_file(path: Path) -> FileValues:
    """Parse ``path`` and return its `llm:` section; errors name the file, the key and the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"Config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"Cannot read config file {path}: {why}") from None
    try:
        # compose() keeps each node's position, which the plain dicts of safe_load() lose.
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{path}{where}: not valid YAML: {problem}.") from None
    if root is None:
        return FileValues(path, {}, {})
    if not isinstance(root, yaml.MappingNode):
        raise ConfigError(f"{path}, line {root.start_mark.line + 1}: the file must be a mapping with an "
                          "'llm:' section.")
    llm_node = next((value for key, value in root.value if key.value == "llm"), None)
    if llm_node is None or data.get("llm") is None:
        return FileValues(path, {}, {})
    if not isinstance(llm_node, yaml.MappingNode):
        line = llm_node.start_mark.line + 1
        raise ConfigError(f"{path}, line {line}: 'llm' must be a mapping of settings.")
    lines: dict[str, int] = {}
    for key_node, _ in llm_node.value:
        key, line = str(key_node.value), key_node.start_mark.line + 1
        if key in lines:
            raise ConfigError(f"{path}, line {line}: llm.{key} is set twice (first on line {lines[key]}).")
        lines[key] = line
    values = {str(k): v for k, v in data["llm"].items()}
    for key in list(values):
        if key not in LLMSettings.model_fields or key in SECRETS:
            close = difflib.get_close_matches(key, [k for k in LLMSettings.model_fields if k not in SECRETS], 1)
            hint = (f"; set {ENV_VARS[key]} in the environment instead" if key in SECRETS
                    else f" (did you mean llm.{close[0]}?)" if close else "")
            log.warning("%s, line %s: ignoring unknown setting llm.%s%s.", path, lines.get(key, "?"), key,
                        hint)
            del values[key]
    return FileValues(path, values, lines)


def load_settings(config: Path | str | None = None, *, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> LLMSettings:
    """Build the settings: ``overrides`` (flags; None means not given) > env vars > config file > defaults.

    The file is ``config``, else the one named by LLMCTL_CONFIG, else none.
    """
    env = os.environ if env is None else env
    path = config or env.get(envvars.CONFIG) or None
    file = read_config_file(Path(path).expanduser()) if path else None
    merged: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if file is not None:
        for key, value in file.values.items():
            merged[key], sources[key] = value, file.where(key)
    for key, var in ENV_VARS.items():
        value = env.get(var)
        if value is not None and value.strip():
            merged[key], sources[key] = value.strip(), f"environment variable {var}"
    sdk_url = env.get(envvars.OPENAI_SDK_BASE_URL, "").strip()
    if "openai_base_url" not in merged and sdk_url:
        # The openai SDK's own variable: set-ups made for it reach the same server unchanged.
        merged["openai_base_url"] = sdk_url
        sources["openai_base_url"] = f"environment variable {envvars.OPENAI_SDK_BASE_URL}"
    key_file = env.get(envvars.API_KEY_FILE, "").strip()
    if "self_hosted_api_key" not in merged and key_file:
        # The file `llmctl serve --api-key-file` reads, so one export serves both sides here too.
        merged["self_hosted_api_key"] = read_api_key_file(Path(key_file).expanduser())
        sources["self_hosted_api_key"] = f"the API key file {key_file} ({envvars.API_KEY_FILE})"
    for key, value in overrides.items():
        if key not in LLMSettings.model_fields:
            raise TypeError(f"unknown setting {key!r}")
        if value is not None:
            merged[key], sources[key] = value, "command line"
    try:
        return LLMSettings.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError(_explain(exc, sources)) from None


def normalize_url(url: str) -> str:
    """The server root: accepts ``http://host:port``, with or without a trailing ``/v1``."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    return url.removesuffix("/v1")


def configured_model_path(config: Path | None, model_path: Path | None) -> Path | None:
    """The model to load: --model-path (or $LLMCTL_MODEL_PATH) if given, else the config file's
    llm.model_path when a config file is named (--config or $LLMCTL_CONFIG), else None (the embedded model)."""
    if config is None and not os.environ.get(envvars.CONFIG):
        return model_path
    configured = load_settings(config, model_path=str(model_path) if model_path else None).model_path
    return Path(configured) if configured else None


def read_api_key_file(path: Path) -> str:
    """The first key in a key file, for the client side."""
    keys = api_key_file_keys(path)
    if not keys:
        raise ConfigError(f"The API key file {path} ({envvars.API_KEY_FILE}) holds no key.")
    return keys[0]


def _explain(exc: ValidationError, sources: dict[str, str]) -> str:
    problems = []
    for error in exc.errors():
        key = str(error["loc"][0]) if error["loc"] else "llm"
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if key in SECRETS else f" (got {error['input']!r})"
        if "got " in message:
            shown = ""
        problems.append(f"{sources.get(key, 'default')}: llm.{key}: {message}{shown}")
    return "Invalid configuration: " + "; ".join(problems)
