"""SQLiteStore responses: upserts, chains, input item pages, events, find_item, owners and
expiry, on real SQLite files."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from storage.records import ConversationRecord, ResponseRecord, StoredItem
from storage.sqlite import SQLiteStore
from tests.unit.storage_support import NOW, items, response


def chain_of(length: int, prefix: str = "resp_", **fields: Any) -> list[ResponseRecord]:
    return [
        response(
            f"{prefix}{n}",
            previous_response_id=f"{prefix}{n - 1}" if n else None,
            turn_messages=json.dumps([{"role": "user", "content": f"turn {n}"}]),
            turn_tokens=n,
            **fields,
        )
        for n in range(length)
    ]


async def save_all(store: SQLiteStore, records: list[ResponseRecord]) -> None:
    await asyncio.gather(*(store.save_response(r) for r in records))


async def test_saved_response_body_is_returned_byte_for_byte(store):
    """get_response returns the stored body text exactly as it was saved."""
    body = '{"id": "resp_1",  "output": ["é", 1.50]}'
    await store.save_response(response(body=body))
    assert await store.get_response("resp_1", "alice") == body


async def test_absent_response_reads_as_none(store):
    """An id never saved reads as None and deletes as False."""
    assert await store.get_response("resp_x", "alice") is None
    assert await store.load_chain("resp_x", "alice") is None
    assert await store.delete_response("resp_x", "alice") is False


async def test_later_save_updates_status_body_and_turn(store):
    """A second save of the same id replaces status, body, turn messages and tokens."""
    await store.save_response(response(status="queued", turn_messages="[]", turn_tokens=0))
    await store.save_response(
        response(status="completed", turn_messages='[{"role": "assistant"}]', turn_tokens=7)
    )
    assert json.loads(await store.get_response("resp_1", "alice"))["status"] == "completed"
    chain = await store.load_chain("resp_1", "alice")
    assert chain.turn_messages == ('[{"role": "assistant"}]',)
    assert chain.turn_tokens == (7,)


async def test_input_items_are_written_once(store):
    """Input items of the first save stay; later saves cannot change them."""
    await store.save_response(response(status="queued", input_items=items("in_a", "in_b")))
    await store.save_response(response(status="completed", input_items=items("in_x", "in_y")))
    page = await store.list_input_items("resp_1", "alice", after=None, limit=10, order="asc")
    assert [i.id for i in page.items] == ["in_a", "in_b"]


async def test_output_items_and_events_are_replaced_by_the_latest_save(store):
    """Output items and events are those of the latest save, fewer or more."""
    await store.save_response(
        response(status="in_progress", output_items=items("o1", "o2", "o3"), events=("e0",))
    )
    await store.save_response(
        response(status="completed", output_items=items("o9"), events=("e0", "e1", "e2"))
    )
    assert await store.find_item("o9", "alice") is not None
    assert await store.find_item("o2", "alice") is None
    assert await store.get_events("resp_1", "alice", starting_after=None) == ["e0", "e1", "e2"]


async def test_saves_of_one_response_in_one_batch_end_as_the_last_one(store):
    """Three saves of a response in one batch end as the last, as if committed one by one."""
    await asyncio.gather(
        store.save_response(response(status="queued", input_items=items("in_a"))),
        store.save_response(
            response(status="in_progress", output_items=items("o1", "o2"), events=("e0",))
        ),
        store.save_response(
            response(status="completed", output_items=items("o3"), events=("e0", "e1"))
        ),
    )
    assert store.write_stats.batches == 1
    assert json.loads(await store.get_response("resp_1", "alice"))["status"] == "completed"
    assert await store.find_item("o3", "alice") is not None
    assert await store.find_item("o1", "alice") is None
    assert await store.get_events("resp_1", "alice", starting_after=None) == ["e0", "e1"]


async def test_delete_response_removes_its_items_and_events(store):
    """Deleting a response deletes it with its items and events; a second delete is False."""
    await store.save_response(response(input_items=items("in_a"), events=("e0",)))
    assert await store.delete_response("resp_1", "alice") is True
    assert await store.get_response("resp_1", "alice") is None
    assert await store.find_item("in_a", "alice") is None
    assert await store.get_events("resp_1", "alice", starting_after=None) is None
    assert await store.delete_response("resp_1", "alice") is False


async def test_chain_is_returned_oldest_first(store):
    """load_chain walks previous_response_id back to the root and returns it root-first."""
    await save_all(store, chain_of(4))
    chain = await store.load_chain("resp_3", "alice")
    assert chain.response_ids == ("resp_0", "resp_1", "resp_2", "resp_3")
    assert chain.turn_messages[0] == json.dumps([{"role": "user", "content": "turn 0"}])
    assert chain.turn_tokens == (0, 1, 2, 3)
    assert chain.broken_at is None


async def test_chain_from_the_middle_ignores_later_turns(store):
    """A chain ends at the response asked for, not at the newest one."""
    await save_all(store, chain_of(4))
    chain = await store.load_chain("resp_1", "alice")
    assert chain.response_ids == ("resp_0", "resp_1")


@pytest.mark.parametrize("how", ["deleted", "expired", "other_owner", "never_saved"])
async def test_chain_reports_the_first_missing_ancestor(store, clock, how):
    """A missing ancestor ends the chain: broken_at names it, the later turns are returned."""
    records = chain_of(4)
    if how == "expired":
        records[1] = response(
            "resp_1", previous_response_id="resp_0", expires_at=NOW + 10, turn_tokens=1
        )
    if how == "other_owner":
        records[1] = response("resp_1", previous_response_id="resp_0", owner="mallory")
    if how == "never_saved":
        del records[1]
    await save_all(store, records)
    if how == "deleted":
        await store.delete_response("resp_1", "alice")
    clock.now = NOW + 10

    chain = await store.load_chain("resp_3", "alice")
    assert chain.response_ids == ("resp_2", "resp_3")
    assert chain.broken_at == "resp_1"


async def test_chain_of_1000_turns_is_one_statement(store):
    """A 1,000-turn chain loads complete with the same single SQL statement as a 2-turn one."""
    await save_all(store, chain_of(1000) + chain_of(2, prefix="short_"))
    store.chains.clear()  # read from the database, not from the cache of recent chains
    statements: list[str] = []
    await store.set_read_trace(statements.append)

    long = await store.load_chain("resp_999", "alice")
    for_long = len(statements)
    short = await store.load_chain("short_1", "alice")
    await store.set_read_trace(None)

    assert len(long.response_ids) == 1000
    assert long.response_ids[0] == "resp_0"
    assert long.turn_tokens == tuple(range(1000))
    assert long.broken_at is None
    assert len(short.response_ids) == 2
    assert for_long == 1
    assert len(statements) == 2


async def test_the_next_turn_of_a_chain_is_read_from_memory(store):
    """Saving a turn whose parent chain is known caches its chain: continuing it reads
    no SQL, and the chain is the same as the database's."""
    for record in chain_of(50):
        await store.save_response(record)
    statements: list[str] = []
    await store.set_read_trace(statements.append)
    cached = await store.load_chain("resp_49", "alice")
    await store.set_read_trace(None)
    assert statements == []
    store.chains.clear()
    assert await store.load_chain("resp_49", "alice") == cached


