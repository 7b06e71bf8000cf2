"""How each kind of server loads and unloads models: the one small interface that
``ModelLifecycle`` (single flight, ttl, reaper) drives the same way for all of them,
chosen from the dialect the catalog read the model list in (``control_for``).

- LM Studio 0.4+ (``lmstudio-v1``): ``POST /api/v1/models/load {model, context_length?}``
  answers once the model is loaded, with its ``instance_id``; ``POST
  /api/v1/models/unload {instance_id}`` per instance.
- llama.cpp's router mode (``llamacpp-router``): ``POST /models/load {model}`` answers
  ``{"success": true}`` as soon as the model's child process is started, so the list
  (``status.value``) is read again until it says ``loaded`` (or the child failed),
  bounded by the upstream's ``first_byte_timeout``; ``POST /models/unload {model}``.
- Ollama (``ollama``): ``POST /api/generate {model, keep_alive?}`` with no prompt loads
  the model and answers when it is in memory; the same with ``keep_alive: 0`` unloads it.

A failure is an ``UpstreamError`` (an ``UpstreamStatus`` for an error answer), which the
lifecycle turns into the ``model_load_failed`` every waiter gets; ``LoadsItself`` says the
server cannot be asked to load that model (an Ollama embedding model, which
``/api/generate`` refuses), so requests pass and the server loads it as it would
without lmbridge.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from proxy.errors import UpstreamError, UpstreamStatus
from proxy.model_records import Dialect, ModelInfo, ModelList
from proxy.upstream import UpstreamClient

ReadList = Callable[[], Awaitable[ModelList]]

# How often the list is read while a model loads (llama.cpp's router) or unloads:
# quickly at first (small models load in well under a second), then once a second.
FIRST_POLL = 0.05
LONGEST_POLL = 1.0
# Longest lmbridge waits for an unloaded model to leave the list (llama.cpp's router
# gives a child 10 s to exit by default); past it the unload counts as done.
UNLOAD_WAIT = 15.0


class LoadsItself(Exception):
    """The server cannot be asked to load this model; a request to it loads it."""


class ModelControl:
    """One kind of server's load and unload calls, and what "loaded" means on it."""

    name = ""

    def is_loaded(self, info: ModelInfo) -> bool:
        return info.state == "loaded"

    def is_loading(self, info: ModelInfo) -> bool:
        """A load under way that someone else started (lmbridge waits for it)."""
        return False

    async def load(
        self,
        upstream: UpstreamClient,
        model: str,
        *,
        context_length: int | None,
        ttl: float | None,
        read_list: ReadList,
    ) -> str | None:
        """Load the model and return once it can serve; the instance id when the server
        names one."""
        raise NotImplementedError

    async def wait_loaded(self, upstream: UpstreamClient, model: str, read_list: ReadList) -> None:
        """Return once a load under way (``is_loading``) is done."""

    async def unload(
        self, upstream: UpstreamClient, model: str, instances: list[str], read_list: ReadList
    ) -> None:
        """Unload the model; return once the list no longer shows it loaded."""
        raise NotImplementedError

    async def _until_gone(self, model: str, read_list: ReadList) -> None:
        """Servers that answer an unload before the model is gone: read the list until
        it no longer shows the model loaded, for at most UNLOAD_WAIT seconds."""
        deadline = time.monotonic() + UNLOAD_WAIT
        pause = FIRST_POLL
        while time.monotonic() < deadline:
            info = (await read_list()).by_name.get(model)
            if info is None or not (self.is_loaded(info) or self.is_loading(info)):
                return
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_POLL)


class LMStudioControl(ModelControl):
    name = "LM Studio"
    LOAD = "/api/v1/models/load"
    UNLOAD = "/api/v1/models/unload"

    async def load(
        self,
        upstream: UpstreamClient,
        model: str,
        *,
        context_length: int | None,
        ttl: float | None,
        read_list: ReadList,
    ) -> str | None:
        body: dict[str, Any] = {"model": model}
        if context_length is not None:
            body["context_length"] = context_length
        answer = await upstream.post_json(self.LOAD, body, route=self.LOAD)
        instance = answer.get("instance_id") if isinstance(answer, dict) else None
        return instance if isinstance(instance, str) else None

    async def unload(
        self, upstream: UpstreamClient, model: str, instances: list[str], read_list: ReadList
    ) -> None:
        for instance in instances:
            await upstream.post_json(self.UNLOAD, {"instance_id": instance}, route=self.UNLOAD)


