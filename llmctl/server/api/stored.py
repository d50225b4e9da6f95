"""Stored responses, the stateful half of /v1/responses: `store`, `previous_response_id`, `conversation`,
`background` runs, and the routes that read them back (GET/DELETE /v1/responses/{id}, its input_items, cancel).

`responses_api.handle` asks `prepare` what a request continues (the items the model reads before the new
input), and hands its answer to `save` (or its events to `saving`, or its run to `run_in_background`).
Each response belongs to the API key that created it (a hash of it; "" on a server without keys): another
key gets a 404, as for an id that does not exist.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from flask import has_request_context, request
from pydantic import BaseModel

from llmctl.errors import InvalidRequest, LLMCtlError, NotFound
from llmctl.server.api.common import sse_event
from llmctl.server.api.responses_models import ItemList, ResponseDeleted
from llmctl.server.security import OWNER_ENV
from llmctl.server.store import ResponseState, StoredResponse
from llmctl.server.store.sql import UNFINISHED
from llmctl.server.store.state import Job, event_rows

if TYPE_CHECKING:
    from llmctl.server.pipeline import Run
    from llmctl.server.service import Service

log = logging.getLogger(__name__)

FINAL_EVENTS = ("response.completed", "response.incomplete")
ID_PREFIXES = {"message": "msg", "function_call": "fc", "function_call_output": "fco", "reasoning": "rs"}
FLUSH_S = 0.05  # a background response's events reach the database at least this often
POLL_S = 0.1  # how often a stream of another server's background response looks for new events
NO_STORE = "this server keeps no responses (it was started with --responses-store none)"


class _Text(BaseModel):
    """A string input: one user message."""

    type: str = "message"
    role: str = "user"
    content: str


def owner() -> str:
    """Who a stored item belongs to: the hash of the request's API key the auth hook recorded (never the key),
    or "" on a server without keys."""
    return request.environ.get(OWNER_ENV, "") if has_request_context() else ""


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"  # 122 random bits from os.urandom: unguessable


@dataclass
class Turn:
    """What a request continues and whether its answer is kept."""

    owner: str = ""
    store: bool = False
    background: bool = False
    previous_response_id: str | None = None
    conversation_id: str | None = None
    prior: list[dict] = field(default_factory=list)  # the items the model reads before this input
    input_items: list[dict] = field(default_factory=list)  # this request's input, with ids
    job: Job | None = None

    def fields(self) -> dict:
        """The response object's fields that say how it is kept."""
        return {"store": self.store, "previous_response_id": self.previous_response_id,
                "background": self.background,
                "conversation": {"id": self.conversation_id} if self.conversation_id else None}

    def disconnected(self, client_gone: Callable[[], bool] | None) -> Callable[[], bool] | None:
        """A background run stops when cancelled, not when its client leaves."""
        job = self.job
        return (lambda: job.cancelled) if job is not None else client_gone


def item_dicts(items: str | Sequence[BaseModel], param: str) -> list[dict]:
    """Input items as stored and listed (OpenAI's shape: content as parts, an id on each)."""
    if isinstance(items, str):
        items = [_Text(content=items)]
    out = []
    for i, item in enumerate(items):
        data = item.model_dump(mode="json", exclude_none=True)
        kind = data.get("type", "message")
        if kind not in ID_PREFIXES:
            raise InvalidRequest(f"Items of type '{kind}' are not supported; send messages, function_call and "
                                 "function_call_output items.", param=f"{param}[{i}]")
        if kind == "message":
            part = "output_text" if data["role"] == "assistant" else "input_text"
            if isinstance(data["content"], str):
                data["content"] = [{"type": part, "text": data["content"]}]
            data = {"type": "message", **data, "status": "completed"}
        out.append({"id": new_id(ID_PREFIXES[kind]), **data})
    return out


