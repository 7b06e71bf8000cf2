"""The process that writes: one SQLite connection, group commits, nothing else.

``Writer`` (storage/writer.py) starts it and talks to it over its stdin and stdout.
It lives in a process of its own so that the Python work around each commit (binding
rows, the sqlite3 module's bookkeeping) runs on another core without the event loop's
GIL: under load that work took a fifth of the loop's time as a thread.

Protocol: frames of an 8-byte big-endian length and a pickle, in both directions.
  parent -> child  first ``Start``; then lists of jobs ``(apply, in_transaction, arg)``,
                   ``apply`` named ``"module:qualname"``
  child -> parent  first ``("ready", None)``, ``("failed", message)`` or
                   ``("replaced", None)``; then, for every batch,
                   ``(writes, batches, results)``: the commits made and one
                   ``(ok, value)`` per job, in the order the jobs came
An error result is ``("storage", message)`` for the database's own errors,
``("replaced", None)`` when the file at the path is no longer the one opened, or
``("raise", exception)`` for anything else (a bug, which reaches its caller as
itself). End of stdin means: finish what came, then exit.

The file's identity (device and inode, taken by the daemon when it opened the
database) is checked with one ``stat`` after each batch commits and before any of
it is acknowledged: once the file was deleted (its directory removed, say) or
replaced, commits land in a file that no later start will open, so they are
reported as failed, and so is every batch after them.

A batch is everything that has arrived (at most ``MAX_BATCH`` jobs), run in one
transaction (``BEGIN IMMEDIATE ... COMMIT``, ``synchronous=FULL``): the fsync is paid
once per batch, and a result goes back only once its write is durable. When a write
fails, the batch is rolled back and run again one transaction per write, so that only
the faulty write fails. Jobs outside a transaction (``executescript``) run alone.

Only the standard library and storage modules that need nothing else are imported
here: the process starts in milliseconds.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import itertools
import os
import pickle
import signal
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# Applies writes of one kind inside the open transaction, one result per argument, on
# the writer's sqlite3 connection.
Apply = Callable[[sqlite3.Connection, Sequence[A]], list[R]]

# Large enough to absorb any burst of concurrent requests, small enough that one
# transaction does not hold the write lock for long.
MAX_BATCH = 512
# After a burst (a large purge), the WAL file is cut back to this size.
JOURNAL_SIZE_LIMIT = 64 * 1024 * 1024

# Bodies may be up to server.max_body_size each and a frame holds a whole batch:
# 4 bytes of length could overflow.
_HEADER = 8


def each(write: Callable[[sqlite3.Connection, A], R]) -> Apply[A, R]:
    """An ``Apply`` for writes that gain nothing from executemany: one after the other."""

    @functools.wraps(write)  # keeps its name: the writer process finds it by that name
    def apply(conn: sqlite3.Connection, args: Sequence[A]) -> list[R]:
        return [write(conn, arg) for arg in args]

    return apply


@dataclass(frozen=True)
class Start:
    path: str
    busy_ms: int
    migrations: tuple[Any, ...]  # storage.migrations.Migration
    # (st_dev, st_ino) of the file the daemon opened; None: not checked.
    identity: tuple[int, int] | None = None


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """The device and inode of the file at ``path``; None when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def frame(value: object) -> bytes:
    data = pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_HEADER, "big") + data


def split_frames(buffer: bytearray) -> list[Any]:
    """The values of the complete frames at the start of ``buffer``, which loses them."""
    values = []
    start = 0
    while len(buffer) - start >= _HEADER:
        size = int.from_bytes(buffer[start : start + _HEADER], "big")
        end = start + _HEADER + size
        if len(buffer) < end:
            break
        values.append(pickle.loads(memoryview(buffer)[start + _HEADER : end]))
        start = end
    del buffer[:start]
    return values


def reference(apply: Apply[Any, Any]) -> str:
    return f"{apply.__module__}:{apply.__qualname__}"


def resolve(ref: str) -> Apply[Any, Any]:
    module, _, name = ref.partition(":")
    value: Any = importlib.import_module(module)
    for part in name.split("."):
        value = getattr(value, part)
    return value  # type: ignore[no-any-return]


