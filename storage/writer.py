"""Group commit: the one connection that writes, and the task that batches its writes.

Data flow: a ``SQLiteStore`` method (storage/sqlite.py) hands a write (a function of
storage/writes.py and its argument) to ``Writer.submit`` and waits. The writer task
takes every write waiting in the queue, runs them in one transaction
(``BEGIN IMMEDIATE ... COMMIT``) and then resolves each caller's future. With
``synchronous=FULL`` a write whose ``submit`` has returned survives kill -9 and a
power cut, and the fsync is paid once per batch instead of once per write.

Consecutive writes of the same kind are applied in one call, ``apply(conn, [arg, ...])``,
so that it can use one ``executemany`` per statement for the whole batch. The whole
transaction (BEGIN, the writes, COMMIT) runs in the connection's thread as one call:
each hop between the event loop and that thread waits for a turn of a busy loop
(milliseconds under load), so a batch costs one hop, not one per statement.

When anything in a batch fails, the batch is rolled back and its writes are re-run one
transaction each, so that only the faulty write fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite

from storage.errors import StorageError

A = TypeVar("A")
R = TypeVar("R")

# Applies writes of one kind inside the open transaction, one result per argument. Runs
# in the connection's thread, on the sqlite3 connection itself.
Apply = Callable[[sqlite3.Connection, Sequence[A]], list[R]]

# Large enough to absorb any burst of concurrent requests, small enough that one
# transaction does not hold the write lock for long.
MAX_BATCH = 512


def each(write: Callable[[sqlite3.Connection, A], R]) -> Apply[A, R]:
    """An ``Apply`` for writes that gain nothing from executemany: one after the other."""

    def apply(conn: sqlite3.Connection, args: Sequence[A]) -> list[R]:
        return [write(conn, arg) for arg in args]

    return apply


async def in_connection_thread(
    conn: aiosqlite.Connection, work: Callable[[sqlite3.Connection], R]
) -> R:
    """Run ``work`` on the sqlite3 connection in aiosqlite's thread, as one call.

    aiosqlite runs every call in the connection's own thread; its public methods run one
    statement each. ``_execute`` (there since aiosqlite's first releases) hands over a
    function instead, which is what a batch of statements needs."""
    raw = conn._conn
    return cast(R, await conn._execute(work, raw))  # type: ignore[no-untyped-call]


@dataclass(frozen=True, slots=True)
class WriteStats:
    """How many writes were committed, in how many transactions."""

    writes: int
    batches: int


@dataclass(eq=False, slots=True)
class _Job:
    apply: Apply[Any, Any]
    arg: Any
    future: asyncio.Future[Any]
    in_transaction: bool


class _BeginFailed(Exception):
    """BEGIN failed (the database is locked by another process, say): no write of the
    batch is at fault, so running them one by one would only wait again, once each."""


class Writer:
    def __init__(
        self, conn: aiosqlite.Connection, path: Path, *, max_batch: int = MAX_BATCH
    ) -> None:
        self._conn = conn
        self._path = path
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._writes = 0
        self._batches = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"writer of {self._path}")

    @property
    def stats(self) -> WriteStats:
        return WriteStats(writes=self._writes, batches=self._batches)

    async def submit(self, apply: Apply[A, R], arg: A) -> R:
        """Run one write in the next group commit; returns once it is committed.

        If the caller is cancelled, the write still runs: it was handed over."""
        return await self._enqueue(apply, arg, in_transaction=True)

    async def submit_alone(self, apply: Apply[A, R], arg: A) -> R:
        """Run one write between two batches, outside any transaction: for statements
        that cannot run inside one (``executescript`` commits first)."""
        return await self._enqueue(apply, arg, in_transaction=False)

    async def close(self) -> None:
        """Commit the writes already queued, then stop the task."""
        if self._task is None:
            return
        if not self._closing:
            self._closing = True
            self._queue.put_nowait(None)
        await self._task

    async def _enqueue(self, apply: Apply[A, R], arg: A, *, in_transaction: bool) -> R:
        if self._closing or self._task is None or self._task.done():
            raise StorageError(f"the database {self._path} is closed")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(apply, arg, future, in_transaction))
        return cast(R, await future)

    async def _run(self) -> None:
        taken: list[_Job] = []
        try:
            stopping = False
            while not stopping:
                first = await self._queue.get()
                taken = [] if first is None else [first]
                stopping = first is None
                while not stopping and len(taken) < self._max_batch and not self._queue.empty():
                    job = self._queue.get_nowait()
                    if job is None:
                        stopping = True
                    else:
                        taken.append(job)
                await self._process(taken)
                taken = []
        finally:
            # Reached with writes left only if the task was cancelled or crashed: fail
            # them, so that no caller waits for ever.
            self._closing = True
            while not self._queue.empty():
                job = self._queue.get_nowait()
                if job is not None:
                    taken.append(job)
            stopped = StorageError(
                f"the writer of {self._path} stopped; this write may not be committed"
            )
            for job in taken:
                _fail(job, stopped)

    async def _process(self, jobs: list[_Job]) -> None:
        group: list[_Job] = []
        for job in jobs:
            if job.in_transaction:
                group.append(job)
                continue
            if group:
                await self._commit(group)
                group = []
            await self._run_alone(job)
        if group:
            await self._commit(group)

    async def _commit(self, group: list[_Job]) -> None:
        try:
            results = await self._transaction(group)
        except _BeginFailed as exc:
            await self._rollback()
            error = self._convert(cast(Exception, exc.__cause__))
            for job in group:
                _fail(job, error)
            return
        except Exception as exc:
            await self._rollback()
            if len(group) == 1:
                _fail(group[0], self._convert(exc))
                return
            for job in group:
                await self._commit([job])
            return
        self._writes += len(group)
        self._batches += 1
        for job, result in zip(group, results, strict=True):
            _resolve(job, result)

    async def _transaction(self, group: list[_Job]) -> list[Any]:
        def work(conn: sqlite3.Connection) -> list[Any]:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _BeginFailed from exc
            results: list[Any] = []
            for apply, run in itertools.groupby(group, key=lambda job: job.apply):
                args = [job.arg for job in run]
                applied = apply(conn, args)
                if len(applied) != len(args):
                    raise RuntimeError(f"{apply!r} returned {len(applied)} results for {len(args)}")
                results.extend(applied)
            conn.execute("COMMIT")
            return results

        return await in_connection_thread(self._conn, work)

    async def _run_alone(self, job: _Job) -> None:
        try:
            [result] = await in_connection_thread(
                self._conn, lambda conn: job.apply(conn, [job.arg])
            )
        except Exception as exc:
            await self._rollback()
            _fail(job, self._convert(exc))
        else:
            self._writes += 1
            _resolve(job, result)

    async def _rollback(self) -> None:
        # SQLite ends the transaction itself on some errors: then there is none to end.
        with contextlib.suppress(sqlite3.Error):
            await self._conn.execute("ROLLBACK")

    def _convert(self, exc: Exception) -> Exception:
        if not isinstance(exc, sqlite3.Error):
            return exc  # a bug, not a database condition: let it surface as itself
        error = StorageError(f"cannot write to the database {self._path}: {exc}")
        error.__cause__ = exc
        return error


def _resolve(job: _Job, result: Any) -> None:
    if not job.future.done():  # done when its caller was cancelled
        job.future.set_result(result)


def _fail(job: _Job, error: Exception) -> None:
    if not job.future.done():
        job.future.set_exception(error)
