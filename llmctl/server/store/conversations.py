"""Conversations in the SQL store: a conversation row and its items, in the order they were added."""

from __future__ import annotations

import json
import time
from typing import Any, Protocol


class _DB(Protocol):
    """What of `sql._DB` this module uses (a protocol, so that it does not import sql, which imports it)."""

    def execute(self, sql: str, params: tuple | list = ()) -> Any: ...


class ConversationRows:
    """The conversation half of `SQLStore` (it provides `tx`)."""

    def tx(self, write: bool = True):  # pragma: no cover - provided by SQLStore
        raise NotImplementedError

    def create_conversation(self, conversation_id: str, owner: str, metadata: dict, items: list[dict],
                            ttl: float) -> dict:
        now = time.time()
        with self.tx() as db:
            db.execute("INSERT INTO llmctl_conversations (id, owner, created_at, expires_at, metadata) "
                       "VALUES (?, ?, ?, ?, ?)", (conversation_id, owner, now, now + ttl, json.dumps(metadata)))
            _append(db, conversation_id, items, 0)
        return {"id": conversation_id, "created_at": now, "metadata": metadata}

    def get_conversation(self, conversation_id: str, owner: str) -> dict | None:
        with self.tx(write=False) as db:
            row = db.execute("SELECT created_at, metadata FROM llmctl_conversations WHERE id = ? AND owner = ? "
                             "AND expires_at > ?", (conversation_id, owner, time.time())).fetchone()
        return None if row is None else {"id": conversation_id, "created_at": row[0], "metadata": json.loads(row[1])}

    def update_conversation(self, conversation_id: str, owner: str, metadata: dict) -> bool:
        with self.tx() as db:
            return db.execute("UPDATE llmctl_conversations SET metadata = ? WHERE id = ? AND owner = ?",
                              (json.dumps(metadata), conversation_id, owner)).rowcount > 0

    def delete_conversation(self, conversation_id: str, owner: str) -> bool:
        with self.tx() as db:
            gone = db.execute("DELETE FROM llmctl_conversations WHERE id = ? AND owner = ?",
                              (conversation_id, owner)).rowcount > 0
            if gone:
                db.execute("DELETE FROM llmctl_conversation_items WHERE conversation_id = ?", (conversation_id,))
            return gone

    def add_items(self, conversation_id: str, items: list[dict], ttl: float) -> None:
        """Append ``items`` (each with an id) and keep the conversation for ``ttl`` more seconds."""
        with self.tx() as db:
            # PostgreSQL: lock the row so two appends to one conversation get distinct positions.
            lock = " FOR UPDATE" if getattr(db, "postgres", False) else ""
            db.execute(f"SELECT id FROM llmctl_conversations WHERE id = ?{lock}", (conversation_id,))
            last = db.execute("SELECT MAX(position) FROM llmctl_conversation_items WHERE conversation_id = ?",
                              (conversation_id,)).fetchone()[0]
            _append(db, conversation_id, items, -1 if last is None else last)
            db.execute("UPDATE llmctl_conversations SET expires_at = ? WHERE id = ?",
                       (time.time() + ttl, conversation_id))

    def items(self, conversation_id: str) -> list[dict]:
        """Every item of a conversation, oldest first."""
        with self.tx(write=False) as db:
            rows = db.execute("SELECT data FROM llmctl_conversation_items WHERE conversation_id = ? "
                              "ORDER BY position", (conversation_id,)).fetchall()
        return [json.loads(row[0]) for row in rows]

    def delete_item(self, conversation_id: str, item_id: str) -> bool:
        with self.tx() as db:
            return db.execute("DELETE FROM llmctl_conversation_items WHERE conversation_id = ? AND id = ?",
                              (conversation_id, item_id)).rowcount > 0


def _append(db: _DB, conversation_id: str, items: list[dict], last: int) -> None:
    for offset, item in enumerate(items, start=1):
        db.execute("INSERT INTO llmctl_conversation_items (conversation_id, position, id, data) VALUES (?, ?, ?, ?)",
                   (conversation_id, last + offset, item["id"], json.dumps(item)))
