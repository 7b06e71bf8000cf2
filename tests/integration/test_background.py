"""Background responses at their end: a final save that storage cannot take (the writer
process killed at that moment, a full disk, a locked database), replays that always
end with a terminal event, and cancels that race the end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from proxy.app import create_app
from proxy.keys import RESPONSES, STORE
from proxy.responses.recorder import UNSTORED
from storage.sqlite import SQLiteStore, StorageError
from tests.fake_upstream import CHAT, Reply, chunk
from tests.integration.test_responses import R, create, sse_events
from tests.unit.storage_support import exit_writer, limit_pages, response

TERMINAL = ("response.completed", "response.failed", "response.incomplete")


async def until(condition: Callable[[], Any], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


async def start_held(proxy, fake_upstream, **body) -> tuple[str, asyncio.Event]:
    """A background response whose upstream reply waits for the returned event."""
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a"), release, chunk(finish="stop")]))
    created = await create(proxy, input="x", background=True, **body)
    # The in_progress state is stored before the upstream is asked.
    await until(lambda: fake_upstream.requests_to(CHAT), "the upstream was asked")
    return created["id"], release


async def final_state(proxy, response_id: str) -> dict:
    polled: dict = {}

    async def poll() -> bool:
        nonlocal polled
        polled = await (await proxy.get(f"{R}/{response_id}")).json()
        return polled["status"] not in ("queued", "in_progress")

    for _ in range(600):
        if await poll():
            return polled
        await asyncio.sleep(0.005)
    raise AssertionError(f"{response_id} stayed {polled['status']}")


async def replay(proxy, response_id: str, query: str = "") -> list[dict]:
    resp = await proxy.get(f"{R}/{response_id}?stream=true{query}")
    return sse_events(await asyncio.wait_for(resp.read(), 10))


@contextmanager
def stopped(pid: int) -> Iterator[None]:
    """The writer process frozen: what is handed to it waits, unanswered."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def stored_row(path: Path, response_id: str) -> tuple[str, list[dict]]:
    with sqlite3.connect(path) as conn:
        [(status,)] = conn.execute("SELECT status FROM responses WHERE id = ?", (response_id,))
        events = conn.execute(
            "SELECT body FROM response_events WHERE response_id = ? ORDER BY seq", (response_id,)
        )
        return status, [json.loads(body) for (body,) in events]


async def test_final_state_is_stored_when_the_writer_dies_before_committing_it(
    proxy, fake_upstream
):
    """The writer process killed as the final state is handed to it: a new one stores it;
    GET, cancel and a replay all show the completed response."""
    response_id, release = await start_held(proxy, fake_upstream)
    writer = proxy.server.app[STORE]._writer
    with stopped(writer.pid):
        dying = writer.submit_alone(exit_writer, 9)  # before the final save, in one read
        release.set()
        await until(lambda: len(writer._waiting) == 2, "the final save was handed over")
        await until(lambda: not writer._flush_scheduled, "both are in the pipe")
    with pytest.raises(StorageError):
        await dying

    polled = await final_state(proxy, response_id)
    assert polled["status"] == "completed"
    assert polled["output"][0]["content"][0]["text"] == "a"
    events = await replay(proxy, response_id)
    assert events[-1]["type"] == "response.completed"
    cancelled = await (await proxy.post(f"{R}/{response_id}/cancel")).json()
    assert cancelled == polled


async def test_final_state_committed_by_a_writer_that_then_died_is_kept_once(proxy, fake_upstream):
    """The writer process dies after committing the final state, before answering: it is
    not appended to the conversation twice, and a live reader still gets the end."""
    conv = await (await proxy.post("/v1/conversations", json={})).json()
    response_id, release = await start_held(proxy, fake_upstream, conversation=conv["id"])
    follower = await proxy.get(f"{R}/{response_id}?stream=true")
    first = await follower.content.readuntil(b"\n\n")  # it follows the run, live
    writer = proxy.server.app[STORE]._writer
    with stopped(writer.pid):
        release.set()
        await until(lambda: len(writer._waiting) == 1, "the final save was handed over")
        dying = writer.submit_alone(exit_writer, 9)  # runs after the save's commit
        await until(lambda: not writer._flush_scheduled, "both are in the pipe")
    with pytest.raises(StorageError):
        await dying

    followed = sse_events(first + await asyncio.wait_for(follower.read(), 10))
    assert followed[-1]["type"] == "response.completed"
    assert (await final_state(proxy, response_id))["status"] == "completed"
    items = await (await proxy.get(f"/v1/conversations/{conv['id']}/items")).json()
    assert [item["role"] for item in items["data"]] == ["assistant", "user"]


async def test_final_state_that_does_not_fit_on_disk_ends_failed(proxy, fake_upstream):
    """A full disk refuses the final state: the response is stored failed at once (a
    small update), and its replay ends with response.failed."""
    release = asyncio.Event()
    big = "x" * 200_000
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("a"), release, chunk(big), chunk(finish="stop")])
    )
    response_id = (await create(proxy, input="x", background=True))["id"]
    await until(lambda: fake_upstream.requests_to(CHAT), "the upstream was asked")
    store = proxy.server.app[STORE]
    await store._writer.submit_alone(limit_pages, 2)
    release.set()

    polled = await final_state(proxy, response_id)
    assert polled["status"] == "failed"
    assert polled["error"] == {"code": "server_error", "message": UNSTORED}
    status, events = stored_row(store.path, response_id)
    assert status == "failed"
    assert events[-1]["type"] == "response.failed"
    assert (await replay(proxy, response_id))[-1]["type"] == "response.failed"


