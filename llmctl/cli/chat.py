"""`llmctl chat`: talk to the service in an interactive session, or ask one question from a script."""

from __future__ import annotations

import logging
import os
import re
import sys
from typing import Annotated

import typer
from rich.markup import escape

from llmctl import envvars
from llmctl.cli.options import ConfigOpt, UrlOpt
from llmctl.cli.output import console, err_console
from llmctl.client import Client
from llmctl.client.config import load_settings
from llmctl.client.probe import Health, get_health, wait_for_health
from llmctl.client.providers import LABELS
from llmctl.client.repl import run_repl
from llmctl.errors import InvalidRequest, LLMCtlError, Unavailable

ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


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
        read = read_line if enable_line_editing() else None
        run_repl(lambda messages: client.stream(messages), console, system=system, first=prompt, read=read)


def enable_line_editing() -> bool:
    """Arrow keys, history and Ctrl-R at the prompt: input() uses readline once it is imported."""
    if not sys.stdin.isatty():
        return False
    try:
        import readline  # noqa: F401
    except ImportError:  # Windows, or a Python built without it: plain input still works
        return False
    return True


def read_line(prompt: str) -> str:
    """input() with the coloured prompt, its colour codes marked zero-width so readline keeps the cursor
    in the right column (else recalled or long lines are redrawn shifted)."""
    with console.capture() as capture:
        console.print(prompt, end="")
    return input(ANSI_CODE.sub("\x01\\g<0>\x02", capture.get()))


def ask_once(client: Client, prompt: str, system: str | None) -> None:
    """Print one answer to stdout exactly as it streams; who answered goes to stderr when not the service."""
    messages = [{"role": "system", "content": system}] if system else []
    messages.append({"role": "user", "content": prompt})
    stream = client.stream(messages)
    # Straight to stdout, not through rich: scripts get the model's bytes (tabs, [brackets]) unchanged.
    last = "\n"
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
            last = piece[-1:] or last
    except KeyboardInterrupt:
        stream.close()
        _end_line(last)
        raise typer.Exit(130) from None
    except LLMCtlError:
        _end_line(last)  # the error goes to stderr on a line of its own, after what did arrive
        raise
    _end_line(last)
    if stream.provider != "self":
        err_console.print(f"(answered by {LABELS[stream.provider]})", style="dim", highlight=False)


def _end_line(last: str) -> None:
    if last != "\n":
        sys.stdout.write("\n")
    sys.stdout.flush()


def check_service(client: Client) -> None:
    """Before the first prompt: say whether the service is ready, wait while it loads, fail if it is down.

    A server that is not llmctl (llama.cpp, vLLM, one without /health) is taken at its word: chat goes on.
    """
    if "self" not in client.providers:
        console.print(f"Chatting with {escape(client.endpoints[0].label)}.", style="dim", highlight=False)
        return
    settings = client.settings
    url = settings.self_hosted_url
    fallbacks = [LABELS[name] for name in client.providers if name != "self"]
    health = get_health(url, timeout=min(settings.timeout_seconds, 10.0))
    declared = _declared(health)
    if declared == "loading" and fallbacks:
        # Someone else can answer now: do not keep the user waiting on the model.
        err_console.print(f"The model at {escape(url)} is still loading; answers come from "
                          f"{' or else '.join(fallbacks)} until it is ready.", style="yellow", highlight=False)
        client.set_aside("self", settings.cooldown_seconds, "its model is still loading")
        return
    if declared == "loading":
        err_console.print(f"The model at {escape(url)} is still loading; waiting up to "
                          f"{settings.timeout_seconds:g} s (Ctrl-C to give up).", highlight=False)
        with err_console.status("Loading…"):
            health = wait_for_health(url, settings.timeout_seconds, interval=1.0)
        declared = _declared(health)
    if declared == "ready":
        model, device = health.body.get("model"), health.body.get("device")
        about = f": {model}" + (f" on {device}" if device else "") if model else ""
        console.print(f"Connected to {escape(url)}{escape(about)}.", style="dim", highlight=False)
        return
    if declared is None:
        _foreign(health)
        return
    problem = describe(health)
    if fallbacks:
        err_console.print(f"[yellow]Warning:[/yellow] {escape(problem)} Answers will come from "
                          f"{' or else '.join(fallbacks)}.", highlight=False)
        return
    raise Unavailable(problem, retry_after=None)


def _declared(health: Health) -> str | None:
    """llmctl's status (or "unreachable"); None for an answer that is not llmctl's."""
    if not health.reachable:
        return "unreachable"
    return health.body["status"] if health.from_llmctl else None


def _foreign(health: Health) -> None:
    """Another OpenAI-compatible server (llama.cpp says {"status": "ok"}, vLLM an empty 200; some have no
    /health at all): it cannot tell us about loading, so the first answer will tell."""
    code = health.http_status
    if health.ready or code == 404:
        note = "" if code != 404 else " (it has no /health, so it is not checked)"
        console.print(f"Connected to {escape(health.url)}{note}.", style="dim", highlight=False)
        return
    err_console.print(f"[yellow]Warning:[/yellow] {escape(health.url)}/health answered {code}: "
                      f"{escape(str(health.error or 'no details'))}. Trying it anyway.", highlight=False)


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
