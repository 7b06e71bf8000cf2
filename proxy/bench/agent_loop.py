"""An agent loop, as coding clients run it: turns continued by ``previous_response_id``
over one WebSocket, against the same turns over HTTP SSE, against the same chat history
sent straight to the upstream (what a client without lmbridge sends each turn).

The loops take turns, one turn of each kind after another, so that a burst of other
work on the machine hits them all. Reported per kind: the median time of a turn (from
sending it to its terminal event) and the median of what lmbridge adds to the direct
turn of the same number. A last loop runs with ``store: false`` over the socket and
reads the daemon's storage write counter before and after: nothing may be written.
"""

from __future__ import annotations

import json
import statistics
import time
from typing import TYPE_CHECKING, Any

import aiohttp

from proxy.bench.upstream import BENCH_MODEL, REPLY_TEXT

if TYPE_CHECKING:
    from proxy.bench.fake import Result, Setup

TERMINAL = (b'"response.completed"', b'"response.failed"', b'"response.incomplete"')


class SocketLoop:
    """Turns on one WebSocket, each continuing the one before."""

    def __init__(self, socket: aiohttp.ClientWebSocketResponse, *, store: bool) -> None:
        self.socket = socket
        self.store = store
        self.previous: str | None = None

    async def turn(self, text: str) -> float:
        body: dict[str, Any] = {
            "type": "response.create",
            "model": BENCH_MODEL,
            "input": text,
            "store": self.store,
        }
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        started = time.perf_counter()
        await self.socket.send_str(json.dumps(body))
        while True:
            message = await self.socket.receive()
            if message.type != aiohttp.WSMsgType.TEXT:
                raise RuntimeError(f"the socket ended mid-turn: {message.type!r}")
            data = message.data
            if '"type":"error"' in data[:40]:
                raise RuntimeError(f"lmbridge refused a turn: {data[:300]}")
            if any(kind.decode() in data[:60] for kind in TERMINAL):
                elapsed = time.perf_counter() - started
                self.previous = json.loads(data)["response"]["id"]
                return elapsed


class SseLoop:
    """Turns as ``POST /v1/responses`` with ``stream: true``, each continuing the one
    before."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.previous: str | None = None

    async def turn(self, text: str) -> float:
        body: dict[str, Any] = {"model": BENCH_MODEL, "input": text, "stream": True}
        if self.previous is not None:
            body["previous_response_id"] = self.previous
        started = time.perf_counter()
        async with self.session.post(self.url, json=body) as resp:
            if resp.status != 200:
                raise RuntimeError(f"lmbridge answered {resp.status}: {await resp.text()}")
            last = b""
            async for line in resp.content:
                if line.startswith(b"data: {"):
                    last = line
        elapsed = time.perf_counter() - started
        if not any(kind in last for kind in TERMINAL):
            raise RuntimeError(f"the stream ended without a terminal event: {last[:200]!r}")
        self.previous = json.loads(last[6:])["response"]["id"]
        return elapsed


class DirectLoop:
    """The same turns as a chat client sends them: the whole history, streamed back."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.messages: list[dict[str, str]] = []

    async def turn(self, text: str) -> float:
        self.messages.append({"role": "user", "content": text})
        body = {"model": BENCH_MODEL, "messages": self.messages, "stream": True}
        started = time.perf_counter()
        async with self.session.post(self.url, json=body) as resp:
            await resp.read()
        elapsed = time.perf_counter() - started
        self.messages.append({"role": "assistant", "content": REPLY_TEXT})
        return elapsed


async def storage_writes(session: aiohttp.ClientSession, base: str) -> float:
    async with session.get(base + "/metrics") as resp:
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("lmbridge_storage_writes_total "):
            return float(line.split()[1])
    raise RuntimeError("the daemon's /metrics has no lmbridge_storage_writes_total")


async def measure_agent_loop(setup: Setup) -> list[Result]:
    from proxy.bench.fake import Result

    setup.unpinned()
    session, turns = setup.session, setup.args.agent_turns
    base = setup.proxy_url
    chat = setup.upstream_url + "/v1/chat/completions"
    times: dict[str, list[float]] = {"direct": [], "http": [], "socket": []}
    async with session.ws_connect(base + "/v1/responses") as socket:
        loops: dict[str, DirectLoop | SseLoop | SocketLoop] = {
            "direct": DirectLoop(session, chat),
            "http": SseLoop(session, base + "/v1/responses"),
            "socket": SocketLoop(socket, store=True),
        }
        for n in range(turns):
            for kind, loop in loops.items():
                times[kind].append(await loop.turn(f"Step {n}: go on."))

    unstored: list[float] = []
    direct_again: list[float] = []
    before = await storage_writes(session, base)
    async with session.ws_connect(base + "/v1/responses") as socket:
        loop, direct = SocketLoop(socket, store=False), DirectLoop(session, chat)
        for n in range(turns):
            direct_again.append(await direct.turn(f"Step {n}: go on."))
            unstored.append(await loop.turn(f"Step {n}: go on."))
    written = await storage_writes(session, base) - before

    def added_ms(kind: list[float], baseline: list[float]) -> float:
        return statistics.median(k - d for k, d in zip(kind, baseline, strict=True)) * 1000

    d = statistics.median(times["direct"]) * 1000
    results = []
    for kind, label in (("http", "HTTP SSE"), ("socket", "WebSocket")):
        p = statistics.median(times[kind]) * 1000
        results.append(
            Result(
                f"agent loop of {turns} turns over {label}, store: true (p50 per turn)",
                d,
                p,
                "ms",
                note=f"lmbridge adds {added_ms(times[kind], times['direct']):.2f} ms a turn",
            )
        )
    results.append(
        Result(
            f"agent loop of {turns} turns over WebSocket, store: false (p50 per turn)",
            statistics.median(direct_again) * 1000,
            statistics.median(unstored) * 1000,
            "ms",
            note=f"lmbridge adds {added_ms(unstored, direct_again):.2f} ms a turn; "
            f"{written:.0f} storage writes",
        )
    )
    return results
