"""`llmctl router`: the command it runs, and what it refuses before starting the router."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmctl.cli import router as router_cli
from llmctl.cli.app import app
from llmctl.core.loader import LoadOptions
from llmctl.errors import ConfigError
from llmctl.server.service import Service, ServiceSettings
from llmctl.server.testing import serve_in_thread

runner = CliRunner()
ROUTER_MISSING = (router_cli.shutil.which("vllm-router", path=str(Path(router_cli.sys.executable).parent)) is None
                  and router_cli.shutil.which("vllm-router") is None)


def dry_run(*args: str):
    return runner.invoke(app, ["router", "--dry-run", *args])


@pytest.mark.skipif(ROUTER_MISSING, reason="the cluster extra is not installed")
def test_dry_run_prints_the_router_command_with_llmctls_defaults():
    result = dry_run("--worker-url", "http://10.0.0.2:8080,http://10.0.0.3:8080/v1/", "--worker-url",
                     "http://10.0.0.4:8080", "--api-key", "s3cret", "--", "--log-level", "debug")
    assert result.exit_code == 0, result.output
    argv = result.output.split()
    assert argv[0].endswith("vllm-router")
    urls = argv[argv.index("--worker-urls") + 1: argv.index("--host")]
    assert urls == ["http://10.0.0.2:8080", "http://10.0.0.3:8080", "http://10.0.0.4:8080"]
    assert argv[argv.index("--policy") + 1] == "cache_aware"
    assert argv[argv.index("--health-check-interval-secs") + 1] == "5"
    assert argv[argv.index("--retry-max-retries") + 1] == "5"
    assert argv[argv.index("--cb-failure-threshold") + 1] == "2"
    assert argv[argv.index("--api-key") + 1] == "'***'" and "s3cret" not in result.output
    assert argv[-2:] == ["--log-level", "debug"]


@pytest.mark.skipif(ROUTER_MISSING, reason="the cluster extra is not installed")
def test_an_open_router_without_a_key_is_pointed_out():
    opened = dry_run("--worker-url", "http://10.0.0.2:8080")
    assert opened.exit_code == 0 and "without --api-key" in opened.output
    local = dry_run("--worker-url", "http://10.0.0.2:8080", "--host", "127.0.0.1")
    keyed = dry_run("--worker-url", "http://10.0.0.2:8080", "--api-key", "k")
    assert "without --api-key" not in local.output + keyed.output


@pytest.mark.parametrize(("args", "message"), [
    (["--worker-url", "10.0.0.2:8080"], "needs its scheme"),
    (["--worker-url", " , "], "Give the replicas' URLs"),
    (["--worker-url", "http://a:1", "--policy", "fastest"], "fastest"),
])
def test_bad_options_are_one_clear_error(args, message):
    result = dry_run(*args)
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_a_missing_router_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setattr(router_cli.sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match=r"llmctl\[cluster\]"):
        router_cli.router_binary()


def test_replicas_serving_different_models_are_refused(tiny_service, tiny_model, capsys):
    renamed = Service(ServiceSettings(load=LoadOptions(model_path=tiny_model, dtype="float32", device="cpu",
                                                       served_model_name="other-model")))
    renamed.load()
    try:
        with serve_in_thread(tiny_service) as first, serve_in_thread(renamed) as second:
            router_cli.check_workers([first])
            with pytest.raises(ConfigError, match="serve different models"):
                router_cli.check_workers([first, second, "http://127.0.0.1:9"])
    finally:
        renamed.shutdown()
    assert "http://127.0.0.1:9 is unreachable" in capsys.readouterr().err.replace("\n", "")
