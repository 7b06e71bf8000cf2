"""A scripted fake upstream: an aiohttp app that answers like a local model server.

Tests queue replies per path with ``add_reply(path, Reply(...))``; unscripted
requests get a default answer (a 404 on a path a model server would not serve).
Every request is recorded (method, path, query, headers, JSON body or raw bytes)
so tests can assert what the upstream received. Replies can stream, stall, cut
the connection and fail on demand.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tests.fake_engines import LlamaRouter, OllamaModels
from tests.fake_lmstudio import NativeModels

CHAT = "/v1/chat/completions"


@dataclass
class Reply:
    status: int = 200
    json: Any = None
    body: bytes | None = None
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    # SSE: each item is a dict (sent as one data event), raw bytes, a float (a pause)
    # or an asyncio.Event (wait until the test sets it).
    stream: list[Any] | None = None
    done: bool = True  # end a stream with data: [DONE]
    delay: float = 0.0  # before the headers
    hold: asyncio.Event | None = None  # before the headers, until the test sets it
    cut: bool = False  # after the stream items, drop the connection (no [DONE], no EOF)
    stall: bool = False  # after the stream items, send nothing more until cancelled
    drop: bool = False  # close the connection without any answer


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    query: str = ""
    raw: bytes = b""


def chat_completion(content: str = "Hello!", model: str = "test-model", **extra: Any) -> dict:
    body = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": content},
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
    }
    body.update(extra)
    return body


def chunk(
    content: str | None = None,
    *,
    finish: str | None = None,
    role: str | None = None,
    model: str = "test-model",
    tool_calls: list[dict] | None = None,
    usage: dict | None = None,
    choices: bool = True,
) -> dict:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = role
    if content is not None:
        delta["content"] = content
    if tool_calls is not None:
        delta["tool_calls"] = tool_calls
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def text_stream(*parts: str, usage: bool = False) -> list[Any]:
    events: list[Any] = [chunk(role="assistant", content="")]
    events += [chunk(p) for p in parts]
    events.append(chunk(finish="stop"))
    if usage:
        events.append(
            chunk(
                choices=False,
                usage={
                    "prompt_tokens": 5,
                    "completion_tokens": len(parts),
                    "total_tokens": 5 + len(parts),
                },
            )
        )
    return events


class FakeUpstream:
    def __init__(self, models: list[str] | None = None) -> None:
        self.models = models if models is not None else ["test-model"]
        # Set to a dict to answer LM Studio's native lists.
        self.lmstudio_v1: dict | None = None
        self.lmstudio_v0: dict | None = None
        # Set (``native_lmstudio``) to answer like LM Studio 0.4, loads and unloads included.
        self.native: NativeModels | None = None
        # Set to a dict to answer like llama.cpp: /v1/models owned by "llamacpp", /props.
        self.llama_props: dict | None = None
        # Set (``llama_router``, ``ollama``) to answer like llama.cpp's router mode or
        # Ollama, loads and unloads included.
        self.router: LlamaRouter | None = None
        self.ollama_models: OllamaModels | None = None
        self.replies: dict[str, deque[Reply]] = defaultdict(deque)
        self.seen: list[Seen] = []
        self.cancelled = asyncio.Event()  # set when a client went away mid-reply
        self.url = ""

    # --- scripting --------------------------------------------------------

    def add_reply(self, path: str, reply: Reply, times: int = 1) -> None:
        for _ in range(times):
            self.replies[path].append(reply)

    def native_lmstudio(self, models: list[str], **options: Any) -> NativeModels:
        """Answer LM Studio 0.4's native routes for these models (none loaded unless
        ``loaded`` says so)."""
        self.native = NativeModels(models, **options)
        return self.native

    def llama_router(self, models: list[str], **options: Any) -> LlamaRouter:
        """Answer like llama.cpp's router mode for these models (none loaded unless
        ``loaded`` says so)."""
        self.router = LlamaRouter(models, **options)
        return self.router

    def ollama(self, models: list[str], **options: Any) -> OllamaModels:
        """Answer Ollama's native routes for these models (none loaded unless ``loaded``
        says so)."""
        self.ollama_models = OllamaModels(models, **options)
        return self.ollama_models

    def requests_to(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    # --- the app ----------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(client_max_size=200 * 2**20)  # large-request tests
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/api/v0/models", self._lmstudio_v0)
        app.router.add_get("/api/v1/models", self._lmstudio_v1)
        app.router.add_route("*", "/props", self._props)
        app.router.add_post("/api/v1/models/load", self._native_load)
        app.router.add_post("/api/v1/models/unload", self._native_unload)
        app.router.add_get("/models", self._models)
        app.router.add_post("/models/load", self._engine_call)
        app.router.add_post("/models/unload", self._engine_call)
        app.router.add_get("/api/tags", self._engine_call)
        app.router.add_get("/api/ps", self._engine_call)
        app.router.add_post("/api/generate", self._engine_call)
        app.router.add_post("/v1/{tail:.*}", self._post)
        app.router.add_route("*", "/{tail:.*}", self._other)
        return app

    async def _models(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        scripted = self.replies.get("/v1/models")
        if scripted:
            return await self._answer(request, scripted.popleft())
        if self.router is not None:
            return web.json_response(self.router.listing())
        owner = "fake" if self.llama_props is None else "llamacpp"
        data = [{"id": m, "object": "model", "owned_by": owner} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _props(self, request: web.Request) -> web.StreamResponse:
        if request.method != "GET" or self.replies.get("/props"):
            return await self._other(request)
        self._record(request, None, b"")
        if self.llama_props is None:
            return web.json_response({"error": "Not Found"}, status=404)
        return web.json_response(self.llama_props)

    async def _lmstudio_v0(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        if self.lmstudio_v0 is None:
            return web.json_response({"error": "Unexpected endpoint or method."}, status=404)
        return web.json_response(self.lmstudio_v0)

    async def _native_load(self, request: web.Request) -> web.StreamResponse:
        if self.native is None:
            return await self._other(request)
        self._record(request, None)
        return await self.native.load(request)

    async def _native_unload(self, request: web.Request) -> web.StreamResponse:
        if self.native is None:
            return await self._other(request)
        self._record(request, None)
        return await self.native.unload(request)

    async def _engine_call(self, request: web.Request) -> web.StreamResponse:
        """llama.cpp's router's and Ollama's model routes, when the test set them up."""
        router, ollama = self.router, self.ollama_models
        handlers: dict[str, Any] = {}
        if router is not None:
            handlers.update({"/models/load": router.load, "/models/unload": router.unload})
        if ollama is not None:
            handlers["/api/generate"] = ollama.generate
        handler = handlers.get(request.path)
        if handler is not None:
            self._record(request, None)
            return await handler(request)
        if ollama is not None and request.path in ("/api/tags", "/api/ps"):
            self._record(request, None)
            listing = ollama.tags() if request.path == "/api/tags" else ollama.ps()
            return web.json_response(listing)
        return await self._other(request)

    async def _lmstudio_v1(self, request: web.Request) -> web.StreamResponse:
        self._record(request, None)
        if self.native is not None:
            return web.json_response(self.native.listing())
        if self.lmstudio_v1 is None:
            return web.json_response({"error": "Unexpected endpoint or method."}, status=404)
        return web.json_response(self.lmstudio_v1)

    def _record(self, request: web.Request, body: Any, raw: bytes = b"") -> None:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.headers),
                body,
                request.rel_url.raw_query_string,
                raw,
            )
        )

    async def _read(self, request: web.Request) -> Any:
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        self._record(request, body, raw)
        return body

    async def _other(self, request: web.Request) -> web.StreamResponse:
        """Any other method and path: what a test scripted, else llama.cpp's 404."""
        await self._read(request)
        queue = self.replies.get(request.path)
        if queue:
            return await self._answer(request, queue.popleft())
        error = {"message": "File Not Found", "type": "not_found_error", "code": 404}
        return web.json_response({"error": error}, status=404)

    async def _post(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if isinstance(body, dict):
            for engine in (self.native, self.router, self.ollama_models):
                if engine is not None:
                    engine.jit(body.get("model"))
        queue = self.replies.get(request.path)
        if queue:
            return await self._answer(request, queue.popleft())
        if request.path == "/v1/embeddings":
            return web.json_response(
                {
                    "object": "list",
                    "model": body.get("model"),
                    "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
                    "usage": {"prompt_tokens": 2, "total_tokens": 2},
                }
            )
        if request.path == "/v1/completions":
            return web.json_response(
                {
                    "id": "cmpl-1",
                    "object": "text_completion",
                    "created": 1,
                    "model": body.get("model"),
                    "choices": [
                        {"index": 0, "text": " there", "finish_reason": "stop", "logprobs": None}
                    ],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
            )
        if isinstance(body, dict) and body.get("stream"):
            return await self._answer(request, Reply(stream=text_stream("Hel", "lo", "!")))
        model = body.get("model", "test-model") if isinstance(body, dict) else "test-model"
        return web.json_response(chat_completion(model=model))

    async def _answer(self, request: web.Request, reply: Reply) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.drop:
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        if reply.stream is None:
            if reply.body is not None:
                return web.Response(
                    body=reply.body,
                    status=reply.status,
                    content_type=reply.content_type,
                    headers=reply.headers,
                )
            payload = reply.json if reply.json is not None else chat_completion()
            return web.json_response(payload, status=reply.status, headers=reply.headers)
        response = web.StreamResponse(
            status=reply.status, headers={"Content-Type": "text/event-stream", **reply.headers}
        )
        await response.prepare(request)
        try:
            for item in reply.stream:
                if isinstance(item, float):
                    await asyncio.sleep(item)
                elif isinstance(item, asyncio.Event):
                    await item.wait()
                elif isinstance(item, bytes):
                    await response.write(item)
                else:
                    await response.write(b"data: " + json.dumps(item).encode() + b"\n\n")
            if reply.cut:
                assert request.transport is not None
                request.transport.abort()
                return response
            if reply.stall:
                await asyncio.sleep(3600)
            if reply.done:
                await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except (asyncio.CancelledError, ConnectionResetError):
            self.cancelled.set()
            raise
        return response