@pytest.fixture
async def quick_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """A store that gives up on a lock after 50 ms (5 s by default)."""
    store = await SQLiteStore.open(tmp_path / "quick.db", busy_timeout=0.05)
    yield store
    await store.close()


async def test_final_state_is_stored_failed_once_storage_works_again(
    aiohttp_client, make_config, quick_store, fake_upstream
):
    """Storage takes nothing at the end (locked by another process): the response ends
    failed at once for GET, cancel and replays, and is stored failed, its events ending
    with response.failed, as soon as a write succeeds again."""
    proxy = await aiohttp_client(create_app(make_config(), store=quick_store))
    response_id, release = await start_held(proxy, fake_upstream)
    follower = await proxy.get(f"{R}/{response_id}?stream=true")
    first = await follower.content.readuntil(b"\n\n")
    lock = sqlite3.connect(quick_store.path, isolation_level=None)
    try:
        lock.execute("BEGIN IMMEDIATE")
        release.set()
        polled = await final_state(proxy, response_id)
        assert polled["status"] == "failed"
        assert polled["error"] == {"code": "server_error", "message": UNSTORED}
        followed = sse_events(first + await asyncio.wait_for(follower.read(), 10))
        assert followed[-1]["type"] == "response.failed"
        assert followed[-1]["response"] == polled
        assert (await replay(proxy, response_id))[-1]["type"] == "response.failed"
        cancelled = await proxy.post(f"{R}/{response_id}/cancel")
        assert (await cancelled.json()) == polled
        assert stored_row(quick_store.path, response_id)[0] == "in_progress"
        lock.execute("ROLLBACK")
    finally:
        lock.close()

    await create(proxy, input="any write wakes the repair")
    await until(
        lambda: stored_row(quick_store.path, response_id)[0] == "failed", "stored as failed"
    )
    _, events = stored_row(quick_store.path, response_id)
    assert events[-1]["type"] == "response.failed"
    assert events[-1]["response"]["error"]["message"] == UNSTORED
    await until(lambda: response_id not in proxy.server.app[RESPONSES].running, "let go")
    assert (await final_state(proxy, response_id))["status"] == "failed"
    assert (await replay(proxy, response_id))[-1]["type"] == "response.failed"


async def test_a_response_left_unfinished_by_a_restart_replays_to_its_end(
    aiohttp_client, make_config, tmp_path
):
    """A background response left in_progress by a daemon that stopped is failed at
    start-up, and its replay ends with response.failed, also after its last event."""
    path = tmp_path / "lmbridge.db"
    events = [
        {"type": kind, "sequence_number": n, "response": {"id": "resp_1"}}
        for n, kind in enumerate(("response.created", "response.queued", "response.in_progress"))
    ]
    body = {"id": "resp_1", "object": "response", "status": "in_progress", "background": True}
    store = await SQLiteStore.open(path)
    await store.save_response(
        response(
            "resp_1",
            owner="",
            status="in_progress",
            background=True,
            body=json.dumps(body),
            created_at=int(time.time()),
            expires_at=2**40,
            events=tuple(json.dumps(e) for e in events),
        )
    )
    await store.close()

    proxy = await aiohttp_client(create_app(make_config(storage__path=str(path))))
    replayed = await replay(proxy, "resp_1")
    assert [e["type"] for e in replayed[:3]] == [e["type"] for e in events]
    assert replayed[-1]["type"] == "response.failed"
    assert replayed[-1]["response"]["status"] == "failed"
    after = await replay(proxy, "resp_1", "&starting_after=3")
    assert [e["type"] for e in after] == ["response.failed"]


async def test_a_cancel_that_races_the_end_answers_the_state_it_leaves(proxy, fake_upstream):
    """A cancel that arrives while the completed state is being stored does not stop it,
    and answers with it: the state the response is left in."""
    response_id, release = await start_held(proxy, fake_upstream)
    writer = proxy.server.app[STORE]._writer
    run = proxy.server.app[RESPONSES].running[response_id]
    with stopped(writer.pid):
        release.set()
        await until(lambda: len(writer._waiting) == 1, "the final save was handed over")
        cancel = asyncio.ensure_future(proxy.post(f"{R}/{response_id}/cancel"))
        await until(lambda: cancel.done() or (run.cancel_requested and run.settling), "cancel")
    answered = await (await cancel).json()

    assert answered["status"] == "completed"
    assert answered == await (await proxy.get(f"{R}/{response_id}")).json()


async def test_a_cancel_before_the_response_began_leaves_it_cancelled(proxy):
    """A cancel that comes before the background task first ran still ends the response
    as cancelled, in storage too, rather than leaving it queued."""
    service = proxy.server.app[RESPONSES]
    run = await service.create({"model": "test-model", "input": "x", "background": True}, "")
    answered = json.loads(await service.cancel(run.id, ""))
    assert answered["status"] == "cancelled"
    assert json.loads(await service.get(run.id, ""))["status"] == "cancelled"
