"""SQLiteStore conversations: create, read, update, delete, items and their pages, items
appended by a saved response, owners and expiry, on real SQLite files."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from storage.records import ConversationRecord, ResponseRecord
from storage.sqlite import SQLiteStore
from tests.unit.storage_support import NOW, items


def conversation(conversation_id: str = "conv_1", **fields: Any) -> ConversationRecord:
    values: dict[str, Any] = {
        "owner": "alice",
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "metadata": '{"topic": "x"}',
    }
    values.update(fields)
    return ConversationRecord(id=conversation_id, **values)


def response_in(conversation_id: str, *added: str, **fields: Any) -> ResponseRecord:
    values: dict[str, Any] = {
        "id": "resp_1",
        "owner": "alice",
        "created_at": NOW,
        "expires_at": NOW + 7200,
        "status": "completed",
        "body": "{}",
        "conversation_id": conversation_id,
        "conversation_items": items(*added),
    }
    values.update(fields)
    return ResponseRecord(**values)


async def ids_in(store: SQLiteStore, conversation_id: str = "conv_1") -> list[str] | None:
    found = await store.all_conversation_items(conversation_id, "alice")
    return None if found is None else [i.id for i in found]


async def test_created_conversation_reads_back_without_items(store):
    """get_conversation returns the record as created, with no items attached."""
    await store.create_conversation(conversation(items=items("a", "b")))
    assert await store.get_conversation("conv_1", "alice") == conversation()


async def test_initial_items_come_back_oldest_first(store):
    """all_conversation_items returns the initial items in their order."""
    await store.create_conversation(conversation(items=items("a", "b", "c")))
    assert await store.all_conversation_items("conv_1", "alice") == items("a", "b", "c")


async def test_conversation_without_items_has_an_empty_item_list(store):
    """A conversation with no items lists as empty, not as absent."""
    await store.create_conversation(conversation())
    assert await store.all_conversation_items("conv_1", "alice") == ()
    page = await store.list_conversation_items("conv_1", "alice", after=None, limit=10, order="asc")
    assert page.items == ()
    assert page.has_more is False


async def test_absent_conversation_reads_as_none(store):
    """Every read of an unknown conversation is None, every change False or None."""
    assert await store.get_conversation("conv_x", "alice") is None
    assert await store.all_conversation_items("conv_x", "alice") is None
    page = await store.list_conversation_items("conv_x", "alice", after=None, limit=1, order="asc")
    assert page is None
    assert await store.get_conversation_item("conv_x", "alice", "a") is None
    assert await store.delete_conversation_item("conv_x", "alice", "a") is False
    assert await store.add_conversation_items("conv_x", "alice", items("a"), NOW + 10) is False
    assert await store.delete_conversation("conv_x", "alice") is False
    updated = await store.update_conversation("conv_x", "alice", metadata="{}", expires_at=NOW + 10)
    assert updated is None


async def test_update_sets_metadata_and_expiry(store, clock):
    """update_conversation replaces the metadata and the expiry, and returns the record."""
    await store.create_conversation(conversation())
    updated = await store.update_conversation(
        "conv_1", "alice", metadata='{"topic": "y"}', expires_at=NOW + 10
    )
    assert updated == conversation(metadata='{"topic": "y"}', expires_at=NOW + 10)
    assert await store.get_conversation("conv_1", "alice") == updated
    clock.now = NOW + 10
    assert await store.get_conversation("conv_1", "alice") is None


async def test_delete_conversation_deletes_its_items(store):
    """Deleting a conversation removes it and its items; a second delete is False."""
    await store.create_conversation(conversation(items=items("a")))
    assert await store.delete_conversation("conv_1", "alice") is True
    assert await store.get_conversation("conv_1", "alice") is None
    assert await store.find_item("a", "alice") is None
    assert await store.delete_conversation("conv_1", "alice") is False


async def test_added_items_go_after_the_existing_ones(store):
    """add_conversation_items appends in order after the items already there."""
    await store.create_conversation(conversation(items=items("a", "b")))
    assert await store.add_conversation_items("conv_1", "alice", items("c", "d"), NOW) is True
    assert await store.add_conversation_items("conv_1", "alice", items("e"), NOW) is True
    assert await ids_in(store) == ["a", "b", "c", "d", "e"]


async def test_adding_items_pushes_the_expiry_forward_only(store, clock):
    """Adding items moves the expiry later, never earlier."""
    await store.create_conversation(conversation(expires_at=NOW + 100))
    await store.add_conversation_items("conv_1", "alice", items("a"), NOW + 500)
    assert (await store.get_conversation("conv_1", "alice")).expires_at == NOW + 500
    await store.add_conversation_items("conv_1", "alice", items("b"), NOW + 200)
    assert (await store.get_conversation("conv_1", "alice")).expires_at == NOW + 500
    clock.now = NOW + 499
    assert await ids_in(store) == ["a", "b"]


async def test_concurrent_additions_keep_every_item(store):
    """Concurrent additions (one group commit) lose no item and keep each call's items together."""
    await store.create_conversation(conversation())
    await asyncio.gather(
        *(
            store.add_conversation_items("conv_1", "alice", items(f"{n}a", f"{n}b"), NOW)
            for n in range(20)
        )
    )
    found = await ids_in(store)
    assert found == [f"{n}{part}" for n in range(20) for part in "ab"]


