"""The root Typer app: wires the commands and applies one error policy to all of them."""

from __future__ import annotations

import functools
import importlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from llmctl import __version__, envvars
from llmctl.cli import chat, health, metrics, router
from llmctl.cli.output import err_console
from llmctl.errors import LLMCtlError

if TYPE_CHECKING:
    # Typer (0.29 on) builds its commands of a click of its own, not of the click package: its groups take and
    # hold these types, which it exports under no public name.
    from typer._click import Command, Context

# serve, bench and doctor import torch and transformers (seconds of start-up); chat, health and
# metrics are plain HTTP clients. So the heavy three are imported only when one of them runs, and
# `llmctl --help` lists them with these summaries (tests check they match the real docstrings).
LAZY: dict[str, tuple[str, str]] = {
    "serve": ("llmctl.cli.serve", "Serve a chat model with an OpenAI-compatible API "
              "(/v1/chat/completions, /v1/models, /health, /metrics)."),
    "bench": ("llmctl.cli.bench", "Benchmark chat completions: TTFT, TPOT, ITL, E2E latency and "
              "throughput per concurrency level."),
    "doctor": ("llmctl.cli.doctor", "Check the machine, the model and the service, and say what to fix, "
               "without loading any weights."),
}


def command(fn: Callable) -> Callable:
    """One error policy: a known error is one red line and exit code 1; --debug shows the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LLMCtlError as exc:
            if os.environ.get(envvars.DEBUG):
                raise
            # One line however long (a path, say), so that log collectors keep it as one record.
            err_console.print(f"[red]Error:[/red] {escape(exc.message)}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    return wrapper


def load_command(name: str) -> Command:
    """Import one of the heavy commands and build its click command, with the same error policy."""
    module, _ = LAZY[name]
    single = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    single.command(name)(command(getattr(importlib.import_module(module), name)))
    return typer.main.get_command(single)


class StandIn(TyperCommand):
    """A heavy command's summary in `llmctl --help`, replaced by the real command when it is invoked."""


class LazyGroup(TyperGroup):
    """The root group: serve, bench and doctor stand in as summaries until one of them is invoked."""

    def __init__(self, *, commands: dict[str, Command] | None = None, **kwargs: Any) -> None:
        stand_ins: dict[str, Command] = {name: StandIn(name, help=summary) for name, (_, summary) in LAZY.items()}
        super().__init__(commands={**stand_ins, **(commands or {})}, **kwargs)

    def resolve_command(self, ctx: Context, args: list[str]) -> tuple[str | None, Command | None, list[str]]:
        name, cmd, rest = super().resolve_command(ctx, args)
        if name is not None and isinstance(cmd, StandIn):
            cmd = self.commands[name] = load_command(name)
        return name, cmd, rest


app = typer.Typer(
    name="llmctl",
    help="Run your own OpenAI-compatible chat LLM service, and talk to it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=LazyGroup,
)

app.command("chat")(command(chat.chat))
app.command("health")(command(health.health))
app.command("metrics")(command(metrics.metrics))
# Arguments after `--` go to the router unchanged.
app.command("router", context_settings={"allow_extra_args": True, "ignore_unknown_options": False})(
    command(router.router))


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