# --- opening -------------------------------------------------------------------------


def open_writer(start: Start) -> sqlite3.Connection:
    conn = sqlite3.connect(start.path, isolation_level=None, check_same_thread=False)
    try:
        prepare(conn, start)
    except BaseException:
        conn.close()
        raise
    return conn


def prepare(conn: sqlite3.Connection, start: Start) -> None:
    # auto_vacuum first: it only takes on a database with no page written yet
    # (switching to WAL writes one), so that purge_expired can give pages back.
    conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise sqlite3.OperationalError(f"WAL mode unavailable (journal_mode is {mode})")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute(f"PRAGMA busy_timeout={int(start.busy_ms)}")
    conn.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] != 2:
        # A file made before auto_vacuum was set (it held only schema_migrations):
        # VACUUM rebuilds it with the new setting, once.
        conn.execute("VACUUM")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at REAL NOT NULL)"
    )
    applied = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
    for migration in sorted(start.migrations, key=lambda m: m.version):
        if migration.version in applied:
            continue
        conn.execute("BEGIN IMMEDIATE")
        try:
            run_script(conn, migration.sql)
            conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (migration.version, migration.name, time.time()),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def run_script(conn: sqlite3.Connection, script: str) -> None:
    # executescript() would COMMIT first; run statement by statement to stay inside
    # the migration's transaction. complete_statement() knows that a trigger's
    # BEGIN ... END holds semicolons.
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):
            conn.execute(statement)
            statement = ""
    if statement.strip():
        raise sqlite3.OperationalError(f"incomplete statement in migration: {statement!r}")


# --- committing ----------------------------------------------------------------------


@dataclass(slots=True)
class Job:
    apply: Apply[Any, Any]
    in_transaction: bool
    arg: Any
    result: tuple[bool, Any] | None = None


class _BeginFailed(Exception):
    """BEGIN failed (the database is locked by another process, say): no write of the
    batch is at fault, so running them one by one would only wait again, once each."""


class Committer:
    """Runs batches of jobs on the connection; counts what it committed."""

    def __init__(self, conn: sqlite3.Connection, path: str) -> None:
        self.conn = conn
        self.path = path
        self.writes = 0
        self.batches = 0

    def run(self, jobs: list[Job]) -> None:
        group: list[Job] = []
        for job in jobs:
            if job.in_transaction:
                group.append(job)
                continue
            if group:
                self._commit(group)
                group = []
            self._run_alone(job)
        if group:
            self._commit(group)

    def _commit(self, group: list[Job]) -> None:
        try:
            results = self._transaction(group)
        except _BeginFailed as exc:
            self._rollback()
            error = self._error(exc.__cause__ or exc)
            for job in group:
                job.result = error
            return
        except Exception as exc:
            self._rollback()
            if len(group) == 1:
                group[0].result = self._error(exc)
                return
            for job in group:
                self._commit([job])
            return
        self.writes += len(group)
        self.batches += 1
        for job, result in zip(group, results, strict=True):
            job.result = (True, result)

    def _transaction(self, group: list[Job]) -> list[Any]:
        try:
            self.conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise _BeginFailed from exc
        results: list[Any] = []
        for apply, run in itertools.groupby(group, key=lambda job: job.apply):
            args = [job.arg for job in run]
            applied = apply(self.conn, args)
            if len(applied) != len(args):
                raise RuntimeError(f"{apply!r} returned {len(applied)} results for {len(args)}")
            results.extend(applied)
        self.conn.execute("COMMIT")
        return results

    def _run_alone(self, job: Job) -> None:
        try:
            [result] = job.apply(self.conn, [job.arg])
        except Exception as exc:
            self._rollback()
            job.result = self._error(exc)
        else:
            self.writes += 1
            job.result = (True, result)

    def _rollback(self) -> None:
        # SQLite ends the transaction itself on some errors: then there is none to end.
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("ROLLBACK")

    def _error(self, exc: BaseException) -> tuple[bool, Any]:
        if isinstance(exc, sqlite3.Error):
            return False, ("storage", f"cannot write to the database {self.path}: {exc}")
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:
            exc = RuntimeError(f"{type(exc).__name__}: {exc}")
        return False, ("raise", exc)


