"""The consoles all commands print through (stdout for results, stderr for messages)."""

from rich.console import Console

console = Console()
err_console = Console(stderr=True)