def prepare(service: Service, req) -> Turn:
    """What the request continues (previous_response_id or conversation), checked; 400/404 when it cannot."""
    state = service.responses
    background = bool(req.background)
    conversation = req.conversation.get("id") if isinstance(req.conversation, dict) else req.conversation
    if req.conversation is not None and not isinstance(conversation, str):
        raise InvalidRequest("'conversation' must be a conversation id, or an object with an 'id' string.",
                             param="conversation")
    asked = [name for name, given in (("store", req.store), ("previous_response_id", req.previous_response_id),
                                      ("conversation", conversation), ("background", background)) if given]
    if state is None:
        if asked:
            raise InvalidRequest(f"'{asked[0]}' needs stored responses, but {NO_STORE}. Send the whole "
                                 "conversation in 'input' (and store: false).", param=asked[0])
        return Turn()
    if background and req.store is False:
        raise InvalidRequest("background: true needs store: true (a background response is read back by its id).",
                             param="background")
    if req.previous_response_id is not None and conversation is not None:
        raise InvalidRequest("Send either previous_response_id or conversation, not both.", param="conversation")
    who = owner()
    turn = Turn(owner=who, store=req.store is not False, background=background,
                previous_response_id=req.previous_response_id, conversation_id=conversation)
    if req.previous_response_id is not None:
        previous = find(state, req.previous_response_id, "previous_response_id")
        if previous.status in UNFINISHED:
            raise InvalidRequest(f"Response '{previous.id}' is still {previous.status}; continue it once it has "
                                 "finished.", param="previous_response_id")
        turn.prior = previous.history + previous.body["output"]
    elif conversation is not None:
        if state.store.get_conversation(conversation, who) is None:
            raise NotFound(f"Conversation with id '{conversation}' not found.", param="conversation")
        turn.prior = state.store.items(conversation)
    turn.input_items = item_dicts(req.input, "input")
    if background:
        turn.job = Job(id="")
    return turn


def find(state: ResponseState, response_id: str, param: str | None = None) -> StoredResponse:
    found = state.store.get_response(response_id, owner())
    if found is None:
        raise NotFound(f"Response with id '{response_id}' not found.", param=param)
    return found


def _record(turn: Turn, body: dict, status: str) -> StoredResponse:
    return StoredResponse(body["id"], turn.owner, status, body, turn.input_items, turn.prior + turn.input_items,
                          turn.background, turn.conversation_id, time.time())


def save(service: Service, turn: Turn, body: dict) -> None:
    """Keep a finished response (before the client gets it: an answered response is a stored one)."""
    state = service.responses
    if state is None or not turn.store:
        return
    state.store.put_response(_record(turn, body, body["status"]), state.ttl)
    _extend_conversation(state, turn, body)


def _extend_conversation(state: ResponseState, turn: Turn, body: dict) -> None:
    if turn.conversation_id is not None:
        state.store.add_items(turn.conversation_id, turn.input_items + body["output"], state.ttl)


def saving(service: Service, turn: Turn, events: Generator[dict, None, None]) -> Generator[dict, None, None]:
    """A stream's events, the response saved as its final event goes out."""
    try:
        for event in events:
            if event["type"] in FINAL_EVENTS:
                save(service, turn, event["response"])
            yield event
    finally:
        events.close()


def run_in_background(service: Service, turn: Turn, queued: dict, run: Run,
                      produce: Callable[[], Iterator[dict]], stream: bool) -> dict | Iterator[str]:
    """Store the response as queued, generate it in a thread, and answer at once (or follow its events)."""
    state, job = service.responses, turn.job
    assert state is not None and job is not None
    job.id = queued["id"]
    record = _record(turn, queued, "queued")
    try:
        state.store.put_response(record, state.ttl, state.instance, state.lease_until())
    except BaseException:
        run.end()
        raise
    state.jobs[job.id] = job
    threading.Thread(target=_work, args=(state, turn, record, run, produce), name="llmctl-background",
                     daemon=True).start()
    return follow(state, job.id, -1) if stream else queued


def _work(state: ResponseState, turn: Turn, record: StoredResponse, run: Run,
          produce: Callable[[], Iterator[dict]]) -> None:
    job = turn.job
    assert job is not None
    final, error = None, None
    try:
        state.store.set_status(job.id, "in_progress", only_from=("queued",))
        pending, flushed = [], time.monotonic()
        for event in produce():
            job.add(event)
            pending.append(event)
            if event["type"] in FINAL_EVENTS:
                final = event["response"]
            elif event["type"] == "error":
                error = event["message"]
            if time.monotonic() - flushed >= FLUSH_S:
                state.store.add_events(job.id, event_rows(pending))
                pending, flushed = [], time.monotonic()
        state.store.add_events(job.id, event_rows(pending))
    except LLMCtlError as exc:
        error = exc.message
    except Exception:
        log.exception("Background response %s failed", job.id)
        error = "Internal server error; see the server log."
    finally:
        run.end()
    try:
        if final is not None and state.store.finish_response(job.id, final):
            _extend_conversation(state, turn, final)
        elif final is None and (error is not None or not job.cancelled):
            state.fail(record, error or "Generation ended without an answer.")
        elif final is None:
            state.store.set_status(job.id, "cancelled")
    except LLMCtlError as exc:
        log.error("Could not record the end of background response %s: %s", job.id, exc.message)
    finally:
        state.jobs.pop(job.id, None)
        job.end()
        state.store.release()


