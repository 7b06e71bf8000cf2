"""The first requests for a model that is not loaded: ``--concurrency`` (32) at once,
through the daemon, to a fake LM Studio 0.4 whose load takes ``LOAD_SECONDS`` (2 s).

Reported: the time until every request was answered, against one load plus one request
(the target: one load, and within 10% of that), and how many loads the upstream saw.
The fake runs in this process (it only sleeps through the load and answers fixed
replies); the daemon is its own process, as in the other measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.bench.processes import BenchError, free_port, start_daemon, stop, wait_ready

if TYPE_CHECKING:
    from proxy.bench.fake import Result

LOAD_SECONDS = 2.0
MODEL = "bench-lifecycle-model"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}


class FakeLMStudio:
    """LM Studio 0.4's native list, load and unload, and chat completions; loads counted."""

    def __init__(self) -> None:
        self.loaded = False
        self.loads = 0
        self.chats_before_load = 0  # JIT loads LM Studio would have started itself

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/api/v1/models", self.models)
        app.router.add_post("/api/v1/models/load", self.load)
        app.router.add_post("/api/v1/models/unload", self.unload)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    async def models(self, request: web.Request) -> web.Response:
        instances = [{"id": MODEL, "config": {"context_length": 4096}}] if self.loaded else []
        entry = {"type": "llm", "key": MODEL, "loaded_instances": instances}
        return web.json_response({"models": [entry]})

    async def load(self, request: web.Request) -> web.Response:
        self.loads += 1
        await asyncio.sleep(LOAD_SECONDS)
        self.loaded = True
        return web.json_response({"instance_id": MODEL, "load_time_seconds": LOAD_SECONDS})

    async def unload(self, request: web.Request) -> web.Response:
        self.loaded = False
        return web.json_response({"instance_id": MODEL})

    async def chat(self, request: web.Request) -> web.Response:
        await request.read()
        if not self.loaded:
            self.chats_before_load += 1
            self.loaded = True
        message = {"role": "assistant", "content": "Hello."}
        return web.json_response(
            {
                "id": "chatcmpl-lifecycle",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": MODEL,
                "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
            }
        )


async def measure_lifecycle(args: argparse.Namespace, tmp: Path) -> list[Result]:
    from proxy.bench.fake import Result

    fake = FakeLMStudio()
    runner = web.AppRunner(fake.app())
    await runner.setup()
    upstream_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", upstream_port).start()
    port = free_port()
    log = tmp / "lifecycle.log"
    daemon = await start_daemon(
        [
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--port",
            str(port),
            "--db",
            str(tmp / "lifecycle.db"),
            "--log-level",
            args.log_level,
        ],
        log,
    )
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await wait_ready(session, f"http://127.0.0.1:{port}", daemon, log)
            total = await _first_requests(session, url, args.concurrency)
            one = statistics.median([await _timed(session, url) for _ in range(20)])
    finally:
        await stop(daemon)
        await runner.cleanup()
    target = LOAD_SECONDS + one
    over = (total / target - 1) * 100
    return [
        Result(
            f"{args.concurrency} first requests, {LOAD_SECONDS:g} s load",
            target,
            total,
            "s",
            f"{fake.loads} load(s), {fake.chats_before_load} JIT; "
            f"{over:+.1f}% vs one load + one request (target <= +10%)",
        )
    ]


async def _first_requests(session: aiohttp.ClientSession, url: str, count: int) -> float:
    started = time.perf_counter()
    statuses = await asyncio.gather(*(_status(session, url) for _ in range(count)))
    elapsed = time.perf_counter() - started
    if any(status != 200 for status in statuses):
        raise BenchError(f"first requests answered {sorted(set(statuses))}, not all 200")
    return elapsed


async def _status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url, json=BODY) as resp:
        await resp.read()
        return resp.status


async def _timed(session: aiohttp.ClientSession, url: str) -> float:
    started = time.perf_counter()
    await _status(session, url)
    return time.perf_counter() - started
