"""The client commands (chat, health, metrics, --help, --version) start without importing torch."""

from __future__ import annotations

import importlib
import inspect
import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from llmctl.cli.app import LAZY, app
from llmctl.client.config import ENV_VARS
from llmctl.server.testing import free_port

PROBE = """
import sys
from typer.testing import CliRunner
from llmctl.cli.app import app
down = sys.argv[1]
for args in (["--help"], ["--version"], ["chat", "--help"], ["health", "--url", down],
             ["metrics", "--url", down], ["chat", "hi", "--url", down]):
    code = CliRunner().invoke(app, args).exit_code
    print(" ".join(args[:1]), code)
print("heavy:", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "transformers", "accelerate"}))
"""


def test_client_commands_do_not_import_torch():
    """torch alone takes seconds to import; `llmctl health` in a script's loop should not pay that."""
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS.values()} | {"LLMCTL_RETRY_ATTEMPTS": "0"}
    done = subprocess.run([sys.executable, "-c", PROBE, f"http://127.0.0.1:{free_port()}"], capture_output=True,
                          text=True, timeout=120, env=env)
    lines = done.stdout.splitlines()
    assert lines == ["--help 0", "--version 0", "chat 0", "health 2", "metrics 2", "chat 1", "heavy: []"], \
        done.stdout + done.stderr


@pytest.mark.parametrize("name", list(LAZY))
def test_the_heavy_commands_are_listed_with_their_own_summary_and_still_run(name):
    module, summary = LAZY[name]
    doc = inspect.getdoc(getattr(importlib.import_module(module), name)) or ""
    assert " ".join(doc.split("\n\n")[0].split()) == summary
    listing = CliRunner().invoke(app, ["--help"])
    assert listing.exit_code == 0 and name in listing.stdout
    own = CliRunner().invoke(app, [name, "--help"])
    assert own.exit_code == 0 and f"Usage: llmctl {name} [OPTIONS]" in own.stdout

