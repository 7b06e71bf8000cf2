"""The group-commit writer behind SQLiteStore: batching, failure isolation, order,
durability across kill -9, locks, a full disk, closing, and its process (killed,
signalled, restarted), on real SQLite files."""

from __future__ import annotations

import asyncio
import os
import pickle
import shutil
import signal
import sqlite3
import sys
import time
import types
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from proxy.bench.processes import writer_processes
from storage.migrations import Migration
from storage.records import ConversationRecord, ResponseRecord, StoredItem
from storage.sqlite import DatabaseReplaced, SQLiteStore, StorageError
from storage.writer_process import frame, split_frames
from tests.unit.storage_support import limit_pages

NOW = 1_700_000_000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = await SQLiteStore.open(tmp_path / "lmbridge.db", clock=lambda: NOW)
    yield store
    await store.close()


def response(response_id: str, **fields: Any) -> ResponseRecord:
    values: dict[str, Any] = {
        "owner": "alice",
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "status": "completed",
        "body": f'{{"id": "{response_id}"}}',
        "input_items": (StoredItem(f"in_{response_id}", "{}"),),
        "output_items": (StoredItem(f"out_{response_id}", "{}"),),
    }
    values.update(fields)
    return ResponseRecord(id=response_id, **values)


async def test_concurrent_saves_share_one_commit(store):
    """32 saves issued together are committed in one transaction, and all are readable."""
    await asyncio.gather(*(store.save_response(response(f"resp_{n}")) for n in range(32)))
    assert store.write_stats.writes == 32
    assert store.write_stats.batches == 1
    for n in range(32):
        assert await store.get_response(f"resp_{n}", "alice") == f'{{"id": "resp_{n}"}}'


async def test_a_save_larger_than_one_pipe_read_arrives_whole(store):
    """The writer process reads its pipe 64 KB at a time: a save of several megabytes
    comes in many reads and is stored byte for byte, beside a small one."""
    body = '{"text": "' + "é🙂x" * 1_000_000 + '"}'
    await asyncio.gather(
        store.save_response(response("resp_big", body=body)),
        store.save_response(response("resp_small")),
    )
    assert await store.get_response("resp_big", "alice") == body
    assert await store.get_response("resp_small", "alice") == '{"id": "resp_small"}'


async def test_one_faulty_write_fails_alone(store):
    """A batch with failing writes is re-run one by one: only the faulty ones fail."""
    await store.create_conversation(ConversationRecord("conv_1", "alice", NOW, NOW + 60))
    await store.save_response(response("resp_taken", owner="bob"))
    before = store.write_stats.batches

    results = await asyncio.gather(
        *(store.save_response(response(f"resp_{n}")) for n in range(5)),
        store.create_conversation(ConversationRecord("conv_1", "alice", NOW, NOW + 60)),
        store.save_response(response("resp_taken")),  # the id is bob's
        store.save_response(response("resp_bad", body=object())),  # cannot be bound
        *(store.save_response(response(f"resp_{n}")) for n in range(5, 10)),
        return_exceptions=True,
    )

    failed = [n for n, result in enumerate(results) if result is not None]
    assert failed == [5, 6, 7]
    assert all(isinstance(results[n], StorageError) for n in failed)
    assert "UNIQUE constraint failed: conversations.id" in str(results[5])
    assert "another owner" in str(results[6])
    for n in range(10):
        assert await store.get_response(f"resp_{n}", "alice") is not None
    assert await store.get_response("resp_taken", "alice") is None
    assert await store.get_response("resp_bad", "alice") is None
    # One failed batch, then one transaction per write.
    assert store.write_stats.batches - before == 10


async def test_a_bug_in_a_write_surfaces_as_itself(store):
    """An error that is not the database's (a caller bug) reaches its caller unchanged."""
    bad = response("resp_bad", input_items=("not a StoredItem",))
    results = await asyncio.gather(
        store.save_response(response("resp_ok")),
        store.save_response(bad),
        return_exceptions=True,
    )
    assert results[0] is None
    assert isinstance(results[1], AttributeError)
    assert await store.get_response("resp_ok", "alice") is not None


