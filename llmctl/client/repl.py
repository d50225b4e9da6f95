"""The interactive chat loop: prompts, slash commands and streamed answers; it knows nothing of HTTP."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from llmctl.errors import LLMCtlError

PROMPT = "[bold green]>>> [/]"
MORE = "[dim]... [/]"
FENCE = '"""'
# A slash command is one word after the slash: "/usr/bin is a folder" is a message, not a command.
COMMAND = re.compile(r"/[^/\s]+(\s|$)")
COMMANDS = [
    ("/system [TEXT]", "Show the system prompt, or replace it with TEXT."),
    ("/reset", "Forget the conversation so far (the system prompt stays)."),
    ("/save FILE", "Save the conversation to FILE as JSON."),
    ("/help", "Show this help."),
    ("/exit", "Leave (also /quit, /bye or Ctrl-D)."),
]


class Reply(Protocol):
    """What ``send`` returns: text pieces as they arrive, then the token count and who answered."""

    def __iter__(self) -> Iterator[str]: ...

    def close(self) -> None: ...

    @property
    def completion_tokens(self) -> int | None: ...

    @property
    def provider(self) -> str | None: ...


Send = Callable[[list[dict]], Reply]


@dataclass
class Conversation:
    """The system prompt and the turns so far."""

    system: str | None = None
    turns: list[dict] = field(default_factory=list)

    def messages(self) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.turns


def run_repl(send: Send, console: Console, *, system: str | None = None, first: str | None = None,
             read: Callable[[str], str] | None = None) -> Conversation:
    """Chat until /exit or end of input. ``first`` is asked before reading anything."""
    conversation = Conversation(system)
    read = read or (lambda prompt: console.input(prompt))
    console.print(f'Type a message, or /help. Start and end a multi-line message with {FENCE}. '
                  "Ctrl-C stops an answer; Ctrl-D or /exit leaves.", style="dim", highlight=False)
    pending = first
    while True:
        try:
            text = pending if pending is not None else read_message(read)
        except EOFError:
            console.print()
            return conversation
        except KeyboardInterrupt:
            console.print("\n(Ctrl-D or /exit leaves.)", style="dim")
            continue
        pending = None
        if not text.strip():
            continue
        if COMMAND.match(text.strip()):
            if run_command(text.strip(), conversation, console):
                return conversation
            continue
        answer(send, conversation, text, console)


def read_message(read: Callable[[str], str]) -> str:
    """One message: a line, lines joined by a trailing backslash, or a block between triple quotes."""
    line = read(PROMPT)
    if line.lstrip().startswith(FENCE):
        rest = line.lstrip()[len(FENCE):]
        if rest.rstrip().endswith(FENCE):
            return rest.rstrip()[: -len(FENCE)].strip()
        lines = [rest] if rest.strip() else []
        while True:
            try:
                more = read(MORE)
            except EOFError:  # Ctrl-D ends the block: send what was typed (the next read leaves)
                if any(part.strip() for part in lines):
                    return "\n".join(lines).strip()
                raise
            if more.rstrip().endswith(FENCE):
                lines.append(more.rstrip()[: -len(FENCE)])
                return "\n".join(lines).strip()
            lines.append(more)
    while line.endswith("\\"):
        line = line[:-1] + "\n" + read(MORE)
    return line.strip()


def answer(send: Send, conversation: Conversation, text: str, console: Console) -> None:
    """Ask, print the answer as it streams, and keep both in the history (neither if it failed)."""
    conversation.turns.append({"role": "user", "content": text})
    started = time.monotonic()
    parts: list[str] = []
    reply: Reply | None = None
    waiting = console.status("Thinking…", spinner="dots")
    waiting.start()
    try:
        reply = send(conversation.messages())
        for piece in reply:
            if not parts:
                waiting.stop()
            parts.append(piece)
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)
    except KeyboardInterrupt:
        _drop(reply, conversation, parts, console)
        console.print("[yellow]Stopped.[/yellow] The question is left out of the history.", style="dim")
        return
    except LLMCtlError as exc:
        _drop(reply, conversation, parts, console)
        console.print(f"[red]Error:[/red] {escape(exc.message)}", highlight=False)
        return
    finally:
        waiting.stop()
    console.print()
    elapsed = time.monotonic() - started
    conversation.turns.append({"role": "assistant", "content": "".join(parts)})
    tokens = reply.completion_tokens or len(parts)
    stats = f"{tokens} tokens · {tokens / elapsed if elapsed > 0 else 0:.1f} tokens/s · {elapsed:.2f} s"
    if reply.provider and reply.provider != "self":
        stats += f" · answered by {escape(reply.provider)}"
    console.print(stats, style="dim", highlight=False)


def _drop(reply: Reply | None, conversation: Conversation, parts: list[str], console: Console) -> None:
    if reply is not None:
        reply.close()
    conversation.turns.pop()
    if parts:
        console.print()


def run_command(line: str, conversation: Conversation, console: Console) -> bool:
    """Run one slash command; True means leave."""
    name, _, arg = line.partition(" ")
    name, arg = name.lower(), arg.strip()
    if name in ("/exit", "/quit", "/bye"):
        return True
    if name == "/help":
        table = Table(show_header=False, box=None, padding=(0, 2))
        for usage, what in COMMANDS:
            table.add_row(usage, what)
        console.print(table)
    elif name == "/reset":
        conversation.turns.clear()
        console.print("Conversation cleared.", style="dim")
    elif name == "/system":
        if arg:
            conversation.system = arg
            console.print("System prompt set.", style="dim")
        else:
            console.print(conversation.system or "(no system prompt)", markup=False, highlight=False)
    elif name == "/save":
        if not arg:
            console.print("Usage: /save FILE", style="yellow")
            return False
        path = Path(arg).expanduser()
        try:
            text = json.dumps({"messages": conversation.messages()}, indent=2, ensure_ascii=False)
            path.write_text(text + "\n", encoding="utf-8")
        except OSError as exc:
            why = escape(str(exc.strerror or exc))
            console.print(f"[red]Error:[/red] cannot write {escape(str(path))}: {why}", highlight=False)
        else:
            console.print(f"Saved {len(conversation.turns)} messages to {escape(str(path))}.", style="dim",
                          highlight=False)
    else:
        console.print(f"Unknown command {escape(name)}; /help lists the commands.", style="yellow",
                      highlight=False)
    return False
