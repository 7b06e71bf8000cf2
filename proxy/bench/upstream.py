"""The fast fake upstream of ``lmbridge bench``: fixed replies, no model.

Like a real server it parses each request and serialises each reply (with a
fresh id), but it generates nothing: what is left is HTTP and JSON work. Run
as ``python -m proxy.bench.upstream``: it prints its URL as one JSON line and
exits when its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import Any

from aiohttp import web

BENCH_MODEL = "bench-model"
STREAM_CHUNKS = 20
REPLY_TEXT = "Hello from the bench."


def _completion(n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-bench{n}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": BENCH_MODEL,
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": REPLY_TEXT},
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }


def _tool_call(n: int, tool: str) -> dict[str, Any]:
    """The first round of a tool loop: the model calls the bench MCP server's echo."""
    body = _completion(n)
    choice = body["choices"][0]
    choice["finish_reason"] = "tool_calls"
    choice["message"] = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {"name": tool, "arguments": '{"text": "hello"}'},
            }
        ],
    }
    return body


def stream_chunk(n: int, i: int) -> bytes:
    delta: dict[str, Any] = {"content": f"tok{i} "}
    if i == 0:
        delta["role"] = "assistant"
    finish = "stop" if i == STREAM_CHUNKS - 1 else None
    body = {
        "id": f"chatcmpl-bench{n}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": BENCH_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_MODELS = {"object": "list", "data": [{"id": BENCH_MODEL, "object": "model", "owned_by": "bench"}]}


def fast_upstream_app() -> web.Application:
    counter = iter(range(1, 1 << 62))
    stats = {"model_list_reads": 0, "chat_requests": 0}

    async def models(request: web.Request) -> web.Response:
        stats["model_list_reads"] += 1
        return web.json_response(_MODELS)

    async def read_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = next(counter)
        stats["chat_requests"] += 1
        tools = body.get("tools") or []
        # tool_choice "none": tools are offered but the model answers in text.
        calls = tools and body.get("tool_choice") != "none"
        if calls and body["messages"][-1].get("role") != "tool":
            return web.json_response(_tool_call(n, tools[0]["function"]["name"]))
        if not body.get("stream"):
            return web.json_response(_completion(n))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(STREAM_CHUNKS):
            await response.write(stream_chunk(n, i))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/bench/stats", read_stats)
    return app


async def serve() -> None:
    runner = web.AppRunner(fast_upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    sys.stdout.write(json.dumps({"url": f"http://{host}:{port}"}) + "\n")
    sys.stdout.flush()
    # Runs until the parent closes our stdin (or dies).
    await asyncio.to_thread(sys.stdin.buffer.read)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(serve())
