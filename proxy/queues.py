"""Per-model concurrency: a model runs at most ``max_concurrent`` upstream calls at once,
and the requests beyond wait in its queue (``proxy/slots.py``), interactive ones before
background work, each in its order of arrival, for at most ``queue_timeout``; a request
that finds the queue full gets 429 ``model_busy``.

Where a slot is taken, and held until the upstream's answer has been read whole (a
stream to its end): ``passthrough.forward``, ``relay.forward`` (a JSON body naming a
model), each model call of a chat tool loop (``mcp/chat.py``) and of a response's rounds
(``responses/tool_rounds.py``), ``input_tokens`` and ``compact``. Never while an MCP tool
runs: a loop gives its slot back after each model call and waits for the next at its
first place in line, so no request holds a slot while it waits for another.

A model with no limit (none configured, none the upstream reports) has no queue:
``ModelQueues.get`` answers None and the request goes straight upstream, as fast as
before queues existed.

Entering an admission is also where a model not loaded is loaded first (the upstream's
``ModelLifecycle``, when it loads models on request), before the request takes its
place in line: every model call passes here, so none reaches an unloaded model.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Collection, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from proxy.config import ModelsConfig, ModelSettings
from proxy.errors import ModelBusy, QueueTimeout
from proxy.keys import LOAD_WAIT, QUEUED
from proxy.metrics import Metrics, QueueState
from proxy.model_records import ModelInfo
from proxy.slots import BACKGROUND, INTERACTIVE, SlotQueue, Waiter

if TYPE_CHECKING:
    from proxy.lifecycle import Keepalive, ModelLifecycle

Clock = Callable[[], float]


class Admission:
    """One request's claim on a model's slots, entered (``async with``) around each of
    its upstream calls: its priority, its place in line (kept from its first call), and
    how long it waited in all. With a ``lifecycle``, the model is loaded first when it is
    not; ``keepalive`` is called while a stream waits for that."""

    __slots__ = (
        "keepalive",
        "lifecycle",
        "load_wait",
        "model",
        "place",
        "priority",
        "queue",
        "queued",
        "since",
        "waited",
    )

    def __init__(
        self,
        queue: ModelQueue | None,
        priority: int,
        model: ModelInfo | None = None,
        lifecycle: ModelLifecycle | None = None,
    ) -> None:
        self.queue = queue
        self.priority = priority
        self.model = model
        self.lifecycle = lifecycle if model is not None else None
        self.keepalive: Keepalive | None = None
        self.place: int | None = None
        self.queued = False  # it waited in line at least once
        self.waited = 0.0  # seconds, all its calls together
        self.load_wait = 0.0  # seconds waited for the model to load, all calls together
        self.since = 0.0  # when it got its current slot

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    async def acquire(self) -> None:
        """The model loaded if it must be, then a slot for this call."""
        lifecycle = self.lifecycle
        if lifecycle is None:
            if self.queue is not None:
                await self.queue.acquire(self)
            return
        assert self.model is not None
        lifecycle.enter(self.model.id)  # counted as busy from now: never unloaded under it
        try:
            self.load_wait += await lifecycle.ensure_loaded(self.model, self.keepalive)
            if self.queue is not None:
                await self.queue.acquire(self)
        except BaseException:
            lifecycle.leave(self.model.id)
            raise

    def release(self) -> None:
        """The slot of the current call given back (after ``acquire``/``__aenter__``)."""
        if self.queue is not None:
            self.queue.release(self)
        if self.lifecycle is not None:
            assert self.model is not None
            self.lifecycle.leave(self.model.id)


class Waited(Protocol):
    """What waited for a model: an ``Admission``, or a request's ``upstreams.Route``."""

    @property
    def queued(self) -> bool: ...

    @property
    def waited(self) -> float: ...

    @property
    def load_wait(self) -> float: ...


def note_wait(request: web.Request, admission: Waited) -> None:
    """The time a request waited in its model's queue, when it did: its log line's
    ``queued_ms``; and for its model to load: ``load_wait_ms``."""
    if admission.queued:
        request[QUEUED] = admission.waited
    if admission.load_wait:
        request[LOAD_WAIT] = admission.load_wait