async def test_writes_in_one_batch_keep_their_call_order(store):
    """Writes of different kinds issued together take effect in the order of the calls."""
    await store.create_conversation(ConversationRecord("conv_1", "alice", NOW, NOW + 60))

    def appending(response_id: str, item_id: str) -> ResponseRecord:
        return response(
            response_id,
            conversation_id="conv_1",
            conversation_items=(StoredItem(item_id, "{}"),),
        )

    results = await asyncio.gather(
        store.save_response(appending("resp_1", "x")),
        store.delete_conversation_item("conv_1", "alice", "x"),
        store.save_response(appending("resp_2", "y")),
        store.delete_response("resp_1", "alice"),
        store.save_response(appending("resp_3", "z")),
    )
    assert results == [None, True, None, True, None]
    assert store.write_stats.batches == 2  # the create, then everything else
    assert await store.all_conversation_items("conv_1", "alice") == (
        StoredItem("y", "{}"),
        StoredItem("z", "{}"),
    )
    assert await store.get_response("resp_1", "alice") is None


async def test_cancelled_caller_still_has_its_write_committed(store):
    """A write handed over is committed even if its caller stops waiting."""
    task = asyncio.create_task(store.save_response(response("resp_1")))
    await asyncio.sleep(0)  # let it queue the write
    task.cancel()
    await store.save_response(response("resp_2"))
    assert task.cancelled()
    assert await store.get_response("resp_1", "alice") is not None


async def test_close_commits_the_writes_already_queued(tmp_path):
    """close() waits for queued writes to commit; a write after close raises StorageError."""
    path = tmp_path / "lmbridge.db"
    store = await SQLiteStore.open(path, clock=lambda: NOW)
    saves = [asyncio.create_task(store.save_response(response(f"resp_{n}"))) for n in range(20)]
    await asyncio.sleep(0)  # let them queue their writes
    await store.close()
    assert all(save.done() and save.exception() is None for save in saves)
    with pytest.raises(StorageError, match="closed"):
        await store.save_response(response("resp_late"))
    with pytest.raises(StorageError, match="cannot read"):
        await store.get_response("resp_0", "alice")

    reopened = await SQLiteStore.open(path, clock=lambda: NOW)
    try:
        for n in range(20):
            assert await reopened.get_response(f"resp_{n}", "alice") is not None
    finally:
        await reopened.close()


CHILD = """
import asyncio, sys
from storage.records import ResponseRecord
from storage.sqlite import SQLiteStore

async def main():
    store = await SQLiteStore.open(sys.argv[1])
    async def save(n):
        await store.save_response(ResponseRecord(
            id=f"resp_{n}", owner="alice", created_at=0, expires_at=2**40,
            status="completed", body="{}"))
        print(n, flush=True)
    await asyncio.gather(*(save(n) for n in range(2000)))
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_acknowledged_saves_survive_kill_9(tmp_path):
    """Every save that returned in a process killed with SIGKILL mid-stream is in the file."""
    path = tmp_path / "lmbridge.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(path),
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert child.stdout is not None
    first = await child.stdout.readline()
    child.kill()
    rest = await child.stdout.read()
    await child.wait()
    acknowledged = [int(line) for line in (first + rest).split()]
    assert acknowledged

    store = await SQLiteStore.open(path)
    try:
        for n in acknowledged:
            assert await store.get_response(f"resp_{n}", "alice") == "{}"
    finally:
        await store.close()


async def test_locked_database_fails_the_batch_at_once(tmp_path):
    """Under another process's write lock a batch fails once, readably; reads still answer."""
    path = tmp_path / "lmbridge.db"
    store = await SQLiteStore.open(path, clock=lambda: NOW, busy_timeout=0.2)
    await store.save_response(response("resp_0"))
    other = await aiosqlite.connect(path, isolation_level=None)
    try:
        await other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        results = await asyncio.gather(
            *(store.save_response(response(f"resp_{n}")) for n in range(1, 21)),
            return_exceptions=True,
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, StorageError) for r in results)
        assert "database is locked" in str(results[0])
        assert elapsed < 20 * 0.2 / 2
        assert await store.get_response("resp_0", "alice") is not None
        await other.execute("ROLLBACK")
        await store.save_response(response("resp_1"))
        assert await store.get_response("resp_1", "alice") is not None
    finally:
        await other.close()
        await store.close()


