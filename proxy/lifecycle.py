"""Which models are loaded upstream, and loading or unloading them: on an upstream with
a load endpoint (LM Studio 0.4+, llama.cpp's router mode, Ollama), whose calls and idea of
"loaded" are its ``ModelControl`` (``proxy/model_control.py``); the logic here is the same
for all of them.

Every model call passes ``ensure_loaded`` (``queues.Admission``, where slots are taken):
a model the list shows loaded costs a dictionary lookup; one that is not is loaded
once, however many requests ask for it together: the first starts the load in a task
of its own, the others wait for that task, and a failure reaches them all as the same
``ModelLoadFailed``. Streams that wait get a keep-alive callback every
``models.load_keepalive`` seconds.

A model lmbridge loaded is unloaded once idle for its ``ttl`` (a request's ``ttl`` or
``keep_alive``, else ``[models."PATTERN"]`` ``ttl``, else ``models.ttl``; unset: never),
never while requests run on it or wait for it. Models loaded by someone else are left
alone by the reaper; an admin unload (``lmbridge unload``) unloads any.

On other upstreams (a llama.cpp server of one model, vLLM, plain OpenAI servers, LM Studio
before 0.4, whose JIT loading then applies) ``ensure_loaded`` does nothing.

One ``ModelLifecycle`` per upstream client and its catalog; no global state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from proxy.catalog import ModelCatalog
from proxy.config import ModelsConfig, parse_duration
from proxy.errors import (
    BadRequest,
    LMBridgeError,
    LoadNotSupported,
    ModelLoadFailed,
    ModelNotLoaded,
    UpstreamError,
    UpstreamStatus,
)
from proxy.metrics import Metrics
from proxy.model_control import LOADING_DIALECTS, LoadsItself, ModelControl, control_for
from proxy.model_records import ModelInfo, ModelList
from proxy.upstream import UpstreamClient

__all__ = ["LOADING_DIALECTS", "ModelLifecycle", "request_ttl"]

log = logging.getLogger("lmbridge.models")
# How often the reaper looks for idle models (a ttl is honoured to within this).
REAP_INTERVAL = 5.0

LoadedBy = Literal["lmbridge", "upstream"]
Keepalive = Callable[[], Awaitable[None]]
Clock = Callable[[], float]


@dataclass(slots=True, eq=False)
class ModelRecord:
    """What lmbridge knows of one model beyond the upstream's list."""

    model: str
    # What lmbridge last did to the model; trusted over the list ``seen`` (read right
    # after, perhaps by a read that started before), not over later lists.
    loaded: bool | None = None
    seen: ModelList | None = None
    loaded_by: LoadedBy | None = None
    instance: str | None = None
    loading: asyncio.Future[None] | None = None
    unloading: asyncio.Future[None] | None = None
    users: int = 0  # requests between Admission.acquire and release, loads awaited included
    last_used: float = 0.0
    ttl: float | None = None  # a request's or a load's own, over the settings
    load_seconds: float | None = None
    # The server cannot be asked to load it (an Ollama embedding model): requests pass
    # and the server loads it itself, as without lmbridge.
    loads_itself: bool = False


