"""The response store itself, on SQLite and on a real PostgreSQL server: migrations, rows, retention, and two
servers sharing one PostgreSQL database."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid

import httpx
import openai
import pytest

from llmctl.errors import ConfigError
from llmctl.server.store import SQLStore, StoredResponse, open_store
from llmctl.server.store.schema import SCHEMA_VERSION
from llmctl.server.store.sql import _redacted
from tests.conftest import postgres_url, stored_serving, wait_for

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def pg_url():
    """A fresh database on the test PostgreSQL server, dropped afterwards."""
    import psycopg

    admin = postgres_url()
    name = f"llmctl_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    yield admin.rsplit("/", 1)[0] + "/" + name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}" if request.param == "sqlite" else request.getfixturevalue("pg_url")
    opened = open_store(url)
    yield opened
    opened.close()


def record(rid: str, status: str = "completed", size: int = 0, owner: str = "") -> StoredResponse:
    body = {"id": rid, "status": status, "output": [], "padding": "x" * size}
    return StoredResponse(rid, owner, status, body, [{"id": "msg_1", "type": "message"}], [], created_at=time.time())


def test_rows_round_trip_and_belong_to_their_owner(store):
    rid = f"resp_{uuid.uuid4().hex}"
    store.put_response(record(rid, owner="a"), ttl=60)
    assert store.get_response(rid, "a").body["id"] == rid
    assert store.get_response(rid, "b") is None and not store.delete_response(rid, "b")
    assert store.delete_response(rid, "a") and store.get_response(rid, "a") is None
    assert store.schema_version() == SCHEMA_VERSION


def test_a_finished_response_is_not_finished_again(store):
    rid = f"resp_{uuid.uuid4().hex}"
    store.put_response(record(rid, "in_progress"), ttl=60)
    assert store.set_status(rid, "cancelled")
    assert not store.finish_response(rid, {"id": rid, "status": "completed", "output": []})
    assert store.get_response(rid, "").status == "cancelled"


def test_expired_and_over_size_responses_are_swept(store):
    ids = [f"resp_{uuid.uuid4().hex}" for _ in range(4)]
    store.put_response(record(ids[0]), ttl=0.01)
    for rid in ids[1:]:
        store.put_response(record(rid, size=1000), ttl=60)
    time.sleep(0.02)
    assert store.get_response(ids[0], "") is None  # expired: invisible at once, deleted by the sweep
    conv = f"conv_{uuid.uuid4().hex}"
    store.create_conversation(conv, "", {}, [{"id": "msg_x", "type": "message"}], ttl=0.01)
    time.sleep(0.02)
    gone = store.sweep(time.time(), max_bytes=2500)  # room for two of the three 1 kB responses
    # The expired response, the expired conversation, the oldest live response (and, on the database the
    # PostgreSQL tests share, older small rows of other tests).
    assert gone >= 3
    assert [store.get_response(rid, "") is not None for rid in ids[1:]] == [False, True, True]
    assert store.items(conv) == []


def test_migrations_run_once_and_a_newer_schema_is_refused(tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    SQLStore(url).close()
    SQLStore(url).close()  # reopening applies nothing twice
    db = sqlite3.connect(tmp_path / "r.db")
    assert [row[0] for row in db.execute("SELECT version FROM llmctl_schema")] == list(range(1, SCHEMA_VERSION + 1))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.execute("INSERT INTO llmctl_schema (version) VALUES (?)", (SCHEMA_VERSION + 1,))
    db.commit()
    with pytest.raises(ConfigError, match="newer"):
        SQLStore(url)


@pytest.mark.parametrize("url, message", [("mysql://x", "Unknown --responses-store"),
                                          ("sqlite://relative.db", "sqlite:///relative/path.db")])
def test_bad_urls_are_config_errors(url, message):
    with pytest.raises(ConfigError, match=message):
        open_store(url)


def test_passwords_stay_out_of_messages():
    assert _redacted("postgresql://bob:s3cret@db:5432/x") == "postgresql://bob:***@db:5432/x"
    with pytest.raises(ConfigError, match="Cannot reach") as caught:
        open_store("postgresql://bob:s3cret@127.0.0.1:1/x")
    assert "s3cret" not in str(caught.value)


def test_two_servers_on_one_postgresql_database_see_each_others_responses(tiny_model, pg_url):
    with stored_serving(tiny_model, pg_url) as (_, url_a), stored_serving(tiny_model, pg_url) as (_, url_b):
        a = openai.OpenAI(base_url=url_a + "/v1", api_key="unused", max_retries=0)
        b = openai.OpenAI(base_url=url_b + "/v1", api_key="unused", max_retries=0)
        made = a.responses.create(model=MODEL, input="Hi", max_output_tokens=4, temperature=0)
        assert b.responses.retrieve(made.id).output_text == made.output_text
        settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 4, "ignore_eos": True}
        on_b = b.responses.create(input="More", previous_response_id=made.id, extra_body=settings)
        assert on_b.usage.input_tokens > made.usage.input_tokens
        conv = b.conversations.create(items=[{"type": "message", "role": "user", "content": "Hi"}])
        a.responses.create(input="More", conversation=conv.id, extra_body=settings)
        assert len(list(b.conversations.items.list(conv.id))) == 3
        job = a.responses.create(input="Hi", background=True, extra_body=settings)
        assert wait_for(lambda: b.responses.retrieve(job.id).status == "incomplete", 60)
        with httpx.stream("GET", f"{url_b}/v1/responses/{job.id}", params={"stream": "true", "starting_after": 1},
                          timeout=30) as r:  # B replays A's events from the database
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
        assert events[0]["sequence_number"] == 2 and events[-1]["type"] == "response.incomplete"
        assert events[-1]["response"]["output"][0]["content"][0]["text"] == b.responses.retrieve(job.id).output_text
        b.responses.delete(made.id)
        with pytest.raises(openai.NotFoundError):
            a.responses.retrieve(made.id)


def test_a_cancel_on_another_replica_stops_the_run(tiny_model, pg_url):
    with stored_serving(tiny_model, pg_url, slow=0.02) as (service_a, url_a), \
            stored_serving(tiny_model, pg_url) as (_, url_b):
        a = openai.OpenAI(base_url=url_a + "/v1", api_key="unused", max_retries=0)
        b = openai.OpenAI(base_url=url_b + "/v1", api_key="unused", max_retries=0)
        job = a.responses.create(model=MODEL, input="Hi", max_output_tokens=200, background=True,
                                 extra_body={"ignore_eos": True})
        assert wait_for(lambda: a.responses.retrieve(job.id).status == "in_progress", 30)
        assert b.responses.cancel(job.id).status == "cancelled"
        assert wait_for(lambda: job.id not in service_a.responses.jobs, 30)  # A's lease round saw the cancel
        assert a.responses.retrieve(job.id).status == "cancelled"