async def test_full_disk_fails_only_the_write_that_does_not_fit(store):
    """On a full disk only the write that does not fit fails; the small ones commit."""
    await store._writer.submit_alone(limit_pages, 30)

    results = await asyncio.gather(
        *(store.save_response(response(f"resp_{n}")) for n in range(5)),
        store.save_response(response("resp_huge", body="x" * 1_000_000)),
        return_exceptions=True,
    )
    assert results[:5] == [None] * 5
    assert isinstance(results[5], StorageError)
    assert "full" in str(results[5])
    assert await store.get_response("resp_4", "alice") is not None
    assert await store.get_response("resp_huge", "alice") is None


def writer_pid(store: SQLiteStore) -> int:
    pid = store._writer.pid
    assert pid is not None
    return pid


async def test_writes_run_in_a_process_of_their_own(store):
    pid = writer_pid(store)
    assert pid != os.getpid()
    assert writer_processes(os.getpid()) == [pid]
    await store.save_response(response("resp_1"))
    assert writer_pid(store) == pid


async def test_a_killed_writer_process_fails_its_writes_and_is_replaced(store, caplog):
    """The writes waiting on a writer process that dies fail readably; the next write
    starts a new process, and what was committed before is all there."""
    await store.save_response(response("resp_before"))
    first = writer_pid(store)
    writes = [
        asyncio.ensure_future(store.save_response(response(f"resp_{n}", body="x" * 200_000)))
        for n in range(50)
    ]
    # Killed as soon as the writes are on their way to the process (10 MB to commit).
    await asyncio.sleep(0)  # the tasks start and queue their writes
    assert store._writer._outbox
    await asyncio.sleep(0)  # the queued writes are sent together
    assert not store._writer._outbox
    os.kill(first, signal.SIGKILL)
    results = await asyncio.gather(*writes, return_exceptions=True)
    failed = [r for r in results if r is not None]
    assert failed, "every write finished before the kill; nothing was tested"
    assert all(isinstance(r, StorageError) for r in failed)
    assert "writer process" in str(failed[0]) and "may not be committed" in str(failed[0])

    await store.save_response(response("resp_after"))
    assert writer_pid(store) != first
    assert await store.get_response("resp_before", "alice") is not None
    assert await store.get_response("resp_after", "alice") is not None
    assert "exited" in caplog.text


async def test_ping_starts_a_new_writer_process(store):
    """/readyz pings the store: a dead writer process is replaced there, before a write
    needs it."""
    first = writer_pid(store)
    os.kill(first, signal.SIGKILL)
    for _ in range(200):
        if store._writer.pid is None:
            break
        await asyncio.sleep(0.01)
    await store.ping()
    assert writer_pid(store) not in (None, first)


async def test_the_writer_process_outlives_signals_to_the_service(store):
    """Ctrl-C in a terminal and systemd's SIGTERM reach every process of the service; the
    writer keeps committing until the daemon has drained its requests and closes it."""
    pid = writer_pid(store)
    os.kill(pid, signal.SIGTERM)
    os.kill(pid, signal.SIGINT)
    # The signals are delivered before the process can read this write.
    await store.save_response(response("resp_1"))
    assert writer_pid(store) == pid


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="Linux scheduling policy")
async def test_the_writer_process_does_not_preempt_the_event_loop(store):
    """Its wake-ups do not push the daemon's event loop off its core: SCHED_BATCH."""
    assert os.sched_getscheduler(writer_pid(store)) == os.SCHED_BATCH
    assert os.sched_getscheduler(0) != os.SCHED_BATCH


async def test_a_write_that_cannot_be_sent_fails_alone(store):
    """An argument that cannot be handed to the writer process (a caller bug) fails its
    own write with the error; the writes sent with it commit."""
    results = await asyncio.gather(
        store.save_response(response("resp_ok")),
        store.save_response(response("resp_bad", body=lambda: None)),
        store.save_response(response("resp_ok2")),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], pickle.PicklingError | AttributeError | TypeError)
    assert await store.get_response("resp_ok2", "alice") is not None


async def test_close_stops_the_writer_process(tmp_path):
    store = await SQLiteStore.open(tmp_path / "lmbridge.db", clock=lambda: NOW)
    pid = writer_pid(store)
    await store.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_frames_are_read_whole_however_the_bytes_arrive():
    """The pipe hands over bytes in pieces of any size; a frame is decoded only once it is
    all there, and several in one piece all come out, in order."""
    data = frame(["a" * 100_000]) + frame(("ready", None)) + frame(None)
    buffer = bytearray()
    values: list[Any] = []
    for start in range(0, len(data), 7_777):
        buffer += data[start : start + 7_777]
        values += split_frames(buffer)
    assert values == [["a" * 100_000], ("ready", None), None]
    assert not buffer