async def test_chain_carries_the_mcp_servers_listed_at_its_tip(store):
    """mcp_listed (cumulative, saved with each response) comes back with the chain,
    from the cache and from the database alike."""
    records = chain_of(3)
    records[1] = response("resp_1", previous_response_id="resp_0", mcp_listed=("calc",))
    records[2] = response("resp_2", previous_response_id="resp_1", mcp_listed=("calc", "time"))
    for record in records:
        await store.save_response(record)
    cached = await store.load_chain("resp_2", "alice")
    store.chains.clear()
    assert (await store.load_chain("resp_2", "alice")).mcp_listed == ("calc", "time")
    assert cached.mcp_listed == ("calc", "time")
    assert (await store.load_chain("resp_1", "alice")).mcp_listed == ("calc",)
    assert (await store.load_chain("resp_0", "alice")).mcp_listed == ()


async def test_cached_chains_respect_owner_delete_and_expiry(store, clock):
    """A cached chain is not served to another owner, after a delete in it, or once its
    oldest turn has expired."""
    for record in chain_of(3):
        await store.save_response(record)
    assert await store.load_chain("resp_2", "bob") is None
    assert await store.delete_response("resp_0", "alice")
    assert (await store.load_chain("resp_2", "alice")).broken_at == "resp_0"
    for record in chain_of(2, prefix="new_"):
        await store.save_response(record)
    assert (await store.load_chain("new_1", "alice")) is not None
    clock.now = NOW + 3600
    assert await store.load_chain("new_1", "alice") is None


async def test_another_owners_response_is_absent(store):
    """Every read and delete of another owner's response behaves as if it did not exist."""
    await store.save_response(
        response(input_items=items("in_a"), output_items=items("out_a"), events=("e0",))
    )
    assert await store.get_response("resp_1", "bob") is None
    assert await store.load_chain("resp_1", "bob") is None
    page = await store.list_input_items("resp_1", "bob", after=None, limit=10, order="asc")
    assert page is None
    assert await store.get_events("resp_1", "bob", starting_after=None) is None
    assert await store.find_item("in_a", "bob") is None
    assert await store.delete_response("resp_1", "bob") is False
    assert await store.get_response("resp_1", "alice") is not None


