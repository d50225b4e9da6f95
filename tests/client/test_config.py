"""Client settings: YAML file, environment and flags, their precedence, and the errors for bad values."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl import envvars
from llmctl.cli.app import app
from llmctl.client.config import ENV_VARS, LLMSettings, load_settings
from llmctl.errors import ConfigError

SAMPLE = Path(__file__).resolve().parents[2] / "docs" / "config.sample.yaml"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """The developer's own settings and keys must not leak into these tests."""
    for var in [*ENV_VARS.values(), envvars.CONFIG, envvars.API_KEY_FILE, envvars.OPENAI_SDK_BASE_URL]:
        monkeypatch.delenv(var, raising=False)


def write(tmp_path: Path, text: str, name: str = "llmctl.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file():
    settings = load_settings()
    assert settings == LLMSettings()
    assert settings.provider == "self" and settings.self_hosted_url == "http://127.0.0.1:8080"
    assert settings.together_api_key is None and settings.openai_api_key is None


def test_sample_config_loads_and_matches_the_defaults():
    assert load_settings(SAMPLE) == LLMSettings()


def test_file_values_are_read(tmp_path):
    path = write(tmp_path, """
app:
  name: something else entirely
llm:
  provider: together
  temperature: 0.2
  timeout_seconds: 12.5
  max_tokens: 64
  retry_attempts: 0
  batch_size: 3
  self_hosted_url: http://10.0.0.5:9000/v1/
  model_path: /models/smol
""")
    s = load_settings(path)
    assert (s.provider, s.temperature, s.timeout_seconds, s.max_tokens, s.retry_attempts, s.batch_size) == (
        "together", 0.2, 12.5, 64, 0, 3)
    assert s.self_hosted_url == "http://10.0.0.5:9000"  # the OpenAI-style /v1 suffix is dropped
    assert s.model_path == "/models/smol"


def test_empty_file_and_empty_llm_section_mean_defaults(tmp_path):
    assert load_settings(write(tmp_path, "")) == LLMSettings()
    assert load_settings(write(tmp_path, "llm:\n", "b.yaml")) == LLMSettings()


@pytest.mark.parametrize("layers, expected", [
    ((), 0.7),
    (("file",), 0.1),
    (("file", "env"), 0.2),
    (("file", "env", "flag"), 0.3),
    (("env", "flag"), 0.3),
    (("file", "flag"), 0.3),
])
def test_precedence_flag_over_env_over_file_over_default(tmp_path, monkeypatch, layers, expected):
    path = write(tmp_path, "llm:\n  temperature: 0.1\n") if "file" in layers else None
    if "env" in layers:
        monkeypatch.setenv(envvars.TEMPERATURE, "0.2")
    flag = 0.3 if "flag" in layers else None
    assert load_settings(path, temperature=flag).temperature == expected


def test_precedence_of_the_documented_env_vars(tmp_path, monkeypatch):
    path = write(tmp_path, "llm:\n  provider: openai\n  self_hosted_url: http://file:1\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    assert load_settings(path).provider == "openai"
    monkeypatch.setenv("WEBAGENT_LLM_PROVIDER", "SELF")
    monkeypatch.setenv("SELF_HOSTED_LLM_URL", "http://env:2")
    s = load_settings(path)
    assert s.provider == "self" and s.self_hosted_url == "http://env:2"
    assert load_settings(path, self_hosted_url="http://flag:3").self_hosted_url == "http://flag:3"


def test_config_path_from_env_and_flag_wins(tmp_path, monkeypatch):
    from_env = write(tmp_path, "llm:\n  max_tokens: 11\n", "env.yaml")
    from_flag = write(tmp_path, "llm:\n  max_tokens: 22\n", "flag.yaml")
    monkeypatch.setenv("LLMCTL_CONFIG", str(from_env))
    assert load_settings().max_tokens == 11
    assert load_settings(from_flag).max_tokens == 22


def test_api_keys_come_from_the_environment_and_stay_secret(monkeypatch):
    monkeypatch.setenv("TOGETHER_API_KEY", "tg-secret")
    monkeypatch.setenv("OPENAI_API_KEY", "  ")
    s = load_settings()
    assert s.together_api_key.get_secret_value() == "tg-secret"
    assert s.openai_api_key is None  # blank means unset
    assert "tg-secret" not in repr(s)


def test_a_key_in_the_file_is_ignored_with_a_warning(tmp_path, caplog):
    path = write(tmp_path, "llm:\n  provider: self\n  openai_api_key: sk-in-file\n  temprature: 1\n")
    with caplog.at_level(logging.WARNING, logger="llmctl.client.config"):
        s = load_settings(path)
    assert s.openai_api_key is None
    assert "line 3" in caplog.text and "OPENAI_API_KEY" in caplog.text
    assert "llm.temprature (did you mean llm.temperature?)" in caplog.text and "line 4" in caplog.text


@pytest.mark.parametrize("line, key, words", [
    ("provider: ollama", "llm.provider", "'self', 'together' or 'openai'"),
    ("timeout_seconds: -5", "llm.timeout_seconds", "greater than 0"),
    ("self_hosted_url: localhost:8080", "llm.self_hosted_url", "http:// or https://"),
    ("self_hosted_url: http://host:port", "llm.self_hosted_url", "not a valid URL"),
    ("together_base_url: ftp://example.com", "llm.together_base_url", "http:// or https://"),
    ("max_tokens: many", "llm.max_tokens", "valid integer"),
    ("temperature: 3", "llm.temperature", "less than or equal to 2"),
    ("retry_attempts: -1", "llm.retry_attempts", "greater than or equal to 0"),
    ("batch_size: 0", "llm.batch_size", "greater than or equal to 1"),
    # Each of these passed "> 0", then crashed the first request with OverflowError in socket.settimeout.
    ("timeout_seconds: .inf", "llm.timeout_seconds", "finite number"),
    ("timeout_seconds: 1e400", "llm.timeout_seconds", "finite number"),
    ("timeout_seconds: .nan", "llm.timeout_seconds", "finite number"),
    ("timeout_seconds: 1e12", "llm.timeout_seconds", "less than or equal to 86400"),
    ("cooldown_seconds: .inf", "llm.cooldown_seconds", "finite number"),
])
def test_invalid_values_name_the_key_and_the_line(tmp_path, line, key, words):
    path = write(tmp_path, f"# client settings\nllm:\n  model_path: /models/smol\n  {line}\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = info.value.message
    assert f"{path}, line 4" in message and key in message and words in message


def test_invalid_env_value_names_the_variable(monkeypatch):
    monkeypatch.setenv("LLMCTL_TIMEOUT_SECONDS", "0")
    with pytest.raises(ConfigError, match="environment variable LLMCTL_TIMEOUT_SECONDS: llm.timeout_seconds"):
        load_settings()


@pytest.mark.parametrize("value", ["inf", "1e400", "-inf", "NaN"])
def test_a_timeout_that_is_not_a_finite_number_is_refused(monkeypatch, value):
    monkeypatch.setenv("LLMCTL_TIMEOUT_SECONDS", value)
    with pytest.raises(ConfigError, match="environment variable LLMCTL_TIMEOUT_SECONDS: llm.timeout_seconds"):
        load_settings()


def test_the_service_key_from_LLMCTL_API_KEY_FILE(tmp_path, monkeypatch):
    keys = write(tmp_path, "# keys for the service\n\n  first-key  \nsecond-key\n", "keys.txt")
    monkeypatch.setenv("LLMCTL_API_KEY_FILE", str(keys))
    assert load_settings().self_hosted_api_key.get_secret_value() == "first-key"
    monkeypatch.setenv("LLMCTL_API_KEY", "from-env")  # the variable wins over the file
    assert load_settings().self_hosted_api_key.get_secret_value() == "from-env"


@pytest.mark.parametrize("text, words", [(None, "Cannot read the API key file"), ("# none\n", "holds no key")])
def test_an_unusable_LLMCTL_API_KEY_FILE(tmp_path, monkeypatch, text, words):
    path = tmp_path / "keys.txt"
    if text is not None:
        path.write_text(text)
    monkeypatch.setenv("LLMCTL_API_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match=words):
        load_settings()


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="Config file not found: .*nope.yaml"):
        load_settings(tmp_path / "nope.yaml")


@pytest.mark.parametrize("text, words", [
    ("llm:\n  provider: [self\n", "line 3: not valid YAML"),
    ("- just\n- a list\n", "line 1: the file must be a mapping"),
    ("llm: fast\n", "line 1: 'llm' must be a mapping"),
    ("llm:\n  max_tokens: 1\n  max_tokens: 2\n", "line 3: llm.max_tokens is set twice (first on line 2)"),
])
def test_malformed_files(tmp_path, text, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_settings(write(tmp_path, text))


def test_commands_report_a_bad_config_in_one_line(tmp_path):
    path = write(tmp_path, "llm:\n  provider: selfhosted\n")
    result = CliRunner().invoke(app, ["health", "--config", str(path)])
    stderr = " ".join(result.stderr.split())  # rich wraps long lines at the terminal width
    assert result.exit_code == 1
    assert "Error:" in stderr and "llmctl.yaml, line 2: llm.provider" in stderr
    assert "Traceback" not in result.output


def test_commands_read_LLMCTL_CONFIG(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMCTL_CONFIG", str(tmp_path / "missing.yaml"))
    result = CliRunner().invoke(app, ["metrics"])
    assert result.exit_code == 1 and "Config file not found" in " ".join(result.stderr.split())


def test_openai_sdk_base_url_is_used_when_llmctl_names_none(tmp_path):
    """OPENAI_BASE_URL (the openai SDK's variable) is the openai provider's URL unless llmctl's own setting is given."""
    env = {"OPENAI_BASE_URL": "http://proxy.local:4000/v1/"}
    assert load_settings(env=env).openai_base_url == "http://proxy.local:4000/v1"
    assert load_settings(env={**env, "LLMCTL_OPENAI_BASE_URL": "http://own:1/v1"}).openai_base_url == "http://own:1/v1"
    path = write(tmp_path, "llm:\n  openai_base_url: http://file:2/v1\n")
    assert load_settings(path, env=env).openai_base_url == "http://file:2/v1"
    assert load_settings(env=env, openai_base_url="http://flag:3/v1").openai_base_url == "http://flag:3/v1"
    assert load_settings(env={}).openai_base_url == "https://api.openai.com/v1"
    with pytest.raises(ConfigError, match="OPENAI_BASE_URL"):
        load_settings(env={"OPENAI_BASE_URL": "not a url"})
