"""`llmctl chat`: talk to the service in an interactive session, or ask one question from a script."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer
from rich.markup import escape

from llmctl import envvars
from llmctl.cli.options import ConfigOpt, UrlOpt
from llmctl.cli.output import console, err_console
from llmctl.client import LABELS, Client
from llmctl.config import load_settings
from llmctl.errors import InvalidRequest, Unavailable
from llmctl.probe import Health, get_health, wait_for_health
from llmctl.repl import run_repl


def chat(
    prompt: Annotated[str | None, typer.Argument(
        show_default=False, metavar="QUESTION",
        help="Ask this one question, print the answer and exit.")] = None,
    url: UrlOpt = None,
    system: Annotated[str | None, typer.Option(
        "--system", "-s", envvar=envvars.SYSTEM_PROMPT, show_default=False,
        help="System prompt for the conversation.")] = None,
    temperature: Annotated[float | None, typer.Option(
        min=0.0, max=2.0, show_default=False,
        help=f"Sampling temperature. Default: ${envvars.TEMPERATURE}, else the config's, else 0.7.")] = None,
    max_tokens: Annotated[int | None, typer.Option(
        min=1, show_default=False,
        help=f"Longest answer, in tokens. Default: ${envvars.MAX_TOKENS}, else the config's, "
        "else 512.")] = None,
    interactive: Annotated[bool, typer.Option(
        "--interactive", "-i",
        help="Chat in a session even when standard input is not a terminal "
        "(prompts are read from it).")] = False,
    config: ConfigOpt = None,
) -> None:
    """Chat with the service: a session in the terminal, or one question for scripts.

    One question: `llmctl chat "QUESTION"` or `echo QUESTION | llmctl chat` prints the answer and exits.

    In a session: /system TEXT, /reset, /save FILE, /help, /exit.
    Wrap multi-line messages in triple quotes (\"\"\").

    Ctrl-C stops an answer, Ctrl-D leaves. Each answer ends with its token count and tokens/s.
    """
    settings = load_settings(config, self_hosted_url=url, temperature=temperature, max_tokens=max_tokens)
    if not os.environ.get(envvars.DEBUG):
        # This command says who answered itself; the client's log lines would repeat it after every answer.
        logging.getLogger("llmctl.client").setLevel(logging.ERROR)
    if prompt is None and not interactive and not sys.stdin.isatty():
        prompt = sys.stdin.read().strip()
        if not prompt:
            raise InvalidRequest("Nothing to ask: standard input is empty.")
    with Client(settings) as client:
        if prompt is not None and not interactive:
            ask_once(client, prompt, system)
            return
        check_service(client)
        run_repl(lambda messages: client.stream(messages), console, system=system, first=prompt)


def ask_once(client: Client, prompt: str, system: str | None) -> None:
    """Print one answer to stdout as it streams; who answered goes to stderr when it was not the service."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    stream = client.stream(messages)
    try:
        for piece in stream:
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        stream.close()
        console.print()
        raise typer.Exit(130) from None
    console.print()
    if stream.provider != "self":
        err_console.print(f"(answered by {LABELS[stream.provider]})", style="dim", highlight=False)


def check_service(client: Client) -> None:
    """Before the first prompt: say whether the service is ready, wait while it loads, fail if it is down."""
    if "self" not in client.providers:
        console.print(f"Chatting with {client.endpoints[0].label}.", style="dim", highlight=False)
        return
    settings = client.settings
    url = settings.self_hosted_url
    health = get_health(url, timeout=min(settings.timeout_seconds, 10.0))
    if health.status == "loading":
        err_console.print(f"The model at {url} is still loading; waiting up to "
                          f"{settings.timeout_seconds:g} s (Ctrl-C to give up).", highlight=False)
        with err_console.status("Loading…"):
            health = wait_for_health(url, settings.timeout_seconds, interval=1.0)
    if health.ready:
        body = health.body
        console.print(f"Connected to {url}: {body.get('model')} on {body.get('device')}.", style="dim",
                      highlight=False)
        return
    problem = describe(health)
    fallbacks = [LABELS[name] for name in client.providers if name != "self"]
    if fallbacks:
        err_console.print(f"[yellow]Warning:[/yellow] {escape(problem)} Answers will come from "
                          f"{' or else '.join(fallbacks)}.", highlight=False)
        return
    raise Unavailable(problem, retry_after=None)


def describe(health: Health) -> str:
    """One sentence on why the service cannot answer."""
    url = health.url
    if health.status == "unreachable":
        return (f"The service at {url} is not reachable ({health.error}). Start it with `llmctl serve`, "
                "or point --url at it.")
    if health.status == "loading":
        return f"The model at {url} is still loading; try again shortly (`llmctl health --wait 300` waits)."
    if health.status == "shutting_down":
        return f"The service at {url} is shutting down."
    return f"The service at {url} is not ready ({health.status}): {health.error or 'no details'}."
