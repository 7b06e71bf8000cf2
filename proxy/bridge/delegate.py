"""Delegated tasks: background responses whose event stream the MCP server follows.

``start`` creates the response (``background`` and ``stream``) and returns once the
daemon has acknowledged it; a task keeps reading its events, timing each MCP call
from its ``output_item.added`` to its ``output_item.done``, until the response ends.
The daemon runs the task whatever happens here: if this process stops reading, or
stops, the response still finishes and ``get_response`` reads it from the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.bridge.client import DaemonClient, DaemonError, DaemonUnreachable
from proxy.bridge.text import FINAL_STATUSES, Step, error_summary

log = logging.getLogger("lmbridge.bridge")

KEEP = 200  # delegations remembered for their traces

Progress = Callable[[str], Awaitable[None]]


@dataclass
class Delegation:
    response_id: str = ""
    steps: list[Step] = field(default_factory=list)
    final: dict[str, Any] | None = None  # the response, once it ended
    failure: Exception | None = None  # the stream broke before the end
    done: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    progress: Progress | None = None  # set while a tool call waits for the result
    task: asyncio.Task[None] | None = None
    _began: dict[str, float] = field(default_factory=dict)

    async def _report(self, message: str) -> None:
        if self.progress is not None:
            with contextlib.suppress(Exception):  # a client gone away must not end the task
                await self.progress(message)


class Delegations:
    def __init__(self, client: DaemonClient) -> None:
        self.client = client
        self._runs: OrderedDict[str, Delegation] = OrderedDict()

    def get(self, response_id: str) -> Delegation | None:
        return self._runs.get(response_id)

    async def start(self, body: dict[str, Any]) -> Delegation:
        """Create the response; raises what the daemon refused it with."""
        run = Delegation()
        run.task = asyncio.create_task(
            self._follow(run, {**body, "background": True, "stream": True})
        )
        started = asyncio.create_task(run.started.wait())
        await asyncio.wait({started, run.task}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if not run.started.is_set():
            assert run.failure is not None
            raise run.failure
        self._runs[run.response_id] = run
        while len(self._runs) > KEEP:
            oldest = next(iter(self._runs))
            if not self._runs[oldest].done.is_set():
                break  # still running: kept
            del self._runs[oldest]
        return run

    async def close(self) -> None:
        for run in self._runs.values():
            if run.task is not None:
                run.task.cancel()
        await asyncio.gather(
            *(r.task for r in self._runs.values() if r.task), return_exceptions=True
        )

    async def _follow(self, run: Delegation, body: dict[str, Any]) -> None:
        try:
            async for event in self.client.events("/v1/responses", body):
                await self._on_event(run, event)
        except (DaemonError, DaemonUnreachable) as exc:
            run.failure = exc
        except Exception as exc:  # a malformed stream: the store still has the response
            log.warning("delegation %s: event stream failed: %s", run.response_id, exc)
            run.failure = exc
        finally:
            if run.failure is None and run.final is None:
                run.failure = DaemonUnreachable("the event stream ended before the response")
            run.done.set()

    async def _on_event(self, run: Delegation, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind == "response.created":
            run.response_id = str(event["response"]["id"])
            run.started.set()
            return
        if kind == "error":
            message = str((event.get("error") or event).get("message") or "failed")
            raise DaemonError(500, message)
        item = event.get("item")
        is_call = isinstance(item, dict) and item.get("type") == "mcp_call" and "id" in item
        if kind == "response.output_item.added" and is_call:
            assert isinstance(item, dict)
            run._began[str(item["id"])] = time.monotonic()
        elif kind == "response.output_item.done" and is_call:
            assert isinstance(item, dict)
            began = run._began.pop(str(item["id"]), None)
            ms = None if began is None else (time.monotonic() - began) * 1000
            error = item.get("error")
            step = Step(
                str(item.get("server_label")),
                str(item.get("name")),
                error is None,
                ms,
                error_summary(error),
            )
            run.steps.append(step)
            took = f" in {ms:.0f} ms" if ms is not None else ""
            outcome = "ok" if step.ok else "error"
            await run._report(f"{step.server}.{step.tool}: {outcome}{took}")
        elif kind and kind.startswith("response.") and isinstance(event.get("response"), dict):
            response = event["response"]
            if response.get("status") in FINAL_STATUSES:
                run.final = response
