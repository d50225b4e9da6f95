"""The limits every API checks on a request before its prompt is built: how many messages it sends
(`--max-messages`) and how many choices it runs side by side (`--max-num-seqs`). Each handler calls
`check_request` once, with its own field names."""

from __future__ import annotations

from typing import TYPE_CHECKING

from llmctl.errors import InvalidRequest

if TYPE_CHECKING:
    from llmctl.server.service import Service


def check_request(service: Service, *, messages: int = 0, choices: int = 1, messages_param: str = "messages",
                  unit: str = "messages") -> None:
    """400 when the request sends more than ``--max-messages`` messages (``unit`` and ``messages_param``: what
    the API calls them), or asks for more choices than the batch holds (n choices run as rows of it)."""
    settings = service.settings
    if messages > settings.max_messages:
        raise InvalidRequest(f"{messages} {unit} is more than this server's limit of {settings.max_messages}.",
                             param=messages_param)
    slots = settings.engine.max_num_seqs
    if choices > slots:
        raise InvalidRequest(f"n is {choices}, more than this server runs at once ({slots}, its --max-num-seqs).",
                             param="n")
