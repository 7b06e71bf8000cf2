"""Several upstreams behind one daemon: each with its client (breaker, pool), model list,
queues and lifecycle (``Upstream``); the pool of them in configuration order, whose
model catalogue is the union of their lists (``UpstreamPool``); and the model calls of
one request, each opened on the best upstream that has the model and, when that one
fails before anything reached the client, on the next (``Route``).

Every model call opens through ``Route.open``: the pass-through routes, the relay, the
chat tool loop, the Responses rounds, ``input_tokens`` and ``compact``. The choices are
``proxy/routing.py``'s (pure); here they meet the sockets. With one upstream and no
``models.fallbacks`` a route is the old path: its admission, then the client's ``open``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator, Mapping, Sequence
from typing import Any

import aiohttp

from proxy.breaker import CircuitState
from proxy.catalog import ModelCatalog, ModelListReader
from proxy.config import ModelsConfig, UpstreamConfig
from proxy.errors import LMBridgeError, ModelBusy, UpstreamStatus
from proxy.jsontext import dumps_bytes, loads
from proxy.lifecycle import Keepalive, ModelLifecycle
from proxy.metrics import Metrics, QueueState
from proxy.model_records import ModelInfo, ModelList
from proxy.queues import Admission, ModelQueues
from proxy.routing import Placement, may_fall_back, merge, model_chain, rank
from proxy.upstream import UpstreamClient

log = logging.getLogger("lmbridge.upstream")


class Upstream:
    """One model server: its name, client, model list, queues and lifecycle."""

    def __init__(
        self,
        config: UpstreamConfig,
        client: UpstreamClient,
        models: ModelsConfig,
        metrics: Metrics,
        queues: ModelQueues,
    ) -> None:
        self.name = config.name
        self.config = config
        self.client = client
        self.catalog = ModelCatalog(
            models,
            ModelListReader(client.get_json, kind=config.kind).read,
            on_refresh=lambda outcome: metrics.model_list_refreshes.labels(outcome).inc(),
        )
        self.queues = queues
        # Model calls open on it now, of every model: how busy it is where a model has no
        # queue to say so.
        self.calls = 0
        self.lifecycle = ModelLifecycle(client, self.catalog, models, metrics)
        queues.lifecycle = self.lifecycle

    def listed(self, model_id: str) -> ModelInfo | None:
        """The model as this upstream's last list shows it."""
        listed = self.catalog.cached
        return listed.by_name.get(model_id) if listed is not None else None

    def circuit_open(self) -> bool:
        breaker = self.client.breaker
        return breaker.state is CircuitState.OPEN and breaker.retry_after() > 0

    def placement(self, model: ModelInfo, order: int) -> Placement:
        here = self.listed(model.id) or model
        loaded = here.state == "loaded" or (
            self.lifecycle.active and self.lifecycle.is_loaded(model.id)
        )
        queue = self.queues.get(here)
        if queue is None:
            return Placement(
                self.name, order, loaded, running=self.calls, circuit_open=self.circuit_open()
            )
        slots = queue.slots
        return Placement(
            self.name,
            order,
            loaded,
            running=slots.running,
            queued=slots.waiting,
            limit=slots.limit,
            circuit_open=self.circuit_open(),
        )


