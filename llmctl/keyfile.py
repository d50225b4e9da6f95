"""API key files, read the same way by the server (`--api-key-file`) and the client (`LLMCTL_API_KEY_FILE`)."""

from __future__ import annotations

from pathlib import Path

from llmctl.errors import ConfigError


def api_key_file_keys(path: Path) -> list[str]:
    """The keys in a key file, as `llmctl serve --api-key-file` reads it: one a line, blank lines and
    # comments skipped."""
    try:
        lines = path.expanduser().read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = getattr(exc, "strerror", None) or exc
        raise ConfigError(f"Cannot read the API key file {path}: {why}.") from None
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