async def test_a_writer_process_that_cannot_start_is_a_clear_error(tmp_path):
    """A bad migration stops the writer process at start: open() says which database and
    why, and leaves no process behind."""
    bad = (Migration(1, "broken", "CREATE TABLE oops (;"),)
    with pytest.raises(StorageError, match=r"cannot open the database .*lmbridge\.db.*syntax"):
        await SQLiteStore.open(tmp_path / "lmbridge.db", bad)
    assert not writer_processes(os.getpid())


async def test_closing_while_a_new_writer_process_starts(tmp_path):
    """A write that is waiting for a replacement process when the store closes fails as
    closed; the replacement does not outlive the store."""
    store = await SQLiteStore.open(tmp_path / "lmbridge.db", clock=lambda: NOW)
    os.kill(writer_pid(store), signal.SIGKILL)
    for _ in range(200):
        if store._writer.pid is None:
            break
        await asyncio.sleep(0.01)
    save = asyncio.create_task(store.save_response(response("resp_1")))
    await asyncio.sleep(0)  # the save starts a new process
    await store.close()
    with pytest.raises(StorageError, match="closed"):
        await asyncio.wait_for(save, 10)
    assert not writer_processes(os.getpid())


async def test_a_write_function_the_process_cannot_find_fails_alone(store, monkeypatch):
    """A write function the writer process cannot import (here one that exists only in
    this process's memory) fails its own writes with the reason; the process and the
    other writes go on."""
    module = types.ModuleType("lmbridge_test_only_writes")

    def nothing(conn: Any, args: Any) -> list[None]:
        return [None for _ in args]

    nothing.__module__ = module.__name__
    nothing.__qualname__ = "nothing"
    module.nothing = nothing  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, module.__name__, module)
    pid = writer_pid(store)
    results = await asyncio.gather(
        store._writer.submit(nothing, None),
        store.save_response(response("resp_1")),
        return_exceptions=True,
    )
    assert isinstance(results[0], ModuleNotFoundError)
    assert results[1] is None
    assert writer_pid(store) == pid
    assert await store.get_response("resp_1", "alice") is not None


async def test_a_write_function_must_be_found_by_its_name(store):
    """The writer process finds write functions by module and name: a local function is
    refused at once, with a message saying why."""

    def local(conn: Any, args: Any) -> list[None]:
        return [None for _ in args]

    with pytest.raises(TypeError, match="module-level write function"):
        await store._writer.submit(local, None)


@pytest.fixture
async def store_in_dir(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = await SQLiteStore.open(tmp_path / "data" / "lmbridge.db", clock=lambda: NOW)
    yield store
    await store.close()


def replace_with_another_database(path: Path) -> None:
    other = path.with_name("other.db")
    sqlite3.connect(other).close()
    os.replace(other, path)


@pytest.mark.parametrize(
    "how",
    [
        pytest.param(lambda path: shutil.rmtree(path.parent), id="directory removed"),
        pytest.param(lambda path: path.unlink(), id="file deleted"),
        pytest.param(lambda path: path.rename(path.with_name("moved.db")), id="file moved"),
        pytest.param(replace_with_another_database, id="file replaced"),
    ],
)
async def test_writes_stop_once_the_database_file_is_not_the_one_opened(store_in_dir, how):
    """A database file removed or replaced under the store fails every later write and
    ping with DatabaseReplaced, which says to restart, instead of acknowledging writes
    that the next start would not find."""
    store = store_in_dir
    await store.save_response(response("resp_before"))
    how(store.path)
    for n in range(2):
        with pytest.raises(DatabaseReplaced, match=r"removed or replaced.*restart lmbridge"):
            await store.save_response(response(f"resp_after_{n}"))
    with pytest.raises(DatabaseReplaced):
        await store.ping()


async def test_a_new_writer_process_does_not_recreate_a_removed_database(store_in_dir):
    """A writer process started after the file was deleted refuses to start, rather than
    creating an empty database at the path for writes that a restart would not see."""
    store = store_in_dir
    os.kill(writer_pid(store), signal.SIGKILL)
    for _ in range(200):
        if store._writer.pid is None:
            break
        await asyncio.sleep(0.01)
    store.path.unlink()
    with pytest.raises(DatabaseReplaced):
        await store.save_response(response("resp_after"))
    assert not store.path.exists()
