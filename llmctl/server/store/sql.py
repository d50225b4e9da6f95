"""The response store in SQL: one implementation for SQLite (a file, WAL mode) and PostgreSQL (psycopg 3).

The two databases get the same statements; only the connection, the placeholder style, the column types
(`schema.TYPES`) and the locks differ. Every write is one short transaction, committed before the API
answers, so a process killed at any moment leaves each answered response in the database.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmctl.errors import ConfigError, Unavailable
from llmctl.server.store.conversations import ConversationRows
from llmctl.server.store.schema import SCHEMA_VERSION, statements

UNFINISHED = ("queued", "in_progress")
_MIGRATION_LOCK = 7_305_514  # any constant: PostgreSQL's advisory lock for migrations


@dataclass
class StoredResponse:
    """A stored response and what it was made from."""

    id: str
    owner: str  # a hash of the API key that created it ("" on a server without keys)
    status: str
    body: dict  # the response object, as GET /v1/responses/{id} returns it
    input_items: list[dict]  # the request's own input items, with ids
    history: list[dict]  # every item the model read before its output: earlier turns, then input_items
    background: bool = False
    conversation_id: str | None = None
    created_at: float = 0.0


class _DB:
    """A connection inside a transaction, with `?` placeholders whatever the database."""

    def __init__(self, conn: Any, postgres: bool) -> None:
        self.conn, self.postgres = conn, postgres

    def execute(self, sql: str, params: tuple | list = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s") if self.postgres else sql, tuple(params))


class SQLStore(ConversationRows):
    """Stored responses, their events and conversations in SQLite or PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.postgres = url.startswith(("postgresql://", "postgres://"))
        self.dialect = "postgresql" if self.postgres else "sqlite"
        self._local = threading.local()
        self._sqlite_conns: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._writing = threading.Lock()
        if self.postgres:
            try:
                import psycopg
                from psycopg_pool import ConnectionPool, PoolTimeout
            except ImportError:
                raise ConfigError("--responses-store postgresql://... needs psycopg 3: "
                                  "pip install 'llmctl[postgres]'.") from None
            try:  # one plain connection first: its error says what is wrong (the pool's only that it timed out)
                psycopg.connect(url, connect_timeout=10).close()
            except psycopg.Error as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ConfigError(f"Cannot reach the response store at {_redacted(url)}: {reason}") from None
            self._pool = ConnectionPool(url, min_size=1, max_size=16, kwargs={"autocommit": True}, open=False)
            try:
                self._pool.open(wait=True, timeout=10)
            except PoolTimeout as exc:
                self._pool.close()
                raise ConfigError(f"Cannot reach the response store at {_redacted(url)}: {exc}") from None
        else:
            self.path = sqlite_path(url)
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    # ---- connections and transactions ------------------------------------------------------------
    def _sqlite(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            # Autocommit mode: transactions are the explicit BEGIN IMMEDIATE ... COMMIT below.
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL loses nothing when the process dies (only on power loss), and saves an fsync
            # per commit.
            conn.execute("PRAGMA synchronous=NORMAL")
            self._local.conn = conn
            with self._lock:
                self._sqlite_conns.append(conn)
        return conn

    @contextlib.contextmanager
    def tx(self, write: bool = True) -> Iterator[_DB]:
        """One transaction; a database failure becomes a 503 that names the store."""
        try:
            if self.postgres:
                with self._pool.connection() as pg, pg.transaction():
                    yield _DB(pg, True)
                return
            conn = self._sqlite()
            if not write:
                yield _DB(conn, False)
                return
            # One writer at a time in this process: SQLite allows one anyway, and its busy handler would make
            # the others sleep in growing steps (up to 100 ms) instead of taking the lock the moment it is free.
            with self._writing:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield _DB(conn, False)
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            raise Unavailable(f"The response store failed: {exc}", retry_after=1, code="store_unavailable") from exc
        except Exception as exc:
            if self.postgres and type(exc).__module__.startswith(("psycopg", "psycopg_pool")):
                raise Unavailable(f"The response store failed: {exc}", retry_after=1,
                                  code="store_unavailable") from exc
            raise

    def _migrate(self) -> None:
        with self.tx() as db:
            if self.postgres:  # two servers starting at once: one migrates, the other waits
                db.execute("SELECT pg_advisory_xact_lock(?)", (_MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS llmctl_schema (version INTEGER NOT NULL)")
            found = db.execute("SELECT MAX(version) FROM llmctl_schema").fetchone()[0] or 0
            if found > SCHEMA_VERSION:
                raise ConfigError(f"The response store at {_redacted(self.url)} has schema version {found}, newer "
                                  f"than this llmctl knows ({SCHEMA_VERSION}); upgrade llmctl.")
            for version in range(found + 1, SCHEMA_VERSION + 1):
                for sql in statements(self.dialect, version):
                    db.execute(sql)
                db.execute("INSERT INTO llmctl_schema (version) VALUES (?)", (version,))

    def describe(self) -> str:
        return f"PostgreSQL at {_redacted(self.url)}" if self.postgres else f"SQLite file {self.path}"

    def schema_version(self) -> int:
        with self.tx(write=False) as db:
            return db.execute("SELECT MAX(version) FROM llmctl_schema").fetchone()[0]

    def release(self) -> None:
        """Close this thread's SQLite connection (a thread that ends: a background job's)."""
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._local.conn = None
            with self._lock:
                self._sqlite_conns.remove(conn)
            conn.close()

    def close(self) -> None:
        if self.postgres:
            self._pool.close()
            return
        with self._lock:
            for conn in self._sqlite_conns:
                conn.close()
            self._sqlite_conns.clear()
        self._local = threading.local()

    # ---- responses -------------------------------------------------------------------------------
    def put_response(self, r: StoredResponse, ttl: float, instance: str | None = None,
                     lease_until: float | None = None) -> None:
        body, items, history = json.dumps(r.body), json.dumps(r.input_items), json.dumps(r.history)
        with self.tx() as db:
            db.execute("INSERT INTO llmctl_responses (id, owner, status, background, created_at, expires_at, "
                       "instance, lease_until, conversation_id, body, input_items, history, size) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                       (r.id, r.owner, r.status, int(r.background), r.created_at, r.created_at + ttl, instance,
                        lease_until, r.conversation_id, body, items, history, len(body) + len(items) + len(history)))

    def finish_response(self, response_id: str, body: dict) -> bool:
        """Record a background response's end (its body's status), unless it already ended (cancelled)."""
        data = json.dumps(body)
        with self.tx() as db:
            cur = db.execute(
                "UPDATE llmctl_responses SET status = ?, body = ?, lease_until = NULL, "
                "size = ? + LENGTH(input_items) + LENGTH(history) WHERE id = ? AND status IN (?, ?)",
                (body["status"], data, len(data), response_id, *UNFINISHED))
            return cur.rowcount > 0

    def set_status(self, response_id: str, status: str, only_from: tuple[str, ...] = UNFINISHED) -> bool:
        marks = ", ".join("?" * len(only_from))
        with self.tx() as db:
            cur = db.execute(f"UPDATE llmctl_responses SET status = ? WHERE id = ? AND status IN ({marks})",
                             (status, response_id, *only_from))
            return cur.rowcount > 0

    def get_response(self, response_id: str, owner: str) -> StoredResponse | None:
        with self.tx(write=False) as db:
            row = db.execute("SELECT id, owner, status, body, input_items, history, background, conversation_id, "
                             "created_at FROM llmctl_responses WHERE id = ? AND owner = ? AND expires_at > ?",
                             (response_id, owner, time.time())).fetchone()
        if row is None:
            return None
        body = json.loads(row[3])
        body["status"] = row[2]  # the column is the truth: queued -> in_progress flips only it
        return StoredResponse(row[0], row[1], row[2], body, json.loads(row[4]), json.loads(row[5]), bool(row[6]),
                              row[7], row[8])

    def delete_response(self, response_id: str, owner: str) -> bool:
        with self.tx() as db:
            cur = db.execute("DELETE FROM llmctl_responses WHERE id = ? AND owner = ?", (response_id, owner))
            if cur.rowcount:
                db.execute("DELETE FROM llmctl_response_events WHERE response_id = ?", (response_id,))
            return cur.rowcount > 0

    def statuses(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        with self.tx(write=False) as db:
            rows = db.execute(f"SELECT id, status FROM llmctl_responses WHERE id IN ({', '.join('?' * len(ids))})",
                              ids).fetchall()
        return dict(rows)

    # ---- background runs: events, leases, orphans ---------------------------------------------------
    def add_events(self, response_id: str, events: list[tuple[int, str]]) -> None:
        with self.tx() as db:
            for seq, data in events:
                db.execute("INSERT INTO llmctl_response_events (response_id, seq, data) VALUES (?, ?, ?)",
                           (response_id, seq, data))

    def events(self, response_id: str, after: int) -> list[tuple[int, str]]:
        with self.tx(write=False) as db:
            return [tuple(row) for row in db.execute(
                "SELECT seq, data FROM llmctl_response_events WHERE response_id = ? AND seq > ? ORDER BY seq",
                (response_id, after)).fetchall()]

    def renew_leases(self, instance: str, until: float) -> None:
        with self.tx() as db:
            db.execute("UPDATE llmctl_responses SET lease_until = ? WHERE instance = ? AND status IN (?, ?)",
                       (until, instance, *UNFINISHED))

    def orphans(self, now: float, instance: str | None = None) -> list[StoredResponse]:
        """Unfinished responses whose server stopped renewing their lease (or, given, this instance's)."""
        where = "instance = ?" if instance is not None else "lease_until < ?"
        with self.tx(write=False) as db:
            rows = db.execute(f"SELECT id, owner FROM llmctl_responses WHERE status IN (?, ?) AND {where}",
                              (*UNFINISHED, instance if instance is not None else now)).fetchall()
        found = [self.get_response(rid, owner) for rid, owner in rows]
        return [r for r in found if r is not None]

    def sweep(self, now: float, max_bytes: int) -> int:
        """Delete expired responses and conversations, then the oldest finished responses over ``max_bytes``."""
        with self.tx() as db:
            gone = db.execute("DELETE FROM llmctl_responses WHERE expires_at <= ?", (now,)).rowcount
            conversations = [row[0] for row in db.execute(
                "SELECT id FROM llmctl_conversations WHERE expires_at <= ?", (now,)).fetchall()]
            for cid in conversations:
                db.execute("DELETE FROM llmctl_conversation_items WHERE conversation_id = ?", (cid,))
                db.execute("DELETE FROM llmctl_conversations WHERE id = ?", (cid,))
            total = db.execute("SELECT COALESCE(SUM(size), 0) FROM llmctl_responses").fetchone()[0]
            if total > max_bytes:
                for rid, size in db.execute("SELECT id, size FROM llmctl_responses WHERE status NOT IN (?, ?) "
                                            "ORDER BY created_at", UNFINISHED).fetchall():
                    if total <= max_bytes:
                        break
                    db.execute("DELETE FROM llmctl_responses WHERE id = ?", (rid,))
                    total -= size
                    gone += 1
            db.execute("DELETE FROM llmctl_response_events WHERE response_id NOT IN "
                       "(SELECT id FROM llmctl_responses)")
        return gone + len(conversations)


def sqlite_path(url: str) -> Path:
    """The file of a sqlite:/// URL, as SQLAlchemy reads them: sqlite:///rel.db, sqlite:////abs/path.db."""
    rest = url[len("sqlite:///"):]
    if not url.startswith("sqlite:///") or not rest:
        raise ConfigError(f"Bad --responses-store URL {url!r}: write sqlite:///relative/path.db or "
                          "sqlite:////absolute/path.db.")
    return Path(rest).expanduser()


def _redacted(url: str) -> str:
    """The URL without its password, for messages."""
    head, at, tail = url.rpartition("@")
    if not at or "://" not in head:
        return url
    scheme, _, userinfo = head.partition("://")
    return f"{scheme}://{userinfo.partition(':')[0]}:***@{tail}"
