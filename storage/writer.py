"""Group commit in a process of its own: the daemon's side.

Data flow: a ``SQLiteStore`` method (storage/sqlite.py) hands a write (a function of
storage/writes.py and its argument) to ``Writer.submit`` and waits. The writes handed
over during one turn of the event loop go to the writer process
(storage/writer_process.py) as one frame; the process commits whatever has arrived in
one transaction and answers with one result per write, in order. With
``synchronous=FULL`` a write whose ``submit`` has returned survives kill -9 and a
power cut, and the fsync is paid once per batch instead of once per write.

If the process dies, the writes waiting for it fail with ``StorageError`` (they may
or may not be committed; none was acknowledged) and the next write starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import subprocess
import sys
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from storage.errors import DatabaseReplaced, StorageError
from storage.writer_process import Apply, Start, frame, reference, resolve, split_frames

log = logging.getLogger("lmbridge.storage")

A = TypeVar("A")
R = TypeVar("R")

# The process imports only the standard library and storage/: -I -S skip site's work
# (a third of its start-up); the daemon's own import path is handed over instead.
_BOOT = "import sys; sys.path[:0] = sys.argv[1:]; from storage.writer_process import main; main()"
# storage/'s own root first: an editable install may find it by an import hook, which
# -S leaves out.
_ROOT = str(Path(__file__).resolve().parents[1])
# How long close() waits for the last commits before it stops the process.
CLOSE_TIMEOUT = 60.0


@dataclass(frozen=True, slots=True)
class WriteStats:
    """How many writes were committed, in how many transactions."""

    writes: int
    batches: int


class _Child(asyncio.SubprocessProtocol):
    """One writer process: frames in from its stdout, the end of it when it exits."""

    def __init__(self, writer: Writer) -> None:
        self.writer = writer
        self.buffer = bytearray()
        self.broken = False
        self.transport: asyncio.SubprocessTransport | None = None
        self.stdin: asyncio.WriteTransport | None = None
        self.hello: asyncio.Future[tuple[str, Any]] = asyncio.get_running_loop().create_future()
        self.gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.SubprocessTransport, transport)
        self.stdin = cast(asyncio.WriteTransport, self.transport.get_pipe_transport(0))

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        if self.broken:
            return
        self.buffer += cast(bytes, data)
        try:
            values = split_frames(self.buffer)
        except Exception:
            # Answers that cannot be read cannot be matched to their writes: stop this
            # process, which fails every write waiting on it (connection_lost).
            log.exception("unreadable answer from the writer process for %s", self.writer._path)
            self.broken = True
            if self.transport is not None:
                self.transport.kill()
            return
        for value in values:
            if not self.hello.done():
                self.hello.set_result(value)
            else:
                self.writer._answered(value)

    def connection_lost(self, exc: Exception | None) -> None:
        # Called once the process has exited and its pipes are drained: every answer
        # it sent has been read.
        if not self.hello.done():
            self.hello.set_result(
                (
                    "failed",
                    f"cannot start the writer process for {self.writer._path}: it exited at "
                    f"start with status {self.returncode()} (its error is on stderr)",
                )
            )
        if self.transport is not None:
            self.transport.close()
        self.gone.set_result(None)
        self.writer._child_gone(self)

    def returncode(self) -> int | None:
        return None if self.transport is None else self.transport.get_returncode()


class Writer:
    def __init__(
        self,
        path: Path,
        *,
        busy_ms: int,
        migrations: tuple[Any, ...] = (),
        identity: tuple[int, int] | None = None,
    ) -> None:
        self._path = path
        self._busy_ms = busy_ms
        self._migrations = migrations
        self._identity = identity
        self._child: _Child | None = None
        self._starting: asyncio.Lock | None = None
        self._outbox: list[tuple[str, bool, Any]] = []
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._flush_scheduled = False
        self._closing = False
        self._writes = 0
        self._batches = 0
        self._refs: dict[Apply[Any, Any], str] = {}

    @property
    def pid(self) -> int | None:
        """The writer process's, while it runs."""
        child = self._child
        return None if child is None or child.transport is None else child.transport.get_pid()

    @property
    def stats(self) -> WriteStats:
        return WriteStats(writes=self._writes, batches=self._batches)

    async def start(self) -> None:
        """Start the process; it opens and migrates the database, or StorageError says
        why it could not."""
        loop = asyncio.get_running_loop()
        paths = [_ROOT] + [p or os.getcwd() for p in sys.path]
        try:
            _, child = await loop.subprocess_exec(
                lambda: _Child(self),
                sys.executable,
                "-I",
                "-S",
                "-c",
                _BOOT,
                *paths,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
            )
        except OSError as exc:
            raise StorageError(f"cannot start the writer process for {self._path}: {exc}") from exc
        assert child.stdin is not None
        start = Start(str(self._path), self._busy_ms, self._migrations, self._identity)
        child.stdin.write(frame(start))
        kind, detail = await child.hello
        if kind != "ready":
            await self._stop(child)
            if kind == "replaced":
                raise DatabaseReplaced(self._path)
            raise StorageError(str(detail))
        if child.gone.done():
            raise StorageError(f"the writer process for {self._path} exited right after start")
        if self._closing:  # close() came while this process started: it is not needed
            if child.stdin is not None:
                child.stdin.close()
            await child.gone
            raise StorageError(f"the database {self._path} is closed")
        self._child = child

    async def ensure_running(self) -> None:
        """Start a new process if the last one died (the next write would, too)."""
        if self._child is not None or self._closing:
            return
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._child is None and not self._closing:
                log.warning("starting a new writer process for %s", self._path)
                await self.start()

    def submit(self, apply: Apply[A, R], arg: A) -> Awaitable[R]:
        """Run one write in the next group commit; the result, once it is committed.

        The write is handed over when this is called (a plain function, not a
        coroutine: two fewer frames on every stored response); a caller cancelled
        while it waits does not stop it."""
        return self._enqueue(apply, arg, in_transaction=True)

    def submit_alone(self, apply: Apply[A, R], arg: A) -> Awaitable[R]:
        """Run one write between two batches, outside any transaction: for statements
        that cannot run inside one (``executescript`` commits first)."""
        return self._enqueue(apply, arg, in_transaction=False)

    async def close(self) -> None:
        """Commit the writes already handed over, then stop the process."""
        self._closing = True
        if self._starting is not None:
            async with self._starting:
                pass  # a start under way sees _closing and stops its process itself
        child = self._child
        if child is None:
            return
        self._flush()
        if child.stdin is not None:
            child.stdin.close()  # end of input: the process finishes, then exits
        try:
            await asyncio.wait_for(asyncio.shield(child.gone), CLOSE_TIMEOUT)
        except TimeoutError:
            log.error("the writer process for %s did not finish in %gs", self._path, CLOSE_TIMEOUT)
            await self._stop(child)

    def _enqueue(self, apply: Apply[A, R], arg: A, *, in_transaction: bool) -> Awaitable[R]:
        if self._closing:
            raise StorageError(f"the database {self._path} is closed")
        if self._child is None:
            return self._enqueue_after_start(apply, arg, in_transaction)
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._outbox.append((self._reference(apply), in_transaction, arg))
        self._waiting.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return future

    async def _enqueue_after_start(self, apply: Apply[A, R], arg: A, in_transaction: bool) -> R:
        await self.ensure_running()
        if self._child is None:  # closed while this write waited for a start
            raise StorageError(f"the database {self._path} is closed")
        return await self._enqueue(apply, arg, in_transaction=in_transaction)

    def _reference(self, apply: Apply[Any, Any]) -> str:
        ref = self._refs.get(apply)
        if ref is None:
            ref = reference(apply)
            try:
                found = resolve(ref)
            except (ImportError, AttributeError):
                found = None
            if found is not apply:
                raise TypeError(f"{apply!r} is not a module-level write function")
            self._refs[apply] = ref
        return ref

    def _flush(self) -> None:
        """Send what was handed over since the last flush, as one frame."""
        self._flush_scheduled = False
        jobs, self._outbox = self._outbox, []
        if not jobs:
            return
        child = self._child
        if child is None or child.stdin is None or child.stdin.is_closing():
            # Died between the hand-over and now: _child_gone failed the waiting writes.
            return
        try:
            data = frame(jobs)
        except Exception:
            data = self._frame_one_by_one(jobs)
        child.stdin.write(data)

    def _frame_one_by_one(self, jobs: list[tuple[str, bool, Any]]) -> bytes:
        """A frame of the jobs whose argument can be sent; the others fail at once.
        The futures of the failed ones leave ``_waiting``, keeping answers in order."""
        first = len(self._waiting) - len(jobs)
        sendable = []
        kept: list[asyncio.Future[Any]] = []
        for job, future in zip(jobs, list(self._waiting)[first:], strict=True):
            try:
                pickle.dumps(job[2])
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
                continue
            sendable.append(job)
            kept.append(future)
        for _ in jobs:
            self._waiting.pop()
        self._waiting.extend(kept)
        return frame(sendable) if sendable else b""

    def _answered(self, value: tuple[int, int, Sequence[tuple[bool, Any]]]) -> None:
        writes, batches, results = value
        self._writes += writes
        self._batches += batches
        for ok, result in results:
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled; the write ran all the same
                continue
            if ok:
                future.set_result(result)
            elif result[0] == "storage":
                future.set_exception(StorageError(result[1]))
            elif result[0] == "replaced":
                future.set_exception(DatabaseReplaced(self._path))
            else:
                future.set_exception(result[1])

    def _child_gone(self, child: _Child) -> None:
        if child is not self._child:
            return
        self._child = None
        self._outbox.clear()  # their futures are in _waiting, failed below
        if self._closing and not self._waiting:
            return
        code = child.returncode()
        log.error("the writer process for %s exited (status %s)", self._path, code)
        error = StorageError(
            f"the writer process of {self._path} stopped (exit status {code}); "
            "this write may not be committed"
        )
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)

    async def _stop(self, child: _Child) -> None:
        if child.transport is not None and child.returncode() is None:
            child.transport.kill()
        await child.gone