async def test_get_and_delete_one_item(store):
    """One item reads by id and deletes alone; the others stay in order."""
    await store.create_conversation(conversation(items=items("a", "b", "c")))
    assert await store.get_conversation_item("conv_1", "alice", "b") == items("b")[0]
    assert await store.delete_conversation_item("conv_1", "alice", "b") is True
    assert await store.get_conversation_item("conv_1", "alice", "b") is None
    assert await store.delete_conversation_item("conv_1", "alice", "b") is False
    assert await ids_in(store) == ["a", "c"]


async def test_items_are_appended_after_a_deleted_last_item(store):
    """Deleting the last item and adding another keeps positions unique and in order."""
    await store.create_conversation(conversation(items=items("a", "b")))
    await store.delete_conversation_item("conv_1", "alice", "b")
    await store.add_conversation_items("conv_1", "alice", items("c"), NOW)
    assert await ids_in(store) == ["a", "c"]


async def test_item_of_another_conversation_is_absent(store):
    """get_conversation_item only finds items of the conversation named."""
    await store.create_conversation(conversation("conv_1", items=items("a")))
    await store.create_conversation(conversation("conv_2", items=items("b")))
    assert await store.get_conversation_item("conv_2", "alice", "a") is None
    assert await store.delete_conversation_item("conv_2", "alice", "a") is False


PAGE_CASES = [
    # after, limit, order, expected ids, has_more
    (None, 2, "asc", ["i0", "i1"], True),
    ("i0", 2, "asc", ["i1", "i2"], True),
    ("i1", 2, "asc", ["i2", "i3"], False),
    ("i2", 2, "asc", ["i3"], False),
    ("i3", 2, "asc", [], False),
    (None, 4, "desc", ["i3", "i2", "i1", "i0"], False),
    (None, 3, "desc", ["i3", "i2", "i1"], True),
    ("i2", 1, "desc", ["i1"], True),
    ("i1", 5, "desc", ["i0"], False),
    ("unknown", 2, "desc", [], False),
]


@pytest.mark.parametrize(("after", "limit", "order", "expected", "has_more"), PAGE_CASES)
async def test_conversation_items_page(store, after, limit, order, expected, has_more):
    """list_conversation_items pages by position after an exclusive item-id cursor."""
    await store.create_conversation(conversation(items=items("i0", "i1")))
    await store.add_conversation_items("conv_1", "alice", items("i2", "i3"), NOW)
    page = await store.list_conversation_items(
        "conv_1", "alice", after=after, limit=limit, order=order
    )
    assert [i.id for i in page.items] == expected
    assert page.has_more is has_more


async def test_saved_response_appends_its_conversation_items(store):
    """A save appends its conversation_items and pushes the conversation's expiry to its own."""
    await store.create_conversation(conversation(items=items("a"), expires_at=NOW + 100))
    await store.save_response(response_in("conv_1", "in_1", "out_1", expires_at=NOW + 7200))
    assert await ids_in(store) == ["a", "in_1", "out_1"]
    assert (await store.get_conversation("conv_1", "alice")).expires_at == NOW + 7200


async def test_responses_saved_together_append_in_order(store):
    """Responses of one conversation committed in one batch append in call order."""
    await store.create_conversation(conversation())
    await asyncio.gather(
        *(store.save_response(response_in("conv_1", f"m{n}", id=f"resp_{n}")) for n in range(10))
    )
    assert store.write_stats.batches < 10
    assert await ids_in(store) == [f"m{n}" for n in range(10)]


async def test_save_without_conversation_items_leaves_the_conversation_alone(store):
    """A save naming a conversation but no items (queued, in progress) appends nothing."""
    await store.create_conversation(conversation(expires_at=NOW + 100))
    await store.save_response(response_in("conv_1", status="in_progress"))
    assert await ids_in(store) == []
    assert (await store.get_conversation("conv_1", "alice")).expires_at == NOW + 100