class LlamaRouterControl(ModelControl):
    name = "llama.cpp's router"
    LOAD = "/models/load"
    UNLOAD = "/models/unload"

    def is_loaded(self, info: ModelInfo) -> bool:
        # A sleeping child still runs: the next request wakes it.
        return info.status in ("loaded", "sleeping")

    def is_loading(self, info: ModelInfo) -> bool:
        return info.status == "loading"

    async def load(
        self,
        upstream: UpstreamClient,
        model: str,
        *,
        context_length: int | None,
        ttl: float | None,
        read_list: ReadList,
    ) -> str | None:
        try:
            await upstream.post_json(self.LOAD, {"model": model}, route=self.LOAD)
        except UpstreamStatus as exc:
            # "model is already running": someone else's load began since the list was read.
            info = (await read_list()).by_name.get(model)
            if (
                exc.status != 400
                or info is None
                or not (self.is_loading(info) or self.is_loaded(info))
            ):
                raise
        await self.wait_loaded(upstream, model, read_list)
        return model

    async def wait_loaded(self, upstream: UpstreamClient, model: str, read_list: ReadList) -> None:
        limit = upstream.config.first_byte_timeout
        deadline = time.monotonic() + limit
        pause = FIRST_POLL
        fresh = False
        while True:
            info = (await read_list()).by_name.get(model)
            if info is None:
                raise UpstreamError("the model is no longer listed by llama.cpp's router")
            if self.is_loaded(info):
                return
            if not self.is_loading(info) and not fresh and info.status != "failed":
                # The first read may have begun before the load call (reads are shared):
                # the next one begins after it.
                fresh = True
                continue
            if not self.is_loading(info):
                raise UpstreamError(
                    info.load_error or f"the router reports the model {info.status or 'unloaded'}"
                )
            if time.monotonic() >= deadline:
                raise UpstreamError(
                    f"the model was not ready after {limit:g}s (upstream.first_byte_timeout)"
                )
            await asyncio.sleep(pause)
            pause = min(pause * 2, LONGEST_POLL)

    async def unload(
        self, upstream: UpstreamClient, model: str, instances: list[str], read_list: ReadList
    ) -> None:
        # The router answers at once; the child is given time to exit.
        await upstream.post_json(self.UNLOAD, {"model": model}, route=self.UNLOAD)
        await self._until_gone(model, read_list)


class OllamaControl(ModelControl):
    name = "Ollama"
    GENERATE = "/api/generate"

    async def load(
        self,
        upstream: UpstreamClient,
        model: str,
        *,
        context_length: int | None,
        ttl: float | None,
        read_list: ReadList,
    ) -> str | None:
        body: dict[str, Any] = {"model": model}
        # With a ttl lmbridge unloads the model itself: Ollama keeps it for ever (-1)
        # rather than unloading it after its own default of 5 minutes. Without one,
        # Ollama's own keep_alive applies, as it would without lmbridge (docs/models.md).
        if ttl is not None:
            body["keep_alive"] = -1
        try:
            await upstream.post_json(self.GENERATE, body, route=self.GENERATE)
        except UpstreamStatus as exc:
            # '"nomic-embed-text" does not support generate': an embedding model.
            if exc.status == 400 and "does not support generate" in exc.message:
                raise LoadsItself("Ollama loads embedding models only for a request") from exc
            raise
        return model

    async def unload(
        self, upstream: UpstreamClient, model: str, instances: list[str], read_list: ReadList
    ) -> None:
        await upstream.post_json(
            self.GENERATE, {"model": model, "keep_alive": 0}, route=self.GENERATE
        )
        await self._until_gone(model, read_list)


_CONTROLS: dict[Dialect, ModelControl] = {
    "lmstudio-v1": LMStudioControl(),
    "llamacpp-router": LlamaRouterControl(),
    "ollama": OllamaControl(),
}
# The model list dialects of upstreams that load and unload on request.
LOADING_DIALECTS = frozenset(_CONTROLS)


def control_for(dialect: Dialect | None) -> ModelControl | None:
    return _CONTROLS.get(dialect) if dialect is not None else None
