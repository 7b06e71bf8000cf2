"""SQLiteStore files: opening, pragmas, migrations, purging expired rows with the space
given back, and failing responses left unfinished, on real SQLite files."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from storage.migrations import MIGRATIONS, Migration
from storage.records import ConversationRecord, StoredItem
from storage.sqlite import SQLiteStore, StorageError
from tests.clock import FakeClock
from tests.unit.storage_support import NOW, response

LATEST = max(m.version for m in MIGRATIONS)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "lmbridge.db"


@pytest.fixture
async def store(path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    store = await SQLiteStore.open(path, clock=clock)
    yield store
    await store.close()


async def pragma(path: Path, name: str) -> Any:
    async with aiosqlite.connect(path) as conn:
        rows = list(await conn.execute_fetchall(f"PRAGMA {name}"))
    return rows[0][0]


async def table_names(path: Path) -> set[str]:
    async with aiosqlite.connect(path) as conn:
        rows = await conn.execute_fetchall("SELECT name FROM sqlite_master WHERE type = 'table'")
    return {row[0] for row in rows}


def size_on_disk(path: Path) -> int:
    return path.stat().st_size


async def test_new_database_is_wal_with_incremental_vacuum(store, path):
    """A new file gets WAL and incremental auto-vacuum, and migration 1's tables."""
    assert await pragma(path, "journal_mode") == "wal"
    assert await pragma(path, "auto_vacuum") == 2  # INCREMENTAL
    assert await store.schema_version() == LATEST
    assert {
        "responses",
        "response_items",
        "response_events",
        "conversations",
        "conversation_items",
    } <= await table_names(path)


async def test_reopening_keeps_data_and_runs_no_migration_twice(store, path):
    """Closing and opening again keeps what was saved; migrations are recorded once."""
    await store.save_response(response("resp_1"))
    await store.close()
    reopened = await SQLiteStore.open(path, clock=lambda: NOW)
    try:
        assert await reopened.schema_version() == LATEST
        assert await reopened.get_response("resp_1", "alice") is not None
    finally:
        await reopened.close()
    async with aiosqlite.connect(path) as conn:
        rows = list(await conn.execute_fetchall("SELECT version, name FROM schema_migrations"))
    assert rows == [(m.version, m.name) for m in MIGRATIONS]


async def test_database_made_before_auto_vacuum_is_converted(path):
    """A file made without auto-vacuum (first release) is rebuilt with it once, and migrated."""
    path.parent.mkdir()
    async with aiosqlite.connect(path, isolation_level=None) as conn:
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(
            "CREATE TABLE schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
        )
    assert await pragma(path, "auto_vacuum") == 0

    store = await SQLiteStore.open(path)
    await store.close()
    assert await pragma(path, "auto_vacuum") == 2


async def test_migration_script_may_hold_triggers_and_comments(path):
    """Migration statements are split whole: trigger bodies and quoted semicolons survive."""
    extra = Migration(
        LATEST + 1,
        "audit",
        """
        CREATE TABLE audit (note TEXT);
        -- a comment; with a semicolon
        CREATE TRIGGER audit_delete AFTER DELETE ON responses
        BEGIN
            INSERT INTO audit (note) VALUES ('deleted; gone');
        END;
        """,
    )
    store = await SQLiteStore.open(path, (*MIGRATIONS, extra), clock=lambda: NOW)
    try:
        assert await store.schema_version() == LATEST + 1
        await store.save_response(response("resp_1"))
        assert await store.delete_response("resp_1", "alice") is True
    finally:
        await store.close()
    async with aiosqlite.connect(path) as conn:
        rows = list(await conn.execute_fetchall("SELECT note FROM audit"))
    assert rows == [("deleted; gone",)]


async def test_failing_migration_is_rolled_back_and_reported(path):
    """A migration that fails leaves nothing of itself and open() raises StorageError."""
    bad = Migration(LATEST + 1, "bad", "CREATE TABLE half (x);\nCREATE TABLE half (y);\n")
    with pytest.raises(StorageError, match=r"cannot open the database .*already exists"):
        await SQLiteStore.open(path, (*MIGRATIONS, bad))
    assert "half" not in await table_names(path)
    store = await SQLiteStore.open(path)
    try:
        assert await store.schema_version() == LATEST
    finally:
        await store.close()