class UpstreamPool:
    """The upstreams in configuration order and the union of their model lists."""

    def __init__(self, upstreams: Sequence[Upstream], config: ModelsConfig, metrics: Metrics):
        assert upstreams
        self.upstreams = list(upstreams)
        self.by_name = {u.name: u for u in self.upstreams}
        self.first = self.upstreams[0]
        self.fallbacks: Mapping[str, Sequence[str]] = config.fallbacks
        self.metrics = metrics
        # One upstream: its own catalogue, as before there were several.
        self.catalog = (
            self.first.catalog if len(self.upstreams) == 1 else ModelCatalog(config, self._read_all)
        )
        self.direct = len(self.upstreams) == 1 and not self.fallbacks
        if len(self.upstreams) > 1:
            metrics.queue_states = self._queue_states
            metrics.loaded_models = self._loaded_counts

    async def _read_all(self) -> ModelList:
        """Every upstream's list read now, together; one that fails is left out (its
        models are not offered) unless all fail."""
        results = await asyncio.gather(
            *(u.catalog.refresh() for u in self.upstreams), return_exceptions=True
        )
        lists: list[tuple[str, Sequence[ModelInfo]]] = []
        failures: list[BaseException] = []
        for upstream, result in zip(self.upstreams, results, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, Exception):
                    raise result
                failures.append(result)
                log.warning("the model list of upstream %s could not be read", upstream.name)
            else:
                lists.append((upstream.name, result.models))
        if not lists:
            raise failures[0]
        first = next(r for r in results if isinstance(r, ModelList))
        return ModelList.build(merge(lists), first.dialect, first.fetched_at)

    def route(self, model: ModelInfo, priority: int) -> Route:
        return Route(self, model, priority)

    def candidates(self, model: ModelInfo) -> list[Upstream]:
        """The upstreams that list the model, best first (``routing.rank``)."""
        having = [
            (order, u)
            for order, u in enumerate(self.upstreams)
            if u.listed(model.id) is not None or u.name in model.upstreams
        ]
        if len(having) <= 1:
            return [u for _, u in having]
        by_name = self.by_name
        return [by_name[p.upstream] for p in rank([u.placement(model, o) for o, u in having])]

    def loaders(self, model: ModelInfo) -> list[ModelLifecycle]:
        """The lifecycles of the model's upstreams that load models on request."""
        if self.direct:
            loader = self.first.queues.loader()
            return [] if loader is None else [loader]
        return [u.lifecycle for u in self.candidates(model) if u.lifecycle.active]

    async def preload(self, names: Sequence[str]) -> None:
        """models.preload: each model loaded once, on the first upstream that would serve
        it and loads models on request; a failure logged, not raised."""
        if self.direct:
            await self.first.lifecycle.preload(names)
            return
        for name in names:
            try:
                model = await self.catalog.resolve(name, "any")
            except LMBridgeError as exc:
                log.warning("models.preload: %s could not be loaded: %s", name, exc.message)
                continue
            loaders = self.loaders(model)
            if not loaders:
                log.warning("models.preload: no upstream of %s loads models; not preloading", name)
                continue
            await loaders[0].preload([model.id])

    def check_room(self, model: ModelInfo) -> None:
        """ModelBusy now when every upstream of the model would refuse a request now
        (``ModelQueues.check_room``)."""
        refusals: list[ModelBusy] = []
        for upstream in self.candidates(model) or [self.first]:
            try:
                upstream.queues.check_room(upstream.listed(model.id) or model)
            except ModelBusy as exc:
                refusals.append(exc)
            else:
                return
        raise refusals[0]

    def upstream_of(self, name: str | None, model: ModelInfo) -> Upstream:
        """The upstream an admin action on the model goes to: the one named, else the
        first that lists it."""
        if name is not None:
            return self.by_name[name]
        listing = self.candidates(model)
        return listing[0] if listing else self.first

    def _queue_states(self) -> Iterator[QueueState]:
        """Each model's queues of all upstreams as one (a metric sample per model)."""
        summed: dict[str, QueueState] = {}
        for upstream in self.upstreams:
            for s in upstream.queues.states():
                seen = summed.get(s.model)
                if seen is None:
                    summed[s.model] = s
                else:
                    limit = None if seen.limit is None or s.limit is None else seen.limit + s.limit
                    summed[s.model] = QueueState(
                        s.model, seen.running + s.running, seen.queued + s.queued, limit
                    )
        yield from summed.values()

    def _loaded_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for upstream in self.upstreams:
            for who, count in upstream.lifecycle.loaded_counts().items():
                counts[who] = counts.get(who, 0) + count
        return counts


