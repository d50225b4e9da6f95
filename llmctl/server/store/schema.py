"""The stored-responses schema as numbered migrations, applied in order under a lock on start.

Each migration runs once per database (the version reached is kept in `llmctl_schema`); a server that
finds a database newer than it knows refuses to start instead of guessing. Columns use the types both
SQLite and PostgreSQL read the same way: JSON is kept as text, times as seconds since the epoch.
"""

from __future__ import annotations

# Placeholders filled per database: {float} and {int} (SQLite is loose about both; PostgreSQL is not).
MIGRATIONS: list[list[str]] = [
    [  # 1: responses, their replayable events, conversations and their items
        """CREATE TABLE llmctl_responses (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, background INTEGER NOT NULL,
            created_at {float} NOT NULL, expires_at {float} NOT NULL, instance TEXT, lease_until {float},
            conversation_id TEXT, body TEXT NOT NULL, input_items TEXT NOT NULL, history TEXT NOT NULL,
            size {int} NOT NULL)""",
        "CREATE INDEX llmctl_responses_expiry ON llmctl_responses (expires_at)",
        "CREATE INDEX llmctl_responses_running ON llmctl_responses (status, lease_until)",
        """CREATE TABLE llmctl_response_events (
            response_id TEXT NOT NULL, seq {int} NOT NULL, data TEXT NOT NULL, PRIMARY KEY (response_id, seq))""",
        """CREATE TABLE llmctl_conversations (
            id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at {float} NOT NULL, expires_at {float} NOT NULL,
            metadata TEXT NOT NULL)""",
        "CREATE INDEX llmctl_conversations_expiry ON llmctl_conversations (expires_at)",
        """CREATE TABLE llmctl_conversation_items (
            conversation_id TEXT NOT NULL, position {int} NOT NULL, id TEXT NOT NULL, data TEXT NOT NULL,
            PRIMARY KEY (conversation_id, position))""",
        "CREATE UNIQUE INDEX llmctl_conversation_item_ids ON llmctl_conversation_items (conversation_id, id)",
    ],
]

SCHEMA_VERSION = len(MIGRATIONS)
TYPES = {"sqlite": {"float": "REAL", "int": "INTEGER"},
         "postgresql": {"float": "DOUBLE PRECISION", "int": "BIGINT"}}


def statements(dialect: str, version: int) -> list[str]:
    """The SQL of migration ``version`` (1-based) for ``dialect``."""
    return [sql.format(**TYPES[dialect]) for sql in MIGRATIONS[version - 1]]
