"""Background responses against a real server with a real (tiny, slowed) model: queued -> in_progress ->
completed or cancelled, polling, streaming again from an event offset, and a run whose server stopped."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from llmctl.server.store import SQLStore, StoredResponse
from llmctl.server.store.state import CRASHED, SHUT_DOWN
from tests.conftest import stored_serving, wait_for

MODEL = "tiny-llama"
LONG = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    db = tmp_path_factory.mktemp("store") / "responses.db"
    # Every forward pass 20 ms slower: a long answer is still running when the test acts on it.
    with stored_serving(tiny_model, f"sqlite:///{db}", slow=0.02) as (service, url):
        yield service, url, db


@pytest.fixture()
def sdk(server):
    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0)


def poll(sdk, response_id: str, until: tuple[str, ...]):
    seen = []
    assert wait_for(lambda: seen.append(sdk.responses.retrieve(response_id)) or seen[-1].status in until, 60)
    return seen


def test_a_background_response_is_queued_then_completes(sdk):
    made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=8, background=True, temperature=0,
                                extra_body=LONG)
    assert made.status == "queued" and made.background is True and made.output == []
    seen = poll(sdk, made.id, ("incomplete",))  # it stopped at max_output_tokens, as OpenAI says it
    assert seen[-1].usage.output_tokens == 8 and seen[-1].output_text
    assert {s.status for s in seen} <= {"queued", "in_progress", "incomplete"}
    plain = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=8, temperature=0, store=False,
                                 extra_body=LONG)
    assert seen[-1].output_text == plain.output_text


def test_cancel_stops_a_running_response(sdk, server):
    service = server[0]
    made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=200, background=True, extra_body=LONG)
    poll(sdk, made.id, ("in_progress",))
    cancelled = sdk.responses.cancel(made.id)
    assert cancelled.status == "cancelled"
    assert wait_for(lambda: made.id not in service.responses.jobs, 30)  # the job saw it and stopped
    after = sdk.responses.retrieve(made.id)
    assert after.status == "cancelled" and sdk.responses.cancel(made.id).status == "cancelled"
    assert wait_for(lambda: service.engine.running == 0, 30)  # the engine dropped the sequence


def test_a_background_stream_can_be_followed_again_from_an_offset(sdk, server):
    stream = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=6, background=True, stream=True,
                                  temperature=0, extra_body=LONG)
    first = [event.model_dump() for event in stream]
    assert first[-1]["type"] == "response.incomplete" and first[-1]["response"]["background"] is True
    numbers = [e["sequence_number"] for e in first]
    assert numbers == list(range(len(first)))
    again = []
    with httpx.stream("GET", f"{server[1]}/v1/responses/{first[-1]['response']['id']}",
                      params={"stream": "true", "starting_after": 3}, timeout=30) as r:
        assert r.status_code == 200
        again = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in again] == numbers[4:]
    assert [e["type"] for e in again] == [e["type"] for e in first[4:]]
    # The events come from the database too, as another server sharing it would read them.
    stored = server[0].responses.store.events(first[-1]["response"]["id"], 3)
    assert [seq for seq, _ in stored] == numbers[4:]


def test_a_response_whose_server_stopped_ends_failed(server, sdk):
    """A row left in_progress by a server that died (its lease not renewed) is failed by the next round."""
    state = server[0].responses
    body = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=1).model_dump()
    orphan = StoredResponse("resp_orphan" + "0" * 24, "", "in_progress", {**body, "id": "resp_orphan" + "0" * 24},
                            [], [], background=True, created_at=time.time())
    state.store.put_response(orphan, ttl=60, instance="a-dead-server", lease_until=time.time() - 1)
    seen = poll(sdk, orphan.id, ("failed",))
    assert seen[-1].error.message == CRASHED and seen[-1].error.code == "server_error"


def test_shutdown_fails_what_it_was_running(tiny_model, tmp_path):
    url = f"sqlite:///{tmp_path / 'r.db'}"
    with stored_serving(tiny_model, url, slow=0.05) as (_, base):
        sdk = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        made = sdk.responses.create(model=MODEL, input="Hi", max_output_tokens=200, background=True,
                                    extra_body=LONG)
        poll(sdk, made.id, ("in_progress",))
    found = SQLStore(url).get_response(made.id, "")  # the server has shut down: read the file it left
    assert found.status == "failed" and found.body["error"]["message"] == SHUT_DOWN