# --- the process ---------------------------------------------------------------------


class _Input:
    """Jobs from the parent's frames, as many as have arrived."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buffer = bytearray()
        self.pending: deque[Job] = deque()
        self.ended = False
        self._applies: dict[str, Apply[Any, Any]] = {}

    def read_frames(self) -> list[Any]:
        """Block until at least one frame is complete (or the input ends)."""
        while True:
            values = split_frames(self.buffer)
            if values or self.ended:
                return values
            # No more than a pipe holds: a larger buffer is a fresh mmap (and mremap,
            # munmap) on every read.
            data = os.read(self.fd, 1 << 16)
            if not data:
                self.ended = True
            self.buffer += data

    def take(self, limit: int) -> list[Job]:
        """The next batch: whatever has arrived, at most ``limit`` jobs; [] at the end."""
        while not self.pending and not self.ended:
            for jobs in self.read_frames():
                for ref, in_transaction, arg in jobs:
                    apply = self._applies.get(ref)
                    if apply is None:
                        apply = self._applies[ref] = _resolve_or_fail(ref)
                    self.pending.append(Job(apply, in_transaction, arg))
        return [self.pending.popleft() for _ in range(min(limit, len(self.pending)))]


def _resolve_or_fail(ref: str) -> Apply[Any, Any]:
    """The write function named ``ref``; if it cannot be found here, one that fails
    each of its writes with the reason, so that only those writes fail."""
    try:
        return resolve(ref)
    except Exception as exc:
        error = exc

        def unavailable(conn: sqlite3.Connection, args: Sequence[Any]) -> list[Any]:
            raise error

        return unavailable


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def serve(
    conn: sqlite3.Connection,
    path: str,
    source: _Input,
    out_fd: int,
    identity: tuple[int, int] | None = None,
) -> None:
    committer = Committer(conn, path)
    reported = (0, 0)
    replaced = False
    while jobs := source.take(MAX_BATCH):
        if not replaced:
            committer.run(jobs)
            # After the commit, not before: a file removed while the batch ran must not
            # see it acknowledged. One stat per batch, in this process, not per write.
            replaced = identity is not None and file_identity(path) != identity
        done = (committer.writes, committer.batches)
        if replaced:
            results: list[Any] = [(False, ("replaced", None))] * len(jobs)
        else:
            results = [job.result for job in jobs]
        _write_all(out_fd, frame((done[0] - reported[0], done[1] - reported[1], results)))
        reported = done


def main() -> None:
    # The daemon decides when this process ends (end of its stdin), after its last
    # writes: a Ctrl-C in a terminal or systemd's SIGTERM to the whole service must not
    # cut it short while the daemon is still draining requests.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # A batch worker: its wake-ups (a frame arrived) must not preempt the daemon's
    # event loop on a shared core; it still gets its fair share of the CPU. Measured
    # with the bench's stored responses on 2 cores: +3.7% requests/s, twice.
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_BATCH"):
        os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
    # stdout carries frames only: anything printed by mistake goes to stderr instead.
    out_fd = os.dup(1)
    os.dup2(2, 1)
    source = _Input(0)
    [start] = source.read_frames() or [None]
    if not isinstance(start, Start):
        return
    # A new process after one died: the file may be gone, and connect() would create
    # an empty one in its place.
    if start.identity is not None and file_identity(start.path) != start.identity:
        _write_all(out_fd, frame(("replaced", None)))
        return
    try:
        conn = open_writer(start)
    except Exception as exc:
        _write_all(out_fd, frame(("failed", f"cannot open the database {start.path}: {exc}")))
        return
    _write_all(out_fd, frame(("ready", None)))
    try:
        serve(conn, start.path, source, out_fd, start.identity)
    except BrokenPipeError:
        pass  # the daemon is gone; what it sent has been committed
    finally:
        conn.close()


if __name__ == "__main__":  # pragma: no cover - started by storage/writer.py
    main()
