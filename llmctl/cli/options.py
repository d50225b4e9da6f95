"""Option types shared by several commands (one spelling, one help text, one env var)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llmctl import envvars

ConfigOpt = Annotated[Path | None, typer.Option(
    "--config", envvar=envvars.CONFIG, dir_okay=False, show_default=False,
    help="YAML file with an 'llm:' section (see docs/config.sample.yaml).")]
UrlOpt = Annotated[str | None, typer.Option(
    "--url", show_default=False,
    help=f"Base URL of the llmctl service. Default: ${envvars.SELF_HOSTED_LLM_URL}, else the config's "
    "self_hosted_url, else http://127.0.0.1:8080.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON only.")]
ModelPathOpt = Annotated[Path | None, typer.Option(
    "--model-path", "--model_path", envvar=envvars.MODEL_PATH,
    help="A Hugging Face model folder or a .gguf file. Default: the embedded SmolLM2-135M-Instruct.")]