@pytest.mark.parametrize("what", ["a directory", "under a file", "not a database"])
async def test_unusable_path_is_a_storage_error(tmp_path, what):
    """A path that cannot hold a database gives a StorageError naming it."""
    if what == "a directory":
        path = tmp_path
    elif what == "under a file":
        (tmp_path / "file").write_text("x")
        path = tmp_path / "file" / "lmbridge.db"
    else:
        path = tmp_path / "lmbridge.db"
        path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StorageError, match=f"cannot open the database {path}"):
        await SQLiteStore.open(path)


async def test_ping_answers_until_closed(path):
    """ping() passes on an open store and raises StorageError once it is closed."""
    store = await SQLiteStore.open(path)
    try:
        await store.ping()
    finally:
        await store.close()
    with pytest.raises(StorageError, match="cannot read"):
        await store.ping()


async def test_purge_deletes_expired_objects_with_their_children(store, clock, path):
    """purge_expired deletes and counts expired objects with their children, keeps the rest."""
    await store.save_response(
        response(
            "resp_old",
            expires_at=NOW + 10,
            input_items=(StoredItem("in_old", "{}"),),
            events=("e0",),
        )
    )
    await store.save_response(response("resp_new", expires_at=NOW + 11))
    await store.create_conversation(
        ConversationRecord("conv_old", "alice", NOW, NOW + 5, items=(StoredItem("c", "{}"),))
    )
    await store.create_conversation(ConversationRecord("conv_new", "alice", NOW, NOW + 99))

    assert await store.purge_expired(NOW + 10) == 2
    assert await store.purge_expired(NOW + 10) == 0
    async with aiosqlite.connect(path) as conn:
        counts = [
            next(iter(await conn.execute_fetchall(f"SELECT COUNT(*) FROM {table}")))[0]
            for table in ("response_items", "response_events", "conversation_items")
        ]
    assert counts == [0, 0, 0]
    clock.now = NOW + 10
    assert await store.get_response("resp_new", "alice") is not None
    assert await store.get_conversation("conv_new", "alice") is not None


async def test_purge_applies_the_retention_policy_in_force(store, clock):
    """With a retention, what was stored under another setting follows the current one:
    lowered, what is now too old goes; raised, what is young enough stays."""
    await store.save_response(response("resp_old", created_at=NOW, expires_at=NOW + 1000))
    await store.save_response(response("resp_young", created_at=NOW + 50, expires_at=NOW + 1050))
    await store.create_conversation(ConversationRecord("conv_old", "alice", NOW, NOW + 1000))
    assert await store.purge_expired(NOW + 100, retention=60) == 2
    clock.now = NOW + 100
    assert await store.get_response("resp_old", "alice") is None
    assert await store.get_conversation("conv_old", "alice") is None
    assert await store.get_response("resp_young", "alice") is not None
    clock.now = NOW + 111  # created + 60 s: gone by the new policy
    assert await store.get_response("resp_young", "alice") is None

    await store.save_response(response("resp_short", created_at=NOW + 200, expires_at=NOW + 210))
    assert await store.purge_expired(NOW + 205, retention=3600) == 0
    clock.now = NOW + 900
    assert await store.get_response("resp_short", "alice") is not None


async def test_purge_gives_the_space_back(store, clock, path):
    """After a purge no page is free and the file is back to the size of the empty schema."""
    empty_pages = await pragma(path, "page_count")
    body = json.dumps({"text": "x" * 2000})
    await asyncio.gather(
        *(
            store.save_response(
                response(f"resp_{n}", expires_at=NOW + 10, body=body, events=(body, body))
            )
            for n in range(300)
        )
    )
    assert await store.purge_expired(NOW + 10) == 300
    assert await pragma(path, "freelist_count") == 0
    assert await pragma(path, "page_count") == empty_pages
    assert size_on_disk(path) == empty_pages * await pragma(path, "page_size")


