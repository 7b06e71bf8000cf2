"""Background tasks: spawned in one place that keeps a reference to each and logs
what fails, and cancelled together when the app stops. Nothing is fire-and-forget.
And the one worker thread that takes the CPU work of large requests off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger("lmbridge.tasks")
T = TypeVar("T")


class BackgroundTasks:
    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def close(self, grace: float = 10.0) -> None:
        """Cancel every task and wait (up to ``grace`` seconds) for their clean-up."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=grace)


class WorkerThread:
    """Runs the CPU work of large requests (reading a body of megabytes, rendering tens
    of thousands of items) so that the event loop keeps serving others: pure Python, or
    C called in short pieces, leaves the loop's thread the GIL every few milliseconds.

    One thread: large requests take turns instead of splitting the GIL among them, a
    client cannot make the daemon start threads by sending more, and only one large body
    is unfolded into objects at a time. It starts with the app, not on the first large
    request, whose event loop would wait for it to start."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmbridge-worker")
        self._executor.submit(lambda: None)

    async def run(self, work: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    async def run_if(self, large: bool, work: Callable[[], T]) -> T:
        """``work()``: in the worker when ``large``, else right here."""
        return await self.run(work) if large else work()

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