async def test_expired_response_is_absent_to_every_read(store, clock):
    """Once expires_at <= now the response reads as absent everywhere, before any purge."""
    await store.save_response(
        response(expires_at=NOW + 60, input_items=items("in_a"), events=("e0",))
    )
    clock.now = NOW + 59
    assert await store.get_response("resp_1", "alice") is not None
    clock.now = NOW + 60
    assert await store.get_response("resp_1", "alice") is None
    assert await store.load_chain("resp_1", "alice") is None
    page = await store.list_input_items("resp_1", "alice", after=None, limit=10, order="asc")
    assert page is None
    assert await store.get_events("resp_1", "alice", starting_after=None) is None
    assert await store.find_item("in_a", "alice") is None
    assert await store.delete_response("resp_1", "alice") is False


PAGE_CASES = [
    # after, limit, order, expected ids, has_more
    (None, 2, "asc", ["i0", "i1"], True),
    ("i1", 2, "asc", ["i2", "i3"], True),
    ("i2", 2, "asc", ["i3", "i4"], False),
    ("i4", 2, "asc", [], False),
    (None, 5, "asc", ["i0", "i1", "i2", "i3", "i4"], False),
    (None, 100, "asc", ["i0", "i1", "i2", "i3", "i4"], False),
    (None, 2, "desc", ["i4", "i3"], True),
    ("i3", 2, "desc", ["i2", "i1"], True),
    ("i1", 2, "desc", ["i0"], False),
    ("i0", 1, "desc", [], False),
    ("unknown", 2, "asc", [], False),
    ("unknown", 2, "desc", [], False),
]


@pytest.mark.parametrize(("after", "limit", "order", "expected", "has_more"), PAGE_CASES)
async def test_input_items_page(store, after, limit, order, expected, has_more):
    """list_input_items pages by position after an exclusive item-id cursor, either way."""
    await store.save_response(response(input_items=items("i0", "i1", "i2", "i3", "i4")))
    page = await store.list_input_items("resp_1", "alice", after=after, limit=limit, order=order)
    assert [i.id for i in page.items] == expected
    assert page.has_more is has_more


async def test_input_items_of_a_response_without_any_is_an_empty_page(store):
    """A response with no input items gives an empty page, not None."""
    await store.save_response(response())
    page = await store.list_input_items("resp_1", "alice", after=None, limit=10, order="desc")
    assert page.items == ()
    assert page.has_more is False


async def test_input_items_pages_ignore_output_items(store):
    """Output items never show in the input item pages, even with the same ids."""
    await store.save_response(response(input_items=items("i0"), output_items=items("o0", "i0")))
    page = await store.list_input_items("resp_1", "alice", after=None, limit=10, order="asc")
    assert [i.id for i in page.items] == ["i0"]


@pytest.mark.parametrize(
    ("starting_after", "expected"),
    [(None, ["e0", "e1", "e2"]), (-1, ["e0", "e1", "e2"]), (0, ["e1", "e2"]), (2, []), (9, [])],
)
async def test_events_after_a_sequence_number(store, starting_after, expected):
    """get_events returns the events whose sequence number (0-based position) is greater."""
    await store.save_response(response(background=True, events=("e0", "e1", "e2")))
    assert await store.get_events("resp_1", "alice", starting_after=starting_after) == expected


async def test_find_item_searches_inputs_and_outputs(store):
    """find_item finds an input or an output item of a stored response."""
    await store.save_response(response(input_items=items("in_a"), output_items=items("out_a")))
    assert (await store.find_item("in_a", "alice")).id == "in_a"
    found = await store.find_item("out_a", "alice")
    assert found == items("out_a")[0]
    assert await store.find_item("nope", "alice") is None


async def test_find_item_returns_the_most_recent_match(store):
    """With the same item id in several responses, the newest response's copy wins."""
    old = StoredItem("msg_1", '{"v": "old"}')
    new = StoredItem("msg_1", '{"v": "new"}')
    await store.save_response(response("resp_a", created_at=NOW - 5, output_items=(old,)))
    await store.save_response(response("resp_b", created_at=NOW, input_items=(new,)))
    await store.save_response(response("resp_c", created_at=NOW - 9, input_items=(old,)))
    assert (await store.find_item("msg_1", "alice")).json == '{"v": "new"}'


async def test_find_item_falls_back_to_conversation_items(store):
    """An item only in a conversation is found; a response's copy is preferred to it."""
    conversation = ConversationRecord(
        "conv_1", "alice", NOW, NOW + 3600, items=(StoredItem("msg_c", '{"v": "conv"}'),)
    )
    await store.create_conversation(conversation)
    assert (await store.find_item("msg_c", "alice")).json == '{"v": "conv"}'
    assert await store.find_item("msg_c", "bob") is None
    await store.save_response(response(input_items=(StoredItem("msg_c", '{"v": "resp"}'),)))
    assert (await store.find_item("msg_c", "alice")).json == '{"v": "resp"}'


async def test_save_with_conversation_items_but_no_conversation_is_refused(store):
    """conversation_items without a conversation_id is a caller bug: ValueError, nothing saved."""
    with pytest.raises(ValueError, match="conversation_id"):
        await store.save_response(response(conversation_items=items("c1")))
    assert await store.get_response("resp_1", "alice") is None