def follow(state: ResponseState, response_id: str, after: int) -> Iterator[str]:
    """A background response's events numbered above ``after``, live until it ends (from this server's
    memory when it runs here, else from the database)."""
    job = state.jobs.get(response_id)
    while True:
        if job is not None:
            events, done = job.after(after, timeout=1.0)
        else:
            done = state.store.statuses([response_id]).get(response_id) not in UNFINISHED
            events = [json.loads(data) for _, data in state.store.events(response_id, after)]
        for event in events:
            after = event["sequence_number"]
            yield sse_event(event["type"], event)
        if done:
            return
        if job is None and not events:
            time.sleep(POLL_S)


# ---- the routes that read stored responses ------------------------------------------------------------
def state_of(service: Service, what: str = "Responses") -> ResponseState:
    if service.responses is None:
        raise NotFound(f"{what} cannot be read back: {NO_STORE}.")
    return service.responses


def retrieve(service: Service, _body: object, query: Mapping[str, str], response_id: str) -> dict | Iterator[str]:
    """GET /v1/responses/{id}: the response; with ?stream=true, a background response's events again."""
    state = state_of(service)
    found = find(state, response_id)
    if query.get("stream", "false").lower() != "true":
        return found.body
    if not found.background:
        raise InvalidRequest("Only background responses can be streamed again; this one was not created with "
                             "background: true.", param="stream")
    return follow(state, response_id, _int(query, "starting_after", -1, -1))


def delete(service: Service, _body: object, _query: Mapping[str, str], response_id: str) -> dict:
    state = state_of(service)
    found = find(state, response_id)
    if found.status in UNFINISHED:
        _cancel(state, found)
    state.store.delete_response(response_id, owner())
    return ResponseDeleted(id=response_id, object="response", deleted=True).model_dump()


def cancel(service: Service, _body: object, _query: Mapping[str, str], response_id: str) -> dict:
    """POST /v1/responses/{id}/cancel: stop a background response (a finished one is returned as it is)."""
    state = state_of(service)
    found = find(state, response_id)
    if not found.background:
        raise InvalidRequest("Only background responses can be cancelled; this one was not created with "
                             "background: true.", param="response_id")
    if found.status in UNFINISHED:
        _cancel(state, found)
    return find(state, response_id).body


def _cancel(state: ResponseState, found: StoredResponse) -> None:
    # The status first: the job (here, or on the replica that runs it, through its next lease round) stops.
    if state.store.set_status(found.id, "cancelled"):
        job = state.jobs.get(found.id)
        if job is not None:
            job.cancelled = True


def input_items(service: Service, _body: object, query: Mapping[str, str], response_id: str) -> dict:
    """GET /v1/responses/{id}/input_items: the request's own input items (not those it continued)."""
    return page(find(state_of(service), response_id).input_items, query)


def page(items: list[dict], query: Mapping[str, str]) -> dict:
    """One page of a list, as OpenAI's cursor pages go: ?after=ID&limit=N&order=asc|desc (desc by default)."""
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest(f"order must be 'asc' or 'desc', got '{order}'.", param="order")
    limit = _int(query, "limit", 20, 1, 100)
    ordered = items if order == "asc" else items[::-1]
    start = 0
    if query.get("after"):
        ids = [item["id"] for item in ordered]
        if query["after"] not in ids:
            raise InvalidRequest(f"No item with id '{query['after']}' to list after.", param="after")
        start = ids.index(query["after"]) + 1
    chunk = ordered[start:start + limit]
    return item_list(chunk, has_more=start + limit < len(ordered))


def item_list(items: list[dict], has_more: bool) -> dict:
    """``items`` as a list page's answer."""
    return ItemList(object="list", data=items, first_id=items[0]["id"] if items else None,
                    last_id=items[-1]["id"] if items else None, has_more=has_more).model_dump()


def _int(query: Mapping[str, str], name: str, default: int, low: int, high: int | None = None) -> int:
    raw = query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be an integer, got '{raw[:20]}'.", param=name) from None
    if value < low or (high is not None and value > high):
        raise InvalidRequest(f"{name} must be between {low} and {high}." if high is not None
                             else f"{name} must be at least {low}.", param=name)
    return value
