"""The consoles all commands print through (stdout for results, stderr for messages)."""

import os
import sys

from rich.console import Console

# Piped or redirected, rich would wrap at 80 columns and cut paths mid-word: with no terminal (and no COLUMNS
# set by the user), lines and tables take the width their content needs.
UNWRAPPED = 100_000


def _width(stream) -> int | None:
    if os.environ.get("COLUMNS") or getattr(stream, "isatty", lambda: False)():
        return None  # rich's own choice: the terminal's width, or COLUMNS
    return UNWRAPPED


console = Console(width=_width(sys.stdout))
err_console = Console(stderr=True, width=_width(sys.stderr))
