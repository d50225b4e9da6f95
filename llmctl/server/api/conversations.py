"""The Conversations API (/v1/conversations and its items), as the openai SDK's `conversations.*` sends it.

A conversation is a list of items kept in the response store; a response created with
`conversation: <id>` reads them before its input and appends its input and output to them
(`llmctl.server.api.stored`). Conversations belong to the API key that created them, as responses do.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import Field

from llmctl.errors import NotFound
from llmctl.server.api import rules
from llmctl.server.api.responses_models import FunctionCallItem, FunctionCallOutputItem, MessageItem, OtherItem
from llmctl.server.api.stored import item_dicts, item_list, new_id, owner, page, state_of
from llmctl.server.api.validation import Lenient, Strict, parse_body
from llmctl.server.store import ResponseState

if TYPE_CHECKING:
    from llmctl.server.service import Service

Item = MessageItem | FunctionCallItem | FunctionCallOutputItem | OtherItem
Metadata = Annotated[dict[str, str], Field(max_length=16)]


class ConversationRequest(Lenient):
    items: Annotated[list[Item], Field(max_length=20), rules.documented(rules.conversation_items(0, 20))] | None = None
    metadata: Metadata | None = None


class ConversationUpdate(Lenient):
    metadata: Metadata


class ItemsRequest(Lenient):
    items: Annotated[list[Item], Field(min_length=1, max_length=20), rules.documented(rules.conversation_items(1, 20))]


class Conversation(Strict):
    """A conversation (its items are listed by GET /v1/conversations/{id}/items)."""

    id: str
    object: Literal["conversation"]
    created_at: int
    metadata: dict[str, str]


class ConversationDeleted(Strict):
    """The answer to DELETE /v1/conversations/{id}."""

    id: str
    object: Literal["conversation.deleted"]
    deleted: Literal[True]


ANSWERS = (Conversation, ConversationDeleted)


def _conversation(conversation: dict) -> dict:
    return Conversation(id=conversation["id"], object="conversation", created_at=int(conversation["created_at"]),
                        metadata=conversation["metadata"]).model_dump()


def _find(state: ResponseState, conversation_id: str) -> dict:
    found = state.store.get_conversation(conversation_id, owner())
    if found is None:
        raise NotFound(f"Conversation with id '{conversation_id}' not found.")
    return found


def create(service: Service, body: object, _query: Mapping[str, str]) -> dict:
    """POST /v1/conversations: a new conversation, with its first items."""
    state = state_of(service, "Conversations")
    req = parse_body(ConversationRequest, body)
    items = item_dicts(req.items or [], "items")
    return _conversation(state.store.create_conversation(new_id("conv"), owner(), req.metadata or {}, items,
                                                         state.ttl))


def retrieve(service: Service, _body: object, _query: Mapping[str, str], conversation_id: str) -> dict:
    return _conversation(_find(state_of(service, "Conversations"), conversation_id))


def update(service: Service, body: object, _query: Mapping[str, str], conversation_id: str) -> dict:
    """POST /v1/conversations/{id}: replace its metadata."""
    state = state_of(service, "Conversations")
    req = parse_body(ConversationUpdate, body)
    found = _find(state, conversation_id)
    state.store.update_conversation(conversation_id, owner(), req.metadata)
    return _conversation({**found, "metadata": req.metadata})


def delete(service: Service, _body: object, _query: Mapping[str, str], conversation_id: str) -> dict:
    state = state_of(service, "Conversations")
    if not state.store.delete_conversation(conversation_id, owner()):
        raise NotFound(f"Conversation with id '{conversation_id}' not found.")
    return ConversationDeleted(id=conversation_id, object="conversation.deleted", deleted=True).model_dump()


def add_items(service: Service, body: object, _query: Mapping[str, str], conversation_id: str) -> dict:
    """POST /v1/conversations/{id}/items: append items; the list of those added."""
    state = state_of(service, "Conversations")
    req = parse_body(ItemsRequest, body)
    _find(state, conversation_id)
    items = item_dicts(req.items, "items")
    state.store.add_items(conversation_id, items, state.ttl)
    return item_list(items, has_more=False)


def list_items(service: Service, _body: object, query: Mapping[str, str], conversation_id: str) -> dict:
    state = state_of(service, "Conversations")
    _find(state, conversation_id)
    return page(state.store.items(conversation_id), query)


def _item(state: ResponseState, conversation_id: str, item_id: str) -> dict:
    for item in state.store.items(conversation_id):
        if item["id"] == item_id:
            return item
    raise NotFound(f"Item with id '{item_id}' not found in conversation '{conversation_id}'.")


def retrieve_item(service: Service, _body: object, _query: Mapping[str, str], conversation_id: str,
                  item_id: str) -> dict:
    state = state_of(service, "Conversations")
    _find(state, conversation_id)
    return _item(state, conversation_id, item_id)


def delete_item(service: Service, _body: object, _query: Mapping[str, str], conversation_id: str,
                item_id: str) -> dict:
    """DELETE /v1/conversations/{id}/items/{item_id}: the conversation, without the item."""
    state = state_of(service, "Conversations")
    found = _find(state, conversation_id)
    if not state.store.delete_item(conversation_id, item_id):
        raise NotFound(f"Item with id '{item_id}' not found in conversation '{conversation_id}'.")
    return _conversation(found)