@pytest.mark.parametrize("how", ["deleted", "other_owner", "expired"])
async def test_save_into_an_unusable_conversation_keeps_the_response(store, clock, how):
    """A conversation gone, foreign or expired gets no items; the response is still saved."""
    await store.create_conversation(
        conversation(owner="bob" if how == "other_owner" else "alice", expires_at=NOW + 10)
    )
    if how == "deleted":
        await store.delete_conversation("conv_1", "alice")
    if how == "expired":
        clock.now = NOW + 10
    await store.save_response(response_in("conv_1", "in_1"))
    assert await store.get_response("resp_1", "alice") == "{}"
    assert await store.find_item("in_1", "alice") is None
    assert await store.find_item("in_1", "bob") is None
    if how == "other_owner":
        assert await store.all_conversation_items("conv_1", "bob") == ()


async def test_another_owners_conversation_is_absent(store):
    """Every read and change of another owner's conversation behaves as if it were absent."""
    await store.create_conversation(conversation(items=items("a")))
    assert await store.get_conversation("conv_1", "bob") is None
    assert await store.all_conversation_items("conv_1", "bob") is None
    page = await store.list_conversation_items("conv_1", "bob", after=None, limit=5, order="asc")
    assert page is None
    assert await store.get_conversation_item("conv_1", "bob", "a") is None
    assert await store.find_item("a", "bob") is None
    assert await store.delete_conversation_item("conv_1", "bob", "a") is False
    assert await store.add_conversation_items("conv_1", "bob", items("b"), NOW + 10) is False
    updated = await store.update_conversation("conv_1", "bob", metadata="{}", expires_at=NOW)
    assert updated is None
    assert await store.delete_conversation("conv_1", "bob") is False
    assert await store.get_conversation("conv_1", "alice") == conversation()
    assert await ids_in(store) == ["a"]


async def test_expired_conversation_is_absent(store, clock):
    """An expired conversation and its items are absent to reads and changes, before a purge."""
    await store.create_conversation(conversation(items=items("a"), expires_at=NOW + 60))
    clock.now = NOW + 60
    assert await store.get_conversation("conv_1", "alice") is None
    assert await store.all_conversation_items("conv_1", "alice") is None
    assert await store.get_conversation_item("conv_1", "alice", "a") is None
    assert await store.find_item("a", "alice") is None
    assert await store.add_conversation_items("conv_1", "alice", items("b"), NOW + 999) is False
    assert await store.delete_conversation("conv_1", "alice") is False


async def test_a_conversation_is_claimed_by_one_turn_at_a_time(store):
    """A claim holds the conversation against other turns, is renewed by its holder, and
    once released is free for the next turn."""
    await store.create_conversation(conversation())
    assert await store.claim_conversation("conv_1", "alice", "resp_a", NOW + 60) is True
    assert await store.claim_conversation("conv_1", "alice", "resp_b", NOW + 60) is False
    assert await store.claim_conversation("conv_1", "alice", "resp_a", NOW + 120) is True
    await store.release_conversation("conv_1", "resp_b")  # not the holder: no effect
    assert await store.claim_conversation("conv_1", "alice", "resp_b", NOW + 60) is False
    await store.release_conversation("conv_1", "resp_a")
    assert await store.claim_conversation("conv_1", "alice", "resp_b", NOW + 60) is True


async def test_a_claim_not_renewed_lapses(store, clock):
    """A claim whose holder stopped renewing it (a daemon that died) lapses at its time,
    and the next turn may take the conversation."""
    await store.create_conversation(conversation())
    assert await store.claim_conversation("conv_1", "alice", "resp_a", NOW + 60) is True
    clock.now = NOW + 59
    assert await store.claim_conversation("conv_1", "alice", "resp_b", NOW + 119) is False
    clock.now = NOW + 60
    assert await store.claim_conversation("conv_1", "alice", "resp_b", NOW + 120) is True


async def test_claiming_an_absent_conversation_says_so(store):
    """An absent conversation, or another owner's, cannot be claimed: None, not False."""
    await store.create_conversation(conversation())
    assert await store.claim_conversation("conv_none", "alice", "resp_a", NOW + 60) is None
    assert await store.claim_conversation("conv_1", "bob", "resp_a", NOW + 60) is None


async def test_every_claim_ends_at_once_after_a_restart(store):
    """release_all_conversations frees every conversation (nothing runs after a restart)."""
    for name in ("conv_1", "conv_2"):
        await store.create_conversation(conversation(name))
        assert await store.claim_conversation(name, "alice", f"resp_{name}", NOW + 60)
    assert await store.release_all_conversations() == 2
    assert await store.claim_conversation("conv_2", "alice", "resp_new", NOW + 60) is True
