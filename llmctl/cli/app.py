"""The root Typer app: wires the commands and applies one error policy to all of them."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import typer
from rich.markup import escape

from llmctl import __version__, envvars
from llmctl.cli import bench, chat, doctor, health, metrics, serve
from llmctl.cli.output import err_console
from llmctl.errors import LLMCtlError

app = typer.Typer(
    name="llmctl",
    help="Run your own OpenAI-compatible chat LLM service, and talk to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(fn: Callable) -> Callable:
    """One error policy: a known error is one red line and exit code 1; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMCtlError as exc:
            if os.environ.get(envvars.DEBUG):
                raise
            err_console.print(f"[red]Error:[/red] {escape(exc.message)}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


app.command("serve")(command(serve.serve))
app.command("bench")(command(bench.bench))
app.command("doctor")(command(doctor.doctor))
app.command("chat")(command(chat.chat))
app.command("health")(command(health.health))
app.command("metrics")(command(metrics.metrics))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    debug: bool = typer.Option(False, "--debug", envvar=envvars.DEBUG, help="Show tracebacks for errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """llmctl: serve a chat model with an OpenAI-compatible API, and check, chat with and benchmark it."""
    if debug:
        os.environ[envvars.DEBUG] = "1"


def main() -> None:
    app()
