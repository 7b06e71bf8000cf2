"""A response being produced: what its upstream call needs (``Prepared``), and the run
that carries it to its final state (``ResponseRun``), with the readers that follow a
background response live. No I/O of its own."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from proxy.model_records import ModelInfo
from proxy.profiles import ModelProfile
from proxy.responses.builder import ResponseBuilder
from proxy.responses.claims import ConversationTurn
from proxy.responses.mcp_items import McpTarget
from proxy.responses.mcp_tools import McpSetup
from proxy.responses.output_items import Event
from proxy.responses.render import ChatTools
from proxy.responses.request import CreateRequest
from proxy.structured import AnswerSchema
from proxy.upstreams import Route
from storage.records import StoredItem

# Where the events of a response go: an SSE writer, a background run's log, nothing.
Sink = Callable[[list[Event]], Awaitable[None]]


async def discard(events: list[Event]) -> None:
    return None


@dataclass
class Prepared:
    """Everything the upstream call needs, loaded and rendered."""

    request: CreateRequest
    model: ModelInfo
    tools: ChatTools
    settings: dict[str, Any]
    system: list[dict[str, Any]]
    history: list[str]  # JSON array texts, oldest turn first
    history_tokens: list[int]
    input_items: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]
    owner: str
    # What is normalised for the model (switches applied): the one resolution per turn.
    profile: ModelProfile = field(default_factory=ModelProfile)
    mcp: McpSetup | None = None
    # Calls the client approved (mcp_approval_response): the request item and its target.
    approved: list[tuple[dict[str, Any], McpTarget]] = field(default_factory=list)
    mcp_listed: tuple[str, ...] = ()
    # The input items as stored, made at the first save.
    stored_inputs: tuple[StoredItem, ...] | None = None
    # text.format asked for JSON: what the answer is checked against, and whether an
    # invalid one is asked for once more (models.schema_retry, the request's switch).
    schema: AnswerSchema | None = None
    schema_retry: bool = True


@dataclass
class ResponseRun:
    """One response being produced."""

    id: str
    prepared: Prepared
    builder: ResponseBuilder
    created_at: int
    # Where its model calls go, and its claim on the model's slots there, entered
    # around each call (proxy/upstreams.py).
    route: Route
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    task: asyncio.Task[Any] | None = None
    cancel_requested: bool = False
    # A background run has begun (a cancel before then is seen when it begins: a task
    # cancelled before its first step never runs its clean-up).
    started: bool = False
    # Its final state is decided: a cancel can no longer change it.
    settling: bool = False
    # Storage could not take its final state: it is failed, and stored so later.
    unstored: bool = False
    # The Response as last stored (JSON text), so that the reply need not serialise
    # it a second time; while ``unstored``, as storage will hold it.
    stored_json: str | None = None
    # The turn's chat messages as last stored (what a continuation reads).
    stored_turn: str | None = None
    turn: ConversationTurn | None = None
    # Whether the answer validated against text.format's schema ("valid", "invalid").
    schema_outcome: str | None = None
    _changed: asyncio.Condition | None = None
    _settled: asyncio.Event | None = None

    @property
    def changed(self) -> asyncio.Condition:
        """Wakes readers of a background response (made only for those)."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def settled(self) -> asyncio.Event:
        """Set once a background run's final state is stored (or, ``unstored``, known)."""
        if self._settled is None:
            self._settled = asyncio.Event()
        return self._settled

    @property
    def request(self) -> CreateRequest:
        return self.prepared.request

    @property
    def response(self) -> dict[str, Any]:
        return self.builder.response

    async def record(self, events: list[Event]) -> None:
        """The sink of a background response: keep the events, wake the readers."""
        if not events:
            return
        async with self.changed:
            self.events.extend(events)
            self.changed.notify_all()

    async def follow(self, starting_after: int | None) -> AsyncIterator[Event]:
        """Events so far (after ``starting_after``), then live ones until the end."""
        position = 0
        while True:
            async with self.changed:
                while position >= len(self.events) and not self.finished:
                    await self.changed.wait()
                batch = self.events[position:]
                position = len(self.events)
                done = self.finished
            for event in batch:
                if starting_after is None or event["sequence_number"] > starting_after:
                    yield event
            if done and position >= len(self.events):
                return


async def stop(run: ResponseRun) -> None:
    """Cancel a background run unless its final state is decided; wait until it is stored."""
    run.cancel_requested = True
    if not run.settling and run.started and run.task is not None:
        run.task.cancel()
    await run.settled.wait()


async def deliver(sink: Sink, events: list[Event]) -> None:
    """Best effort for the last events of a cancelled run (the client may be gone)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(sink(events))


async def still_running(builder: ResponseBuilder, sink: Sink) -> None:
    """A streamed response's keep-alive while its model loads: ``response.in_progress``
    again, an event every client reads (an SSE comment resets no idle timer of a client
    that counts events, and a WebSocket has none)."""
    await sink(builder.in_progress())
