"""LM Studio 0.4's native model routes for the fake upstream: ``GET /api/v1/models``
with ``loaded_instances``, ``POST /api/v1/models/load`` (a scripted load time and
failure; loads counted) and ``POST /api/v1/models/unload``.

A chat request for a model that is not loaded is served as LM Studio's JIT loading
would, and counted apart (``jit_loads``), so that a test proves lmbridge loaded the
model itself before it asked.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


class NativeModels:
    def __init__(
        self,
        models: list[str],
        *,
        loaded: tuple[str, ...] = (),
        load_time: float = 0.0,
        context_length: int = 4096,
    ) -> None:
        self.keys = list(models)
        self.instances: dict[str, list[str]] = {key: [key] for key in loaded}
        self.load_time = load_time
        self.context_length = context_length
        # Set to (status, body) to make the next loads fail.
        self.fail: tuple[int, Any] | None = None
        self.loads: list[dict[str, Any]] = []  # bodies of the load requests, in order
        self.unloads: list[str] = []  # instance ids unloaded, in order
        self.jit_loads: list[str] = []
        self.loading = 0  # loads under way now
        self.most_loading = 0  # the most loads ever under way at once

    def listing(self) -> dict[str, Any]:
        return {
            "models": [
                {
                    "type": "llm",
                    "key": key,
                    "display_name": key,
                    "publisher": "fake",
                    "max_context_length": 32768,
                    "capabilities": {"vision": False, "trained_for_tool_use": True},
                    "loaded_instances": [
                        {"id": instance, "config": {"context_length": self.context_length}}
                        for instance in self.instances.get(key, [])
                    ],
                }
                for key in self.keys
            ]
        }

    def is_loaded(self, key: str) -> bool:
        return bool(self.instances.get(key))

    def jit(self, key: Any) -> None:
        """A chat for a model not loaded: LM Studio would load it on the spot."""
        if isinstance(key, str) and key in self.keys and not self.is_loaded(key):
            self.jit_loads.append(key)
            self.instances[key] = [key]

    async def load(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        self.loads.append(body)
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
        key = body.get("model")
        if key not in self.keys:
            return web.json_response({"error": f"Model not found: {key}"}, status=404)
        instances = self.instances.setdefault(key, [])
        # A second load of a loaded model starts another instance, as LM Studio does.
        instance = key if not instances else f"{key}:{len(instances) + 1}"
        instances.append(instance)
        return web.json_response(
            {
                "type": "llm",
                "instance_id": instance,
                "load_time_seconds": self.load_time,
                "status": "loaded",
            }
        )

    async def unload(self, request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        instance = body.get("instance_id")
        for instances in self.instances.values():
            if instance in instances:
                instances.remove(instance)
                self.unloads.append(instance)
                return web.json_response({"instance_id": instance})
        return web.json_response({"error": f"No loaded instance {instance}"}, status=404)
