"""Stored responses and conversations: `open_store` picks the database from `--responses-store URL`."""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_data_dir

from llmctl.envvars import DATA_DIR
from llmctl.errors import ConfigError
from llmctl.server.store.sql import SQLStore, StoredResponse
from llmctl.server.store.state import ResponseState

__all__ = ["ResponseState", "SQLStore", "StoredResponse", "default_store_url", "open_store"]


def data_dir() -> Path:
    """Where llmctl keeps its data (``$LLMCTL_DATA_DIR`` or the user data folder)."""
    return Path(os.environ.get(DATA_DIR) or user_data_dir("llmctl")).expanduser()


def default_store_url() -> str:
    return f"sqlite:///{data_dir() / 'responses.db'}"


def open_store(url: str) -> SQLStore | None:
    """The store a `--responses-store` URL names (migrated to the current schema), or None for 'none'."""
    if url == "none":
        return None
    if url.startswith(("sqlite:", "postgresql://", "postgres://")):
        return SQLStore(url)
    raise ConfigError(f"Unknown --responses-store {url!r}: give sqlite:///PATH, postgresql://USER@HOST/DB or none.")
