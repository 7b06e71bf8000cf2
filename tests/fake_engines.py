"""llama.cpp's router mode and Ollama's model routes for the fake upstream, as
``tests/fake_lmstudio.py`` is LM Studio's: a scripted load time and failure, loads and
unloads counted.

``LlamaRouter``: ``GET /v1/models`` (and ``/models``) with a ``status`` object per model,
``POST /models/load`` (answers ``{"success": true}`` at once, the model reads
``loading`` until its load time has passed, then ``loaded``, or ``unloaded`` with
``failed`` and ``exit_code`` when the child is scripted to crash) and
``POST /models/unload``.

``OllamaModels``: ``GET /api/tags``, ``GET /api/ps`` and ``POST /api/generate`` without a
prompt (a load that answers once the model is in memory; ``keep_alive: 0`` unloads).

A chat request for a model that is not loaded is served as both servers would (they
load it themselves) and counted apart (``jit_loads``), so that a test proves lmbridge
loaded the model before it asked.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from aiohttp import web


class LlamaRouter:
    def __init__(
        self,
        models: list[str],
        *,
        loaded: tuple[str, ...] = (),
        load_time: float = 0.0,
        unload_time: float = 0.0,
    ) -> None:
        self.names = list(models)
        self.load_time = load_time
        # An unloaded child takes this long to exit: "loaded" until then.
        self.unload_time = unload_time
        self._stopping: dict[str, float] = {}
        # Per model: "unloaded", "loaded", or the time its load started.
        self.states: dict[str, str | float] = {
            m: "loaded" if m in loaded else "unloaded" for m in models
        }
        self.exit_codes: dict[str, int] = {}
        # Set to (status, body) to answer the next load calls with that error.
        self.fail: tuple[int, Any] | None = None
        # Set to an exit code: the next loads' children die before they are ready.
        self.crash: int | None = None
        self._crashing: set[str] = set()
        self.loads: list[dict[str, Any]] = []
        self.unloads: list[str] = []
        self.jit_loads: list[str] = []

    def status(self, name: str) -> str:
        stopping = self._stopping.get(name)
        if stopping is not None:
            if time.monotonic() - stopping < self.unload_time:
                return "loaded"
            del self._stopping[name]
            self.states[name] = "unloaded"
        state = self.states[name]
        if isinstance(state, float):  # loading: done once its time has passed
            if time.monotonic() - state < self.load_time:
                return "loading"
            if name in self._crashing:
                self._crashing.discard(name)
                self.exit_codes[name] = self.crash or 1
                state = "unloaded"
            else:
                state = "loaded"
            self.states[name] = state
        return state

    def is_loaded(self, name: str) -> bool:
        return self.status(name) == "loaded"

    def listing(self) -> dict[str, Any]:
        data = []
        for name in self.names:
            value = self.status(name)
            status: dict[str, Any] = {"value": value, "args": ["llama-server", "--port", "0"]}
            if value == "unloaded" and self.exit_codes.get(name):
                status.update(failed=True, exit_code=self.exit_codes[name])
            data.append(
                {
                    "id": name,
                    "aliases": [],
                    "tags": [],
                    "object": "model",
                    "owned_by": "llamacpp",
                    "created": 0,
                    "status": status,
                    "architecture": {"input_modalities": ["text"], "output_modalities": ["text"]},
                }
            )
        return {"data": data, "object": "list"}

    def jit(self, name: Any) -> None:
        """A chat for a model not running: the router would load it on the spot."""
        if isinstance(name, str) and name in self.states and self.status(name) == "unloaded":
            self.jit_loads.append(name)
            self.states[name] = "loaded"

    async def load(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.loads.append(body)
        if self.fail is not None:
            status, error = self.fail
            return web.json_response(error, status=status)
        name = body.get("model")
        if name not in self.states:
            return _router_error(404, "model is not found", "not_found_error")
        if self.status(name) in ("loading", "loaded", "sleeping"):
            return _router_error(400, "model is already running", "invalid_request_error")
        self.exit_codes.pop(name, None)
        self.states[name] = time.monotonic()
        if self.crash is not None:
            self._crashing.add(name)
        return web.json_response({"success": True})

    async def unload(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        name = body.get("model")
        if name not in self.states:
            return _router_error(400, "model is not found", "invalid_request_error")
        if self.status(name) not in ("loading", "loaded", "sleeping"):
            return _router_error(400, "model is not running", "invalid_request_error")
        self.status(name)
        self._stopping[name] = time.monotonic()
        self.unloads.append(name)
        return web.json_response({"success": True})


def _router_error(status: int, message: str, kind: str) -> web.Response:
    return web.json_response(
        {"error": {"code": status, "message": message, "type": kind}}, status=status
    )


class OllamaModels:
    def __init__(
        self,
        models: list[str],
        *,
        loaded: tuple[str, ...] = (),
        load_time: float = 0.0,
        embedding: tuple[str, ...] = (),
    ) -> None:
        self.names = [*models, *embedding]
        # Embedding models: /api/generate refuses them, a request loads them.
        self.embedding = set(embedding)
        self.load_time = load_time
        # The loaded models and the keep_alive they were loaded with (None: the default).
        self.running: dict[str, Any] = dict.fromkeys(loaded)
        # Set to (status, body) to make the next loads fail.
        self.fail: tuple[int, Any] | None = None
        self.loads: list[dict[str, Any]] = []
        self.unloads: list[str] = []
        self.jit_loads: list[str] = []
        self.loading = 0
        self.most_loading = 0

    def is_loaded(self, name: str) -> bool:
        return name in self.running

    def tags(self) -> dict[str, Any]:
        return {"models": [self._entry(name) for name in self.names]}

    def ps(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    **self._entry(name),
                    "expires_at": "2318-08-22T03:52:15.000000000Z",
                    "size_vram": 0,
                    "context_length": 4096,
                }
                for name in self.running
            ]
        }

    @staticmethod
    def _entry(name: str) -> dict[str, Any]:
        return {
            "name": name,
            "model": name,
            "modified_at": "2026-01-01T00:00:00Z",
            "size": 1000,
            "digest": "0" * 64,
            "details": {"format": "gguf", "family": "llama", "parameter_size": "1B"},
        }

    def jit(self, name: Any) -> None:
        if isinstance(name, str) and name in self.names and name not in self.running:
            self.jit_loads.append(name)
            self.running[name] = None

    async def generate(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        name = body.get("model")
        if body.get("prompt"):
            return web.json_response({"error": "the fake answers loads only"}, status=400)
        answer = {"model": name, "created_at": "2026-01-01T00:00:00Z", "response": "", "done": True}
        if body.get("keep_alive") == 0:
            if name in self.running:
                del self.running[name]
                self.unloads.append(name)
            return web.json_response({**answer, "done_reason": "unload"})
        self.loads.append(body)
        if name in self.embedding:
            return web.json_response({"error": f'"{name}" does not support generate'}, status=400)
        self.loading += 1
        self.most_loading = max(self.most_loading, self.loading)
        try:
            if self.load_time:
                await asyncio.sleep(self.load_time)
        finally:
            self.loading -= 1
        if self.fail is not None:
            status, error = self.fail
            return web.json_response(error, status=status)
        if name not in self.names:
            return web.json_response(
                {"error": f"model '{name}' not found, try pulling it first"}, status=404
            )
        self.running[name] = body.get("keep_alive")
        return web.json_response({**answer, "done_reason": "load"})
