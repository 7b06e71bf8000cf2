"""The Conversations API's use cases: conversations and their items, read and changed
in storage. The routes parse and render; they hold no storage call of their own."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from proxy.errors import BadRequest, NotFound
from proxy.jsontext import dumps, loads
from proxy.responses.input_items import normalize_item
from proxy.responses.objects import conversation_object, deleted, list_page
from storage.records import ConversationRecord, ResponseStore, StoredItem

# How many items one request may add, as OpenAI's API allows.
MAX_ITEMS_ADDED = 20


class ConversationService:
    def __init__(
        self,
        store: ResponseStore,
        *,
        retention: int,
        clock: Callable[[], float],
        ids: Callable[[str], str],
    ) -> None:
        self.store = store
        self.retention = retention
        self.clock = clock
        self.ids = ids

    def _expiry(self) -> int:
        """A conversation is kept for the retention after its last change."""
        return int(self.clock()) + self.retention

    async def create(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        metadata = _metadata(body.get("metadata"))
        items = normalize_conversation_items(body.get("items") or [], self.ids)
        now = int(self.clock())
        conversation_id = self.ids("conv")
        await self.store.create_conversation(
            ConversationRecord(
                id=conversation_id,
                owner=owner,
                created_at=now,
                expires_at=now + self.retention,
                metadata=dumps(metadata),
                items=_stored(items),
            )
        )
        return conversation_object(conversation_id, now, metadata)

    async def get(self, conversation_id: str, owner: str) -> dict[str, Any]:
        record = await self._record(conversation_id, owner)
        return conversation_object(record.id, record.created_at, loads(record.metadata))

    async def update(
        self, conversation_id: str, owner: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        metadata = _metadata(body.get("metadata"))
        record = await self.store.update_conversation(
            conversation_id, owner, metadata=dumps(metadata), expires_at=self._expiry()
        )
        if record is None:
            raise conversation_not_found(conversation_id)
        return conversation_object(record.id, record.created_at, metadata)

    async def delete(self, conversation_id: str, owner: str) -> dict[str, Any]:
        if not await self.store.delete_conversation(conversation_id, owner):
            raise conversation_not_found(conversation_id)
        return deleted(conversation_id, "conversation.deleted")

    async def add_items(
        self, conversation_id: str, owner: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        items = normalize_conversation_items(body.get("items"), self.ids)
        added = await self.store.add_conversation_items(
            conversation_id, owner, _stored(items), self._expiry()
        )
        if not added:
            raise conversation_not_found(conversation_id)
        return list_page(items, False)

    async def list_items(
        self,
        conversation_id: str,
        owner: str,
        *,
        after: str | None,
        limit: int,
        order: Literal["asc", "desc"],
    ) -> dict[str, Any]:
        page = await self.store.list_conversation_items(
            conversation_id, owner, after=after, limit=limit, order=order
        )
        if page is None:
            raise conversation_not_found(conversation_id)
        return list_page([loads(i.json) for i in page.items], page.has_more)

    async def get_item(self, conversation_id: str, owner: str, item_id: str) -> str:
        """The item as stored (JSON text)."""
        item = await self.store.get_conversation_item(conversation_id, owner, item_id)
        if item is None:
            await self._record(conversation_id, owner)  # which of the two is missing
            raise _item_not_found(item_id)
        return item.json

    async def delete_item(self, conversation_id: str, owner: str, item_id: str) -> dict[str, Any]:
        """The conversation, as the API answers a deleted item."""
        if not await self.store.delete_conversation_item(conversation_id, owner, item_id):
            await self._record(conversation_id, owner)
            raise _item_not_found(item_id)
        return await self.get(conversation_id, owner)

    async def _record(self, conversation_id: str, owner: str) -> ConversationRecord:
        record = await self.store.get_conversation(conversation_id, owner)
        if record is None:
            raise conversation_not_found(conversation_id)
        return record


def normalize_conversation_items(items: Any, ids: Callable[[str], str]) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise BadRequest("'items' must be an array of items.", param="items")
    if len(items) > MAX_ITEMS_ADDED:
        raise BadRequest(f"At most {MAX_ITEMS_ADDED} items can be added at a time.", param="items")
    return [normalize_item(item, f"items[{i}]", ids) for i, item in enumerate(items)]


def _stored(items: list[dict[str, Any]]) -> tuple[StoredItem, ...]:
    return tuple(StoredItem(i["id"], dumps(i)) for i in items)


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise BadRequest(
            "'metadata' must be an object of at most 16 string values.", param="metadata"
        )
    return value


def conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"Conversation with id '{conversation_id}' not found.",
        param="conversation_id",
        code="conversation_not_found",
    )


def _item_not_found(item_id: str) -> NotFound:
    return NotFound(f"Item with id '{item_id}' not found.", param="item_id", code="item_not_found")
