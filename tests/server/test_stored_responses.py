"""Stored responses on SQLite through the openai SDK: store, retrieve, delete, input_items, previous_response_id,
conversations, and API-key isolation, against a real server with a real (tiny) model."""

from __future__ import annotations

import hashlib
import sqlite3

import httpx
import openai
import pytest

from llmctl.server.api import responses_models
from tests.conftest import stored_serving

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("store") / "responses.db"
    with stored_serving(tiny_model, f"sqlite:///{db}") as (service, url):
        yield service, url, db


@pytest.fixture()
def sdk(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server[1], timeout=60) as c:
        yield c


def test_a_response_is_stored_by_default_and_read_back(sdk, http):
    made = sdk.responses.create(model=MODEL, input="Hello there", max_output_tokens=6, temperature=0)
    assert made.store is True and made.status in ("completed", "incomplete")
    again = sdk.responses.retrieve(made.id)
    assert again.model_dump() == made.model_dump()
    raw = http.get(f"/v1/responses/{made.id}").json()
    responses_models.Response.model_validate(raw)
    items = sdk.responses.input_items.list(made.id)
    assert [(i.type, i.role, i.content[0].text) for i in items.data] == [("message", "user", "Hello there")]
    assert items.data[0].id.startswith("msg_")
    sdk.responses.delete(made.id)
    with pytest.raises(openai.NotFoundError, match=made.id):
        sdk.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.delete(made.id)


def test_store_false_keeps_nothing(sdk):
    made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=3, store=False)
    assert made.store is False
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(made.id)


def test_a_streamed_response_is_stored_as_it_ended(sdk):
    events = list(sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=5, stream=True, temperature=0))
    final = events[-1].response
    assert sdk.responses.retrieve(final.id).output_text == final.output_text


def test_previous_response_id_continues_as_the_full_history_does(sdk):
    """Greedy decoding: continuing by id gives, token for token, what sending the whole history gives."""
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 12, "ignore_eos": True}
    first = sdk.responses.create(input="The capital of France is", instructions="Be brief.", extra_body=settings)
    by_id = sdk.responses.create(input="And of Italy?", previous_response_id=first.id, instructions="Be brief.",
                                 extra_body=settings)
    history = [{"role": "user", "content": "The capital of France is"},
               {"role": "assistant", "content": first.output_text}, {"role": "user", "content": "And of Italy?"}]
    full = sdk.responses.create(input=history, instructions="Be brief.", store=False, extra_body=settings)
    alone = sdk.responses.create(input="And of Italy?", instructions="Be brief.", store=False, extra_body=settings)
    assert by_id.previous_response_id == first.id
    assert by_id.usage.input_tokens == full.usage.input_tokens > alone.usage.input_tokens
    assert by_id.usage.output_tokens == full.usage.output_tokens == 12
    assert by_id.output_text == full.output_text
    # A third turn reads both earlier ones.
    third = sdk.responses.create(input="Thanks", previous_response_id=by_id.id, extra_body=settings)
    assert third.usage.input_tokens > by_id.usage.input_tokens + by_id.usage.output_tokens