async def test_file_stops_growing_under_steady_load(store, clock, path):
    """Rounds of saving and purging as much leave the file and its WAL no larger than before."""

    async def one_round(n: int) -> int:
        body = json.dumps({"text": "x" * 400})
        records = [
            response(
                f"resp_{n}_{k}",
                created_at=clock.now,
                expires_at=clock.now + 10,
                body=body,
                input_items=(StoredItem(f"in_{n}_{k}_0", body), StoredItem(f"in_{n}_{k}_1", body)),
                output_items=(StoredItem(f"out_{n}_{k}", body),),
            )
            for k in range(200)
        ]
        await asyncio.gather(*(store.save_response(r) for r in records))
        size = size_on_disk(path) + size_on_disk(path.with_name(f"{path.name}-wal"))
        clock.now += 10
        assert await store.purge_expired(clock.now) == 200
        return size

    sizes = [await one_round(n) for n in range(24)]
    assert max(sizes[8:]) <= max(sizes[:8])
    assert await pragma(path, "freelist_count") == 0


async def test_fail_unfinished_marks_queued_and_in_progress_failed(store):
    """Queued and in-progress responses become failed with a server_error; others are kept."""
    for status in ("queued", "in_progress", "completed", "failed", "incomplete"):
        await store.save_response(response(f"resp_{status}", status=status, background=True))

    assert await store.fail_unfinished(NOW, "The daemon restarted.") == 2
    for response_id in ("resp_queued", "resp_in_progress"):
        body = json.loads(await store.get_response(response_id, "alice"))
        assert body == {
            "id": response_id,
            "status": "failed",
            "completed_at": None,
            "error": {"code": "server_error", "message": "The daemon restarted."},
        }
    completed = json.loads(await store.get_response("resp_completed", "alice"))
    assert completed["status"] == "completed"
    assert "error" not in completed
    assert await store.fail_unfinished(NOW, "again") == 0


async def test_fail_unfinished_leaves_expired_and_non_json_bodies_readable(store, clock):
    """An expired response is not counted; a body that is not JSON keeps its text."""
    await store.save_response(response("resp_gone", status="queued", expires_at=NOW + 1))
    await store.save_response(response("resp_odd", status="in_progress", body="not json"))
    clock.now = NOW + 1
    assert await store.fail_unfinished(NOW + 1, "restarted") == 1
    assert await store.get_response("resp_odd", "alice") == "not json"
    assert await store.fail_unfinished(NOW + 1, "restarted") == 0


async def test_fail_unfinished_of_some_responses_leaves_the_others(store):
    """With response_ids, only those unfinished responses are failed; others keep running."""
    for name in ("resp_a", "resp_b"):
        await store.save_response(response(name, status="in_progress", background=True))

    assert await store.fail_unfinished(NOW, "not stored", response_ids=("resp_a",)) == 1
    assert json.loads(await store.get_response("resp_a", "alice"))["status"] == "failed"
    assert json.loads(await store.get_response("resp_b", "alice"))["status"] == "in_progress"


async def test_failed_unfinished_responses_replay_to_a_terminal_event(store):
    """The stored events of a response failed while unfinished end with response.failed,
    next in sequence and carrying the failed response, so a replay ends as a stream does."""
    events = tuple(
        json.dumps({"type": kind, "sequence_number": n})
        for n, kind in enumerate(("response.created", "response.queued", "response.in_progress"))
    )
    await store.save_response(
        response("resp_1", status="in_progress", background=True, events=events)
    )

    assert await store.fail_unfinished(NOW, "The daemon restarted.") == 1
    stored = await store.get_events("resp_1", "alice", starting_after=None)
    assert stored[:3] == list(events)
    last = json.loads(stored[-1])
    assert last["type"] == "response.failed"
    assert last["sequence_number"] == 3
    assert last["response"] == json.loads(await store.get_response("resp_1", "alice"))
    assert last["response"]["status"] == "failed"
