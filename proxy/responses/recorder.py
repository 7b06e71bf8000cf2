"""Storing responses: each save of a run (a background one is saved queued, then at
its end), the record written, and a final state storage could not take.

Durability: a response is written (and committed) before the client sees its final
state: before the JSON reply, before ``response.completed``, and before a background
response is acknowledged as queued. A background response's final state must reach
storage, where it is polled and replayed from: when storage cannot take it, the
response ends failed, and is stored so as soon as storage works again
(``store_final``, ``_repair``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

from proxy.jsontext import dumps, loads
from proxy.responses import render
from proxy.responses.output_items import Event
from proxy.responses.runs import Prepared, ResponseRun
from proxy.tasks import BackgroundTasks, WorkerThread
from storage.errors import StorageError
from storage.records import ResponseRecord, ResponseStore, StoredItem

log = logging.getLogger("lmbridge.responses")

UNSTORED = "lmbridge could not store the final state of this response."
# How often the failed state of such responses is tried again, besides after any
# write that succeeds.
REPAIR_INTERVAL = 5.0
# Inputs and histories with more items than this are read and rendered in the worker
# thread: at about 10 µs an item, more would hold the event loop for over 10 ms.
LARGE_INPUT = 1000


class ResponseRecorder:
    def __init__(
        self,
        store: ResponseStore,
        worker: WorkerThread,
        tasks: BackgroundTasks,
        running: dict[str, ResponseRun],
        *,
        retention: int,
        clock: Callable[[], float],
    ) -> None:
        self.store = store
        self.worker = worker
        self.tasks = tasks
        # The service's background runs not yet stored in their final state.
        self.running = running
        self.retention = retention
        self.clock = clock
        self.repair_interval = REPAIR_INTERVAL
        self._repairing: asyncio.Task[None] | None = None
        self._storage_works = asyncio.Event()

    async def store_final(self, run: ResponseRun, final: list[Event]) -> list[Event]:
        """Store the final state; the events to send once it is stored.

        A foreground response that cannot be stored fails its request (nothing of it
        was acknowledged). A background one was acknowledged as queued and is polled
        and replayed from storage, so its end must get there: a writer process that
        died is replaced by the next write (tried once more, unless it had committed);
        when storage cannot take it, the response ends failed, as storage will hold
        it once it works again."""
        run.settling = True
        if not run.request.background:
            await self.save(run, final)
            return final
        try:
            try:
                await self.save(run, final)
            except StorageError:
                if await self._stored_status(run) != run.response["status"]:
                    await self.save(run, final)
        except StorageError as exc:
            log.error(
                "background response %s: its final state could not be stored: %s", run.id, exc
            )
            final = await self._fail_unstored(run)
        run.settled.set()
        return final

    async def _stored_status(self, run: ResponseRun) -> str | None:
        stored = await self.store.get_response(run.id, run.prepared.owner)
        return None if stored is None else loads(stored).get("status")

    async def _fail_unstored(self, run: ResponseRun) -> list[Event]:
        """End a background response as failed, in the state storage holds it in (its
        last stored state, failed), and get that stored now or as soon as it can be."""
        body = loads(run.stored_json) if run.stored_json else run.builder.snapshot()
        body["status"] = "failed"
        body["error"] = {"code": "server_error", "message": UNSTORED}
        run.stored_json = dumps(body)
        try:
            # One small update, where the whole final state did not fit.
            await self.store.fail_unfinished(int(self.clock()), UNSTORED, response_ids=(run.id,))
        except StorageError:
            run.unstored = True
            if self._repairing is None or self._repairing.done():
                self._repairing = self.tasks.spawn(self._repair(), "store unstored responses")
        return run.builder.end_as(body)

    async def _repair(self) -> None:
        """Store the unstored responses as failed once storage works again: after any
        save that succeeds, or every ``repair_interval`` seconds."""
        while ids := tuple(r.id for r in self.running.values() if r.unstored):
            self._storage_works.clear()
            try:
                await self.store.fail_unfinished(int(self.clock()), UNSTORED, response_ids=ids)
            except StorageError:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.repair_interval):
                        await self._storage_works.wait()
                continue
            for response_id in ids:
                run = self.running.get(response_id)
                if run is not None and run.unstored:
                    run.unstored = False
                    if run.finished:  # else _run_background lets it go as it ends
                        del self.running[response_id]
            log.warning(
                "stored %d background response(s) as failed: their final state could not be stored",
                len(ids),
            )

    async def save(self, run: ResponseRun, pending: Sequence[Event] = ()) -> None:
        """Store the response; ``pending`` are its events not yet handed to the sink
        (they are stored with it, then sent: nothing is sent before it is durable)."""
        if not run.request.store:
            return
        large = len(run.prepared.input_items) > LARGE_INPUT
        record = await self.worker.run_if(large, partial(self._record, run, pending))
        await self.store.save_response(record)
        run.stored_json = record.body
        run.stored_turn = record.turn_messages
        if self._repairing is not None:
            self._storage_works.set()

    def _record(self, run: ResponseRun, pending: Sequence[Event]) -> ResponseRecord:
        request = run.request
        response = run.builder.response
        output = response["output"]
        output_items = tuple(_stored(item) for item in output)
        turn = turn_text(run.prepared, output)
        finished = response["status"] not in ("queued", "in_progress")
        prepared = run.prepared
        if prepared.stored_inputs is None:  # the same at every save of a background response
            prepared.stored_inputs = tuple(_stored(item) for item in prepared.input_items)
        input_items = prepared.stored_inputs
        conversation_items: tuple[StoredItem, ...] = ()
        if request.conversation_id is not None and finished:
            conversation_items = input_items + output_items
        body = dumps(response)
        return ResponseRecord(
            id=run.id,
            owner=run.prepared.owner,
            created_at=run.created_at,
            expires_at=run.created_at + int(self.retention),
            status=response["status"],
            body=body,
            previous_response_id=request.previous_response_id,
            conversation_id=request.conversation_id,
            background=request.background,
            input_items=input_items,
            output_items=output_items,
            turn_messages=turn,
            turn_tokens=render.estimate_tokens(turn),
            events=tuple(dumps(e) for e in [*run.events, *pending]) if request.background else (),
            conversation_items=conversation_items,
            mcp_listed=run.prepared.mcp_listed,
        )


def turn_text(prepared: Prepared, output: list[dict[str, Any]]) -> str:
    """The turn as the next one continues it: its chat messages, a JSON array text."""
    return dumps(_turn_messages(prepared, output))


def _turn_messages(prepared: Prepared, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of this turn: its input, then its output. After a user, system
    or developer message nothing of the input can merge with the output (an assistant
    message takes the calls after it), so the input's rendering from ``prepare`` is
    reused; otherwise both are rendered together."""
    images = prepared.model.vision is not False
    reasoning = prepared.profile.keeps_reasoning
    inputs = prepared.input_items
    last = inputs[-1] if inputs else None
    if last is not None and last.get("type") == "message" and last.get("role") != "assistant":
        output_messages = render.render_items(
            output, prepared.tools.names, images=images, reasoning=reasoning
        )
        return [*prepared.new_messages, *output_messages]
    return render.render_items(
        [*inputs, *output], prepared.tools.names, images=images, reasoning=reasoning
    )


def _stored(item: dict[str, Any]) -> StoredItem:
    return StoredItem(item["id"], dumps(item))