@pytest.mark.parametrize("body, status, param", [
    ({"previous_response_id": "resp_nope"}, 404, "previous_response_id"),
    ({"conversation": "conv_nope"}, 404, "conversation"),
    ({"previous_response_id": "resp_x", "conversation": "conv_x"}, 400, "conversation"),
    ({"background": True, "store": False}, 400, "background"),
    ({"conversation": {"name": "x"}}, 400, "conversation"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input[0]"),
])
def test_bad_stateful_requests_are_4xx_in_the_envelope(http, body, status, param):
    r = http.post("/v1/responses", json={"input": "x", "max_output_tokens": 2, **body})
    assert r.status_code == status, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


@pytest.mark.parametrize("path, status", [
    ("/v1/responses/resp_nope", 404), ("/v1/responses/resp_nope/input_items", 404),
    ("/v1/conversations/conv_nope", 404), ("/v1/conversations/conv_nope/items", 404),
])
def test_unknown_ids_are_404(http, path, status):
    r = http.get(path)
    assert r.status_code == status and r.json()["error"]["code"] == "not_found"


def test_bad_list_parameters_are_400(sdk, http):
    made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order"), ("after=msg_x", "after")):
        r = http.get(f"/v1/responses/{made.id}/input_items?{query}")
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (query, r.text)
    r = http.post(f"/v1/responses/{made.id}/cancel")
    assert r.status_code == 400 and "background" in r.json()["error"]["message"]
    r = http.get(f"/v1/responses/{made.id}?stream=true")
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream"


def test_input_items_pages(sdk):
    made = sdk.responses.create(model=MODEL, max_output_tokens=2, input=[
        {"role": "user", "content": f"turn {i}"} for i in range(5)])
    newest = sdk.responses.input_items.list(made.id, limit=2)
    assert [i.content[0].text for i in newest.data] == ["turn 4", "turn 3"] and newest.has_more
    every = [i.content[0].text for i in sdk.responses.input_items.list(made.id, limit=2, order="asc")]
    assert every == [f"turn {i}" for i in range(5)]  # the SDK follows the pages through `after`


def test_conversations_collect_every_turn(sdk):
    conv = sdk.conversations.create(items=[{"type": "message", "role": "system", "content": "Be brief."}],
                                    metadata={"topic": "geo"})
    assert conv.id.startswith("conv_") and conv.metadata == {"topic": "geo"}
    settings = {"model": MODEL, "temperature": 0, "max_output_tokens": 4, "ignore_eos": True}
    one = sdk.responses.create(input="Hi", conversation=conv.id, extra_body=settings)
    two = sdk.responses.create(input="More", conversation={"id": conv.id}, extra_body=settings)
    assert two.conversation.id == conv.id and two.usage.input_tokens > one.usage.input_tokens
    items = list(sdk.conversations.items.list(conv.id, order="asc"))
    assert [(i.type, getattr(i, "role", None)) for i in items] == [
        ("message", "system"), ("message", "user"), ("message", "assistant"), ("message", "user"),
        ("message", "assistant")]
    assert items[2].content[0].text == one.output_text and items[4].content[0].text == two.output_text
    added = sdk.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "x"}])
    assert sdk.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id).id == added.data[0].id
    sdk.conversations.items.delete(added.data[0].id, conversation_id=conv.id)
    assert len(list(sdk.conversations.items.list(conv.id))) == 5
    assert sdk.conversations.update(conv.id, metadata={"topic": "x"}).metadata == {"topic": "x"}
    assert sdk.conversations.retrieve(conv.id).metadata == {"topic": "x"}
    assert sdk.conversations.delete(conv.id).deleted
    with pytest.raises(openai.NotFoundError):
        sdk.conversations.retrieve(conv.id)


def test_stored_and_conversation_answers_are_their_documented_models(http):
    """The bodies docs/openapi.json documents with ResponseDeleted, ItemList, Conversation and
    ConversationDeleted, field for field (the openai SDK reads them)."""
    from llmctl.server.api import conversations

    made = http.post("/v1/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 2}).json()
    items = http.get(f"/v1/responses/{made['id']}/input_items").json()
    responses_models.ItemList.model_validate(items)
    item = items["data"][0]
    assert items == {"object": "list", "data": [item], "first_id": item["id"], "last_id": item["id"],
                     "has_more": False}
    deleted = http.delete(f"/v1/responses/{made['id']}").json()
    assert deleted == {"id": made["id"], "object": "response", "deleted": True}
    responses_models.ResponseDeleted.model_validate(deleted)
    conv = http.post("/v1/conversations", json={"metadata": {"k": "v"}}).json()
    conversations.Conversation.model_validate(conv)
    assert conv == {"id": conv["id"], "object": "conversation", "created_at": conv["created_at"],
                    "metadata": {"k": "v"}} and isinstance(conv["created_at"], int)
    empty = http.get(f"/v1/conversations/{conv['id']}/items").json()
    assert empty == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    gone = http.delete(f"/v1/conversations/{conv['id']}").json()
    assert gone == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
    conversations.ConversationDeleted.model_validate(gone)


def test_a_response_belongs_to_the_key_that_made_it(tiny_model, tmp_path):
    db = tmp_path / "keys.db"
    with stored_serving(tiny_model, f"sqlite:///{db}", api_keys=("key-one-secret", "key-two-secret")) as (_, url):
        one = openai.OpenAI(base_url=url + "/v1", api_key="key-one-secret", max_retries=0)
        two = openai.OpenAI(base_url=url + "/v1", api_key="key-two-secret", max_retries=0)
        made = one.responses.create(model=MODEL, input="Hi", max_output_tokens=2)
        conv = one.conversations.create()
        assert one.responses.retrieve(made.id).id == made.id
        for attempt in (lambda: two.responses.retrieve(made.id), lambda: two.responses.delete(made.id),
                        lambda: two.responses.input_items.list(made.id), lambda: two.conversations.retrieve(conv.id),
                        lambda: two.responses.create(model=MODEL, input="x", previous_response_id=made.id)):
            with pytest.raises(openai.NotFoundError):
                attempt()
        assert one.responses.retrieve(made.id).id == made.id
    data = db.read_bytes() + (db.with_name("keys.db-wal").read_bytes() if db.with_name("keys.db-wal").exists() else b"")
    assert b"key-one-secret" not in data
    owners = {row[0] for row in sqlite3.connect(db).execute("SELECT owner FROM llmctl_responses")}
    assert owners == {hashlib.sha256(b"key-one-secret").hexdigest()}


def test_ids_are_unguessable(sdk):
    ids = [sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=1).id for _ in range(3)]
    assert len(set(ids)) == 3 and all(len(i) >= len("resp_") + 32 for i in ids)