class Route:
    """The model calls of one request. ``open`` takes a slot on the best upstream that
    has the model (loading it there first if it must) and sends the call; a failure
    another server could avoid (``routing.may_fall_back``) moves it to the next upstream,
    then to the next fallback model. The slot is held until ``release`` (``async with``
    around the call and the reading of its answer). The upstream that answered is kept
    for the next calls of the request (a tool loop's rounds, a schema retry)."""

    __slots__ = (
        "_admissions",
        "_held",
        "_open_on",
        "hops",
        "keepalive",
        "model",
        "on_admitted",
        "pool",
        "priority",
        "served",
    )

    def __init__(self, pool: UpstreamPool, model: ModelInfo, priority: int) -> None:
        self.pool = pool
        self.model = model
        self.priority = priority
        self.keepalive: Keepalive | None = None
        # Run once, when the request first holds a slot (a background response stays
        # queued while it waits in its model's queue).
        self.on_admitted: Callable[[], Awaitable[None]] | None = None
        # The upstream and model of the last call that opened (None: none yet).
        self.served: tuple[Upstream, ModelInfo] | None = None
        # Each failed attempt, "upstream:reason", in order (the log line's hops).
        self.hops: list[str] = []
        self._admissions: dict[tuple[str, str], Admission] = {}
        self._held: Admission | None = None
        self._open_on: Upstream | None = None  # where the call in progress was opened

    # --- what the request's log line and headers show -----------------------

    @property
    def upstream_name(self) -> str | None:
        return self.served[0].name if self.served is not None else None

    @property
    def served_model(self) -> str:
        return self.served[1].id if self.served is not None else self.model.id

    @property
    def queued(self) -> bool:
        return any(a.queued for a in self._admissions.values())

    @property
    def waited(self) -> float:
        return sum(a.waited for a in self._admissions.values())

    @property
    def load_wait(self) -> float:
        return sum(a.load_wait for a in self._admissions.values())

    @property
    def client(self) -> UpstreamClient:
        """The client of the upstream that served the last call (before any: the best)."""
        if self.served is not None:
            return self.served[0].client
        candidates = self.pool.candidates(self.model)
        return (candidates[0] if candidates else self.pool.first).client

    # --- the calls -----------------------------------------------------------

    async def admitted(self) -> None:
        """The request holds a slot of its model (or needs none): ``on_admitted``, once."""
        hook, self.on_admitted = self.on_admitted, None
        if hook is not None:
            await hook()

    async def __aenter__(self) -> Route:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()
        upstream, self._open_on = self._open_on, None
        if upstream is not None:
            upstream.calls -= 1

    async def open(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        route: str = "other",
        idempotent: bool = True,
    ) -> aiohttp.ClientResponse:
        """The call sent where it can be served; the answer's headers are in."""
        self.release()  # a call not read to its end (a schema retry) gives its slot back
        if self.pool.direct:
            upstream = self.pool.first
            return await self._attempt(
                upstream, self.model, method, path, body, headers, route, idempotent, True
            )
        failed: tuple[str, str] | None = None
        last: LMBridgeError | None = None
        attempts = list(self._attempts())
        for n, (upstream, model) in enumerate(attempts, 1):
            if failed is not None:
                self.pool.metrics.upstream_fallbacks.labels(
                    failed[0], upstream.name, failed[1]
                ).inc()
                log.warning(
                    "upstream %s failed (%s); trying %s with %s",
                    failed[0],
                    failed[1],
                    upstream.name,
                    model.id,
                )
            sent = body if model.id == self.model.id else _with_model(body, model.id)
            try:
                # Retried only where nothing else can serve it: with a sibling left,
                # a failed call moves there at once rather than after the backoff.
                return await self._attempt(
                    upstream,
                    model,
                    method,
                    path,
                    sent,
                    headers,
                    route,
                    idempotent,
                    n == len(attempts),
                )
            except LMBridgeError as exc:
                if not may_fall_back(exc):
                    raise
                last = exc
                failed = (upstream.name, _reason(exc))
                self.hops.append(f"{upstream.name}:{failed[1]}")
        if last is None:
            raise AssertionError("a resolved model has an upstream")  # pragma: no cover
        raise last

    def _attempts(self) -> Iterator[tuple[Upstream, ModelInfo]]:
        """Where to try the call, in order: where the last call was served, then the
        model's upstreams best first, then each fallback model's."""
        tried: set[tuple[str, str]] = set()
        if self.served is not None:
            tried.add((self.served[0].name, self.served[1].id))
            yield self.served
        listed = self.pool.catalog.cached
        fallbacks = self.pool.fallbacks
        chain = model_chain(self.model.id, fallbacks) if fallbacks else (self.model.id,)
        for model_id in chain:
            model = self.model if model_id == self.model.id else None
            if model is None and listed is not None:
                model = listed.by_name.get(model_id)
            if model is None:
                continue  # a fallback no upstream lists
            for upstream in self.pool.candidates(model):
                if (upstream.name, model.id) not in tried:
                    tried.add((upstream.name, model.id))
                    yield upstream, model

    async def _attempt(
        self,
        upstream: Upstream,
        model: ModelInfo,
        method: str,
        path: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        route: str,
        idempotent: bool,
        retries: bool,
    ) -> aiohttp.ClientResponse:
        counted = not self.pool.direct  # busy from now, while it waits for the headers
        if counted:
            upstream.calls += 1
        admission = self._admission(upstream, model)
        try:
            if admission is not None:
                await admission.acquire()
            try:
                await self.admitted()
                resp = await upstream.client.open(
                    method,
                    path,
                    body=body,
                    headers=headers,
                    route=route,
                    idempotent=idempotent,
                    retries=retries,
                )
            except BaseException:
                if admission is not None:
                    admission.release()
                raise
        except BaseException:
            if counted:
                upstream.calls -= 1
            raise
        self._held = admission
        self.served = (upstream, model)
        if counted:
            self._open_on = upstream
        return resp

    def _admission(self, upstream: Upstream, model: ModelInfo) -> Admission | None:
        """The request's claim on the model's slots there (its place in line kept from
        call to call), or None when the model has no limit and nothing loads it."""
        key = (upstream.name, model.id)
        admission = self._admissions.get(key)
        if admission is None:
            queues = upstream.queues
            here = upstream.listed(model.id) or model
            if queues.get(here) is None and queues.loader() is None:
                return None
            admission = queues.admission(here, self.priority)
            self._admissions[key] = admission
        admission.keepalive = self.keepalive
        return admission

    # --- reading the answer, through the client that opened it ------------------

    async def read_body(self, resp: aiohttp.ClientResponse) -> bytes:
        return await self.client.read_body(resp)

    def iter_chunks(self, resp: aiohttp.ClientResponse) -> AsyncGenerator[bytes, None]:
        return self.client.iter_chunks(resp)


def _reason(error: LMBridgeError) -> str:
    if isinstance(error, UpstreamStatus):
        return f"status_{error.status}"
    return error.code or type(error).__name__


def _with_model(body: bytes | None, model: str) -> bytes | None:
    """A JSON request body sent to a fallback model: its ``model`` rewritten."""
    if not body:
        return body
    try:
        data: Any = loads(body)
    except ValueError:
        return body
    if not isinstance(data, dict):
        return body
    data["model"] = model
    return dumps_bytes(data)