class ModelQueue:
    """One model's slots and line, waited for with asyncio."""

    def __init__(
        self,
        model: str,
        limit: int | None,
        settings: ModelSettings,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.model = model
        assert settings.queue_size is not None and settings.queue_timeout is not None
        self.slots: SlotQueue[asyncio.Future[None]] = SlotQueue(limit, settings.queue_size)
        self.timeout = settings.queue_timeout
        self.metrics = metrics
        self.clock = clock

    async def acquire(self, admission: Admission) -> None:
        """A slot for this call: at once, after a wait in line, or ModelBusy (the line is
        full) or QueueTimeout. A task cancelled while it waits (its client went away)
        leaves the line at once."""
        slots = self.slots
        if admission.place is None:
            admission.place = slots.next_place()
        if slots.enter():
            self._admitted(admission, 0.0)
            return
        if not slots.has_room():
            raise self.busy()
        started = self.clock()
        admission.queued = True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiter = slots.wait(admission.priority, admission.place, future)
        try:
            async with asyncio.timeout(self.timeout):
                await future
        except TimeoutError:
            if not self._leave(waiter):
                admission.waited += self.clock() - started
                self.metrics.queue_timeouts.labels(self.model).inc()
                raise self._timed_out() from None
            # Given a slot just as the time ran out: it is this request's.
        except BaseException:
            admission.waited += self.clock() - started
            if self._leave(waiter):
                self._wake(slots.release())  # handed on: this request will not use it
            raise
        self._admitted(admission, self.clock() - started)

    def release(self, admission: Admission) -> None:
        self._wake(self.slots.release(self.clock() - admission.since))

    def _admitted(self, admission: Admission, waited: float) -> None:
        admission.waited += waited
        admission.since = self.clock()
        self.metrics.queue_wait_seconds.observe((self.model,), waited)

    def _leave(self, waiter: Waiter[asyncio.Future[None]]) -> bool:
        """A waiter whose wait ended without its future's answer: out of the line. True
        when it holds a slot after all (given one before it could leave)."""
        if self.slots.leave(waiter):
            return False
        return not waiter.payload.cancelled()  # cancelled: _wake handed the slot on

    def _wake(self, granted: list[Waiter[asyncio.Future[None]]]) -> None:
        while granted:
            waiter = granted.pop(0)
            if waiter.payload.done():  # its task was cancelled and has yet to leave
                granted += self.slots.release()
            else:
                waiter.payload.set_result(None)

    def set_limit(self, limit: int | None) -> None:
        self._wake(self.slots.set_limit(limit))

    def busy(self) -> ModelBusy:
        self.metrics.queue_refusals.labels(self.model).inc()
        slots = self.slots
        wait = slots.retry_after()
        error = ModelBusy(
            f"The model {self.model} is busy: {slots.running} requests run on it, its "
            f"limit, and {slots.waiting} wait, as many as its queue holds. Try again in "
            f"{math.ceil(wait)} s. (models.max_concurrent and models.queue_size set these "
            'limits, for all models or in a [models."PATTERN"] table.)'
        )
        error.retry_after = wait
        return error

    def _timed_out(self) -> QueueTimeout:
        return QueueTimeout(
            f"This request waited {self.timeout:g} s for the model {self.model} without "
            f"getting its turn: {self.slots.running} requests run on it, its limit, and "
            f"{self.slots.waiting} more wait (models.queue_timeout, models.max_concurrent)."
        )

    def state(self) -> QueueState:
        slots = self.slots
        return QueueState(self.model, slots.running, slots.waiting, slots.limit)


class ModelQueues:
    """Every model's queue, made when a model with a limit is first asked for, and its
    limit kept up to date with what the upstream reports (``ModelInfo.parallel``)."""

    def __init__(
        self,
        config: ModelsConfig,
        metrics: Metrics,
        *,
        low_priority: Collection[str] = (),
        clock: Clock = time.monotonic,
    ) -> None:
        self.config = config
        self.metrics = metrics
        # Owners (hashed API keys) whose requests count as background work.
        self.low_priority = frozenset(low_priority)
        self.clock = clock
        # Per model id: the upstream's parallelism last seen, and the queue (None: none).
        self._known: dict[str, tuple[int | None, ModelQueue | None]] = {}
        self._settings: dict[str, ModelSettings] = {}
        self._queues: dict[str, ModelQueue] = {}
        # Loads the models of the upstream when it loads on request (set with the
        # upstream client; None: models are taken as they are).
        self.lifecycle: ModelLifecycle | None = None
        metrics.queue_states = self.states

    def get(self, model: ModelInfo) -> ModelQueue | None:
        """The model's queue, or None when it has no limit. On every model call: one
        dictionary lookup while nothing changed."""
        known = self._known.get(model.id)
        if known is not None and known[0] == model.parallel:
            return known[1]
        return self._update(model)

    def _update(self, model: ModelInfo) -> ModelQueue | None:
        settings = self.settings(model.id)
        limit = settings.max_concurrent or model.parallel
        queue = self._queues.get(model.id)
        if queue is not None:
            queue.set_limit(limit)
        elif limit is not None:
            queue = ModelQueue(model.id, limit, settings, self.metrics, self.clock)
            self._queues[model.id] = queue
        self._known[model.id] = (model.parallel, queue)
        return queue

    def settings(self, model_id: str) -> ModelSettings:
        settings = self._settings.get(model_id)
        if settings is None:
            settings = self._settings[model_id] = self.config.settings_for(model_id)
        return settings

    def priority(self, owner: str, *, background: bool = False) -> int:
        """Background work and low-priority keys wait behind interactive requests."""
        return BACKGROUND if background or owner in self.low_priority else INTERACTIVE

    def loader(self) -> ModelLifecycle | None:
        """The lifecycle when the upstream loads models on request, else None."""
        lifecycle = self.lifecycle
        return lifecycle if lifecycle is not None and lifecycle.active else None

    def admission(self, model: ModelInfo, priority: int) -> Admission:
        return Admission(self.get(model), priority, model, self.loader())

    def check_room(self, model: ModelInfo) -> None:
        """ModelBusy now when a request arriving now would be refused: for answers that
        open their stream before the first model call (a streamed response), so that a
        full queue is a plain 429 the client can retry."""
        queue = self.get(model)
        if queue is not None and not queue.slots.has_room():
            raise queue.busy()

    def states(self) -> Iterator[QueueState]:
        for queue in self._queues.values():
            yield queue.state()

    def status(self) -> dict[str, dict[str, Any]]:
        """For /readyz: each queue's running and waiting requests and its limit."""
        return {
            state.model: {
                "running": state.running,
                "queued": state.queued,
                "max_concurrent": state.limit,
            }
            for state in self.states()
        }