class ModelLifecycle:
    def __init__(
        self,
        upstream: UpstreamClient,
        catalog: ModelCatalog,
        config: ModelsConfig,
        metrics: Metrics,
        *,
        clock: Clock = time.monotonic,
    ) -> None:
        self.upstream = upstream
        self.catalog = catalog
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._records: dict[str, ModelRecord] = {}
        self._tasks: set[asyncio.Future[None]] = set()
        metrics.loaded_models = self.loaded_counts

    # --- the request path -------------------------------------------------

    @property
    def control(self) -> ModelControl | None:
        """How the upstream loads and unloads models (None: it does not on request),
        known once its list was read."""
        listed = self.catalog.cached
        return control_for(listed.dialect) if listed is not None else None

    @property
    def active(self) -> bool:
        """Whether the upstream loads and unloads on request (known once its list was read)."""
        return self.control is not None

    def enter(self, model: str) -> None:
        record = self._record(model)
        record.users += 1
        record.last_used = self.clock()

    def leave(self, model: str) -> None:
        record = self._record(model)
        record.users -= 1
        record.last_used = self.clock()

    async def ensure_loaded(self, model: ModelInfo, keepalive: Keepalive | None = None) -> float:
        """Return once the model is loaded (at once when it is); the seconds waited."""
        if not self.active:
            return 0.0
        record = self._record(model.id)
        if record.loading is None and record.unloading is None and self.is_loaded(model.id):
            return 0.0
        started = time.perf_counter()
        first = True
        while True:
            if record.unloading is not None:
                pending = record.unloading
            elif record.loading is not None:
                pending = record.loading
            elif record.loads_itself:
                return time.perf_counter() - started
            elif not self.is_loaded(model.id):
                pending = self._start(record, self._load(record), loading=True)
            else:
                return time.perf_counter() - started
            await self._wait(pending, keepalive, first)
            first = False

    async def _wait(
        self, pending: asyncio.Future[None], keepalive: Keepalive | None, now: bool
    ) -> None:
        """Wait for a load or unload without cancelling it when this caller goes away;
        the keep-alive at once, then every load_keepalive seconds."""
        if keepalive is not None and now:
            await keepalive()
        while True:
            done, _ = await asyncio.wait(
                {pending}, timeout=self.config.load_keepalive if keepalive else None
            )
            if done:
                break
            assert keepalive is not None
            await keepalive()
        exc = pending.exception()
        if isinstance(exc, ModelLoadFailed):
            raise exc.again() from exc.__cause__
        if exc is not None:
            raise exc

    def is_loaded(self, model: str) -> bool:
        listed = self.catalog.cached
        record = self._records.get(model)
        if record is not None and record.loaded is not None and record.seen is listed:
            return record.loaded
        info = listed.by_name.get(model) if listed is not None else None
        control = self.control
        return info is not None and control is not None and control.is_loaded(info)

    def set_ttl(self, model: str, ttl: float | None) -> None:
        """A request's idle ttl for the model (None: the settings')."""
        if ttl is not None:
            self._record(model).ttl = ttl

    # --- loading and unloading ---------------------------------------------

    def _start(
        self, record: ModelRecord, work: Awaitable[None], *, loading: bool
    ) -> asyncio.Future[None]:
        """The load or unload in a task of its own, which a waiter that goes away does
        not cancel for the others."""
        task = asyncio.ensure_future(work)
        if loading:
            record.loading = task
        else:
            record.unloading = task
        self._tasks.add(task)

        def done(task: asyncio.Future[None]) -> None:
            self._tasks.discard(task)
            if loading:
                record.loading = None
            else:
                record.unloading = None
            if not task.cancelled():
                task.exception()  # retrieved by the waiters; silences "never retrieved"

        task.add_done_callback(done)
        return task

    async def _load(self, record: ModelRecord) -> None:
        model = record.model
        control = self.control
        assert control is not None  # only called when active
        try:
            # Loaded meanwhile (by `lms load`, another client)? A second load would
            # start a second instance.
            listed = await self.catalog.refresh()
            info = listed.by_name.get(model)
            if info is not None and control.is_loading(info):
                await control.wait_loaded(self.upstream, model, self.catalog.refresh)
            if info is not None and (control.is_loading(info) or control.is_loaded(info)):
                record.loaded, record.seen = None, None
                return
            started = time.perf_counter()
            instance = await control.load(
                self.upstream,
                model,
                context_length=self.config.settings_for(model).context_length,
                ttl=self.ttl_of(model),
                read_list=self.catalog.refresh,
            )
        except LoadsItself as exc:
            log.info("model %s: %s; the upstream loads it on the first request", model, exc)
            record.loads_itself = True
            return
        except UpstreamError as exc:
            self.metrics.model_loads.labels(model, "failed").inc()
            reason = _reason(exc)
            log.warning("loading model %s failed: %s", model, reason)
            raise ModelLoadFailed(
                f"The upstream could not load the model {model}: {reason}", param="model"
            ) from exc
        seconds = time.perf_counter() - started
        self.metrics.model_loads.labels(model, "ok").inc()
        self.metrics.model_load_seconds.labels(model).observe(seconds)
        record.instance = instance or model
        record.loaded_by = "lmbridge"
        record.load_seconds = seconds
        record.last_used = self.clock()
        log.info("loaded model %s in %.1f s", model, seconds)
        await self._settle(record, loaded=True)

    async def _unload(self, record: ModelRecord, instances: list[str], reason: str) -> None:
        model = record.model
        control = self.control
        if control is None:
            raise LoadNotSupported(self._no_loads())
        try:
            await control.unload(self.upstream, model, instances, self.catalog.refresh)
        except UpstreamError as exc:
            log.warning("unloading model %s failed: %s", model, _reason(exc))
            raise
        self.metrics.model_unloads.labels(model, reason).inc()
        log.info("unloaded model %s (%s)", model, reason)
        record.loaded_by = record.instance = None
        record.ttl = None
        await self._settle(record, loaded=False)

    async def _settle(self, record: ModelRecord, *, loaded: bool) -> None:
        """Remember what was done over the list read now (which may have started before)."""
        record.loaded = loaded
        try:
            record.seen = await self.catalog.refresh()
        except UpstreamError:
            record.seen = self.catalog.cached

    async def load(self, model: ModelInfo, ttl: float | None = None) -> dict[str, Any]:
        """An admin load (``lmbridge load``): the model's state once loaded."""
        self._require_active()
        self.set_ttl(model.id, ttl)
        await self.ensure_loaded(model)
        return self.describe(model.id)

    async def unload(self, model: ModelInfo, reason: str = "admin") -> None:
        """Unload every instance of the model, whoever loaded it; waits for a load under
        way first."""
        self._require_active()
        record = self._record(model.id)
        while record.loading is not None or record.unloading is not None:
            pending = record.loading or record.unloading
            assert pending is not None
            await asyncio.wait({pending})
        listed = self.catalog.cached
        info = listed.by_name.get(model.id) if listed is not None else None
        instances = list(info.instances) if info is not None and info.instances else []
        if record.instance is not None and record.instance not in instances:
            instances.append(record.instance)
        if not self.is_loaded(model.id) or not instances:
            raise ModelNotLoaded(f"The model {model.id} is not loaded.", param="model")
        await asyncio.shield(
            self._start(record, self._unload(record, instances, reason), loading=False)
        )

    def _require_active(self) -> None:
        if not self.active:
            raise LoadNotSupported(self._no_loads())

    def _no_loads(self) -> str:
        return (
            f"The upstream at {self.upstream.shown_url} has no load endpoint lmbridge knows "
            "(lmbridge loads and unloads models through LM Studio 0.4's native API, "
            "llama.cpp's router mode and Ollama's API); it loads models itself, if at all."
        )

    # --- idle models --------------------------------------------------------

    def ttl_of(self, model: str) -> float | None:
        record = self._records.get(model)
        if record is not None and record.ttl is not None:
            return record.ttl
        return self.config.settings_for(model).ttl

    async def reap(self) -> list[str]:
        """Unload the models lmbridge loaded that nobody used for their ttl; the ids."""
        if not self.active:
            return []
        now = self.clock()
        unloaded = []
        for record in list(self._records.values()):
            ttl = self.ttl_of(record.model)
            if (
                record.loaded_by != "lmbridge"
                or record.users > 0
                or record.loading is not None
                or record.unloading is not None
                or ttl is None
                or now - record.last_used < ttl
                or not self.is_loaded(record.model)
            ):
                continue
            instances = [record.instance] if record.instance else [record.model]
            try:
                await asyncio.shield(
                    self._start(record, self._unload(record, instances, "ttl"), loading=False)
                )
            except UpstreamError:
                continue  # logged; tried again at the next pass
            unloaded.append(record.model)
        return unloaded

    async def reap_forever(self, interval: float = REAP_INTERVAL) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.reap()

    async def preload(self, names: Iterable[str]) -> None:
        """models.preload: each model loaded in turn; a failure logged, not raised."""
        for name in names:
            try:
                model = await self.catalog.resolve(name, "any")
                if not self.active:
                    log.warning("models.preload: the upstream has no load endpoint; not preloading")
                    return
                await self.ensure_loaded(model)
            except LMBridgeError as exc:
                log.warning("models.preload: %s could not be loaded: %s", name, exc.message)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))

    # --- what `lmbridge ps` shows ------------------------------------------

    def describe(self, model: str) -> dict[str, Any]:
        record = self._record(model)
        listed = self.catalog.cached
        info = listed.by_name.get(model) if listed is not None else None
        loaded = self.is_loaded(model)
        control = self.control
        # A load someone else started (llama.cpp's router lists it "loading").
        loading_there = info is not None and control is not None and control.is_loading(info)
        state = (
            "unloading"
            if record.unloading is not None
            else "loading"
            if record.loading is not None or loading_there
            else "loaded"
            if loaded
            else "not-loaded"
        )
        ttl = self.ttl_of(model)
        return {
            "model": model,
            "state": state,
            "loaded_by": (record.loaded_by or "upstream") if loaded else None,
            "instances": list(info.instances) if info is not None else [],
            "context_length": info.context_length if info is not None else None,
            "idle_seconds": round(self.clock() - record.last_used, 1)
            if record.last_used and not record.users
            else (0.0 if record.users else None),
            "ttl": None if ttl is None or math.isinf(ttl) else ttl,
            "load_seconds": None if record.load_seconds is None else round(record.load_seconds, 3),
        }

    def loaded(self) -> list[dict[str, Any]]:
        """Every model loaded, loading or unloading now."""
        listed = self.catalog.cached
        names = [m.id for m in listed.models] if listed is not None else []
        names += [n for n in self._records if n not in set(names)]
        entries = [self.describe(name) for name in names]
        return [e for e in entries if e["state"] != "not-loaded"]

    def loaded_counts(self) -> dict[str, int]:
        counts = {"lmbridge": 0, "upstream": 0}
        listed = self.catalog.cached
        for model in listed.models if listed is not None else ():
            if self.is_loaded(model.id):
                record = self._records.get(model.id)
                counts[record.loaded_by if record and record.loaded_by else "upstream"] += 1
        return counts

    def _record(self, model: str) -> ModelRecord:
        record = self._records.get(model)
        if record is None:
            record = self._records[model] = ModelRecord(model)
        return record


def request_ttl(body: dict[str, Any]) -> float | None:
    """A request's own idle ttl for its model: LM Studio's ``ttl`` (seconds) or Ollama's
    ``keep_alive`` (seconds or a duration such as "5m"; negative: for ever); None when it
    sets none (null counts as none). A 400 for a value that is neither."""
    if body.get("keep_alive") is not None:
        value = body["keep_alive"]
        if isinstance(value, str) and value.strip().startswith("-"):
            return math.inf
        if isinstance(value, int | float) and not isinstance(value, bool) and value < 0:
            return math.inf
        try:
            seconds = parse_duration(value)
        except ValueError:
            seconds = None
        if not isinstance(seconds, int | float) or isinstance(seconds, bool):
            raise BadRequest(
                "'keep_alive' must be seconds or a duration such as \"5m\".", param="keep_alive"
            )
        return float(seconds)
    if body.get("ttl") is not None:
        value = body["ttl"]
        if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
            raise BadRequest("'ttl' must be a positive number of seconds.", param="ttl")
        return float(value)
    return None


def _reason(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamStatus):
        return f"HTTP {exc.status}: {exc.message}"
    return exc.message
