"""The upstream's models: read, cached, and used to resolve the model of a request.

``ModelCatalog`` reads the list from the upstream (LM Studio's native lists
when it is LM Studio, ``/v1/models`` otherwise), keeps it for
``models.cache_ttl`` seconds, and refreshes it single-flight: however many
requests wait, one upstream call is made. Resolution (aliases, default model,
"the one loaded model") is pure and costs no upstream round trip while the
cache is fresh.

The parsing functions at the bottom turn each server's list into ``ModelInfo``
records and do no I/O.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from proxy.config import ModelsConfig
from proxy.errors import (
    CircuitOpen,
    ModelNotFound,
    ModelRequired,
    UpstreamError,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.model_records import (
    Dialect,
    ModelInfo,
    ModelList,
    Purpose,
    int_or_none,
    is_router_list,
    parse_llamacpp_router,
    parse_lmstudio_v0,
    parse_lmstudio_v1,
    parse_ollama,
    parse_openai,
    template_renders_tools,
)
from proxy.profiles import ModelProfile, profile_for, template_traits

log = logging.getLogger("lmbridge.models")


# After a miss, how soon the list may be read again: a typo repeated in a
# loop must not turn into one upstream call per request.
MISS_REFRESH_INTERVAL = 2.0


class ModelCatalog:
    def __init__(
        self,
        config: ModelsConfig,
        fetch: Callable[[], Awaitable[ModelList]],
        *,
        clock: Callable[[], float] = time.monotonic,
        on_refresh: Callable[[str], None] | None = None,
    ) -> None:
        self.config = config
        self._fetch = fetch
        self._clock = clock
        self._on_refresh = on_refresh
        self._current: ModelList | None = None
        self._refreshing: asyncio.Future[ModelList] | None = None
        self._tools_warned: set[str] = set()
        # Profiles by model record: a record changes only when the list is read again.
        self._profiles: dict[ModelInfo, ModelProfile] = {}

    @property
    def cached(self) -> ModelList | None:
        return self._current

    async def get(self, *, max_age: float | None = None) -> ModelList:
        """The model list, read from the upstream when older than ``max_age`` (default TTL)."""
        max_age = self.config.cache_ttl if max_age is None else max_age
        current = self._current
        if current is not None and self._clock() - current.fetched_at < max_age:
            return current
        return await self.refresh()

    async def refresh(self) -> ModelList:
        """Read the list now; concurrent callers share one upstream call.

        The read runs in its own task so that a caller that goes away (client
        disconnected) does not cancel it for the others.
        """
        task = self._refreshing
        if task is None:
            task = asyncio.ensure_future(self._read())
            self._refreshing = task
            task.add_done_callback(self._read_done)
        return await asyncio.shield(task)

    async def _read(self) -> ModelList:
        try:
            result = await self._fetch()
        except Exception:
            self._count("error")
            raise
        self._count("ok")
        self._current = result
        return result

    def _read_done(self, task: asyncio.Future[ModelList]) -> None:
        self._refreshing = None
        if not task.cancelled():
            task.exception()  # retrieved by the waiters; silences "never retrieved"

    def _count(self, outcome: str) -> None:
        if self._on_refresh is not None:
            self._on_refresh(outcome)

    def profile(self, model: ModelInfo) -> ModelProfile:
        """What lmbridge normalises for the model: detected, then its settings (worked out
        once per model record: 10 µs on every chat request otherwise)."""
        found = self._profiles.get(model)
        if found is None:
            if len(self._profiles) > 4096:  # records of lists read long ago
                self._profiles.clear()
            found = self._profiles[model] = profile_for(model, self.config.settings_for(model.id))
        return found

    def described(self, model: ModelInfo) -> dict[str, Any]:
        """The model as ``/v1/models`` lists it, a chat model with its profile."""
        entry = model.as_openai()
        if model.serves("chat"):
            entry["profile"] = self.profile(model).as_json()
        return entry

    def tools_warning(self, model: ModelInfo) -> str | None:
        """For a request that offers tools: the warning for the client when the model
        cannot see them, logged once per model."""
        note = model.tools_note()
        if note is not None and model.id not in self._tools_warned:
            self._tools_warned.add(model.id)
            log.warning("%s (warned once per model; see docs/compatibility.md)", note)
        return note

    async def resolve(self, requested: Any, purpose: Purpose = "chat") -> ModelInfo:
        """The upstream model a request should go to, or a 400/404 error that says why."""
        models = await self.get()
        if requested is not None and requested != "":
            found, models = await self._lookup(requested, models)
            if found is None:
                name = self.config.aliases.get(requested, requested)
                raise ModelNotFound(_not_found_message(requested, name, models), param="model")
            return found
        default = self.config.default
        if default is not None:
            found, models = await self._lookup(default, models)
            if found is None:
                raise ModelNotFound(
                    f"The configured default model {default!r} (models.default) is not "
                    f"available upstream. Available models: {_listing(models)}.",
                    param="model",
                )
            if found.serves(purpose):
                return found
            # e.g. an embeddings request while the default is a chat model
        return self.pick_default(models, purpose)

    async def _lookup(
        self, requested: str, models: ModelList
    ) -> tuple[ModelInfo | None, ModelList]:
        name = self.config.aliases.get(requested, requested)
        found = models.by_name.get(name)
        if found is None and self._clock() - models.fetched_at >= MISS_REFRESH_INTERVAL:
            # The user may just have downloaded or loaded it.
            models = await self.refresh()
            found = models.by_name.get(name)
        return found, models

    @staticmethod
    def pick_default(models: ModelList, purpose: Purpose) -> ModelInfo:
        """The model to use when none is named: the one loaded model that can serve the
        purpose, else the one candidate; otherwise a 400 listing the choices."""
        candidates = [m for m in models.models if m.serves(purpose)]
        loaded = [m for m in candidates if m.state == "loaded"]
        if len(loaded) == 1:
            return loaded[0]
        if not loaded and len(candidates) == 1:
            return candidates[0]
        choices = loaded or candidates
        if not choices:
            raise ModelRequired(
                "The request names no model and the upstream lists none that could serve it. "
                "Load a model upstream (e.g. `lms load <model>`) or set models.default.",
                param="model",
            )
        which = "loaded models" if loaded else "models"
        raise ModelRequired(
            f"The request names no model and the upstream has {len(choices)} {which}; "
            f"say which one with `model`: {', '.join(m.id for m in choices)}. "
            "(Or set models.default in lmbridge's configuration.)",
            param="model",
        )


def _listing(models: ModelList) -> str:
    ids = models.ids()
    if not ids:
        return "none (load or download one upstream)"
    shown = ", ".join(ids[:50])
    return shown + (f" and {len(ids) - 50} more" if len(ids) > 50 else "")


def _not_found_message(requested: Any, name: str, models: ModelList) -> str:
    via = f" (alias of {name!r})" if name != requested else ""
    return (
        f"The model {requested!r}{via} does not exist upstream. "
        f"Available models: {_listing(models)}."
    )


# --- reading the list from the upstream -----------------------------------


class ModelListReader:
    """Reads the list in the richest dialect the upstream speaks, and remembers it.

    Tried in order: LM Studio 0.4+ (``/api/v1/models``), LM Studio 0.3.6+
    (``/api/v0/models``), Ollama (``/api/tags``, then ``/api/ps`` for what is loaded),
    then any OpenAI-compatible server (``/v1/models``), which is llama.cpp's router when
    its entries carry a ``status``. The dialect that worked is tried first next time, so
    a steady state costs one upstream call per refresh (two on Ollama). ``kind``
    (upstream.kind) narrows the dialects: LM Studio's lists for lmstudio and auto,
    Ollama's for ollama and auto, the router's for llamacpp and auto, ``/props`` (a
    llama.cpp server of one model) for llamacpp always.
    """

    def __init__(
        self,
        get_json: Callable[[str], Awaitable[Any]],
        clock: Callable[[], float] = time.monotonic,
        *,
        kind: str = "auto",
    ) -> None:
        self._get_json = get_json
        self._clock = clock
        self._native = kind in ("auto", "lmstudio")
        self._ollama = kind in ("auto", "ollama")
        self._router = kind in ("auto", "llamacpp")
        self._llamacpp = kind == "llamacpp"
        self.dialect: Dialect | None = None

    def _order(self) -> list[Dialect]:
        order: list[Dialect] = []
        if self._native:
            order += ["lmstudio-v1", "lmstudio-v0"]
        if self._ollama:
            order.append("ollama")
        order.append("openai")  # read as the router's list when it is one
        remembered = "openai" if self.dialect == "llamacpp-router" else self.dialect
        if remembered in order:
            order.remove(remembered)
            order.insert(0, remembered)
        return order

    async def read(self) -> ModelList:
        last_error: UpstreamError | None = None
        for candidate in self._order():
            try:
                dialect, parsed = await self._read_one(candidate)
            except (UpstreamUnavailable, UpstreamTimeout, CircuitOpen):
                raise  # the upstream is down: no other path will answer
            except UpstreamError as exc:
                # 404/401 or a non-JSON page on a native path: not this kind of server.
                last_error = exc
                continue
            if parsed is None:
                last_error = UpstreamError(
                    f"The upstream answered {_DIALECT_PATHS[candidate]} with a model list "
                    "lmbridge cannot read."
                )
                continue
            self.dialect = dialect
            return ModelList.build(parsed, dialect, self._clock())
        assert last_error is not None
        raise last_error

    async def _read_one(self, candidate: Dialect) -> tuple[Dialect, list[ModelInfo] | None]:
        data = await self._get_json(_DIALECT_PATHS[candidate])
        if candidate == "ollama":
            if parse_ollama(data, None) is None:
                return candidate, None
            try:
                running = await self._get_json("/api/ps")
            except (UpstreamUnavailable, UpstreamTimeout, CircuitOpen):
                raise
            except UpstreamError:
                running = None  # what is loaded is unknown, the models are not
            return candidate, parse_ollama(data, running)
        if candidate == "openai" and self._router and is_router_list(data):
            return "llamacpp-router", parse_llamacpp_router(data)
        parsed = _DIALECT_PARSERS[candidate](data)
        if candidate == "openai" and parsed is not None:
            parsed = await self._with_props(parsed)
        return candidate, parsed

    async def _with_props(self, models: list[ModelInfo]) -> list[ModelInfo]:
        """A llama.cpp server of one model says in ``/props`` whether its chat template
        renders tools and how many requests it runs at once; other servers have no such
        page (and are not asked)."""
        if len(models) != 1 or not (self._llamacpp or models[0].owned_by == "llamacpp"):
            return models
        try:
            props = await self._get_json("/props")
        except (UpstreamUnavailable, UpstreamTimeout, CircuitOpen):
            raise
        except UpstreamError:
            return models
        tools = template_renders_tools(props)
        slots = int_or_none(props.get("total_slots")) if isinstance(props, dict) else None
        template = template_traits(props.get("chat_template")) if isinstance(props, dict) else None
        return [replace(models[0], tools=tools, parallel=slots, template=template)]


_DIALECT_PATHS: dict[Dialect, str] = {
    "lmstudio-v1": "/api/v1/models",
    "lmstudio-v0": "/api/v0/models",
    "ollama": "/api/tags",
    "llamacpp-router": "/v1/models",
    "openai": "/v1/models",
}
_DIALECT_PARSERS: dict[Dialect, Callable[[Any], list[ModelInfo] | None]] = {
    "lmstudio-v1": parse_lmstudio_v1,
    "lmstudio-v0": parse_lmstudio_v0,
    "llamacpp-router": parse_llamacpp_router,
    "openai": parse_openai,
}
