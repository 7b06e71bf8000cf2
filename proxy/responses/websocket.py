"""The WebSocket mode of ``/v1/responses``: ``GET /v1/responses`` upgraded, then one
turn per ``response.create`` message, run by the same service as HTTP and streamed as
the same events (``socket_session.py`` has the rules, ``event_stream.SocketStream`` the
frames).

The middleware has admitted the upgrade like any request (``Host``, ``Origin``, the
client's key: a browser's handshake carries its page's origin), and it sets the owner
of everything the connection stores. A reader task takes messages as they come, so that
a client gone mid-turn is noticed at once and its turn cancelled, as on HTTP; turns
wait in a short queue and run one at a time, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial
from typing import Any

from aiohttp import WSMsgType, web

from proxy.errors import BadRequest, ConnectionLimitReached, UpgradeRequired
from proxy.event_stream import SocketStream
from proxy.keys import (
    CONFIG,
    METRICS,
    MODEL,
    OWNER,
    REQUEST_ID,
    REQUEST_LOG,
    RESPONSE_SOCKETS,
    RESPONSES,
    WORKER,
)
from proxy.middleware import describe_error
from proxy.passthrough import LARGE_BODY
from proxy.responses.recorder import turn_text
from proxy.responses.render import estimate_tokens
from proxy.responses.runs import ResponseRun
from proxy.responses.socket_session import SocketSession, continued, read_create
from proxy.responses.state import History

log = logging.getLogger("lmbridge.responses")

# Turns a client may send ahead of the one running; more are refused, one by one.
QUEUED_TURNS = 16
# Pings keep NATs open and find clients that vanished without closing.
HEARTBEAT = 30.0


def add_socket_route(app: web.Application) -> None:
    app[RESPONSE_SOCKETS] = set()
    app.router.add_get("/v1/responses", responses_socket)
    app.on_shutdown.append(_close_sockets)


async def responses_socket(request: web.Request) -> web.StreamResponse:
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise UpgradeRequired(
            "GET /v1/responses opens the WebSocket mode of the Responses API: send it as a "
            "WebSocket upgrade. To create a response over HTTP, POST /v1/responses."
        )
    app = request.app
    stream = SocketStream(
        request, max_message=app[CONFIG].server.max_body_size, heartbeat=HEARTBEAT
    )
    socket = await stream.open()
    connection = Connection(request, stream, time.monotonic)
    metrics = app[METRICS]
    metrics.websocket_connections += 1
    app[RESPONSE_SOCKETS].add(connection)
    try:
        await connection.serve()
    finally:
        app[RESPONSE_SOCKETS].discard(connection)
        metrics.websocket_connections -= 1
    return socket


async def _close_sockets(app: web.Application) -> None:
    """At shutdown: each connection ends its running turn (within the drain time), takes
    no other, and closes as going away."""
    sockets = app[RESPONSE_SOCKETS]
    connections = list(sockets)
    if connections:
        await asyncio.wait(
            [asyncio.ensure_future(c.close_after_turn()) for c in connections],
            timeout=app[CONFIG].server.shutdown_grace,
        )


class Connection:
    def __init__(self, request: web.Request, stream: SocketStream, clock: Any) -> None:
        app = request.app
        self.request = request
        self.stream = stream
        self.clock = clock
        self.service = app[RESPONSES]
        self.metrics = app[METRICS]
        self.request_log = app[REQUEST_LOG]
        self.worker = app[WORKER]
        self.owner: str = request[OWNER]
        self.session: SocketSession[History] = SocketSession(
            clock(), app[CONFIG].responses.websocket_max_age
        )
        self.queue: asyncio.Queue[str] = asyncio.Queue(QUEUED_TURNS)
        self.turns: asyncio.Future[None] | None = None

    async def serve(self) -> None:
        """Read until the client leaves or the age limit; the turns run beside."""
        self.turns = turns = asyncio.ensure_future(self._run_turns())
        socket = self.stream.socket
        try:
            while not turns.done():
                remaining = self.session.remaining(self.clock())
                if remaining <= 0:
                    await self._end_turns()
                    await turns
                    await self._refuse(_limit_reached(self.session.max_age))
                    await self.stream.close()
                    return
                try:
                    message = await socket.receive(timeout=remaining)
                except TimeoutError:
                    continue
                if message.type == WSMsgType.TEXT:
                    await self._enqueue(message.data)
                elif message.type == WSMsgType.BINARY:
                    await self._refuse(
                        BadRequest(
                            "lmbridge reads text messages: send each response.create as JSON text."
                        )
                    )
                else:  # closing, closed or broken: the client is gone, or we close
                    return
        finally:
            if not turns.done():
                turns.cancel()  # a client gone mid-turn: the turn ends as on HTTP
            with contextlib.suppress(asyncio.CancelledError):
                await turns

    async def close_after_turn(self) -> None:
        await self._end_turns()
        if self.turns is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self.turns)
        await self.stream.close(going_away=True)

    async def _end_turns(self) -> None:
        """No turn after the one running: the queued ones are dropped."""
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait("")

    async def _enqueue(self, data: str) -> None:
        if not data:
            data = " "  # "" is the end of the queue
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            await self._refuse(
                BadRequest(
                    f"More than {QUEUED_TURNS} response.create messages wait for the one "
                    "running; this one was not taken. Wait for a response to end before "
                    "sending more.",
                    code="too_many_queued",
                )
            )

    async def _run_turns(self) -> None:
        while data := await self.queue.get():
            await self._turn(data)

    async def _turn(self, data: str) -> None:
        session = self.session
        session.turns += 1
        started = time.perf_counter()
        request_id = f"{self.request[REQUEST_ID]}.{session.turns}"
        previous: str | None = None
        model = "-"
        status = 200
        run: ResponseRun | None = None
        try:
            body = await self.worker.run_if(len(data) > LARGE_BODY, partial(read_create, data))
            previous = continued(body)
            run = await self.service.create(body, self.owner, history=session.continuation(body))
            model = run.prepared.model.id
            response = await self.service.execute(run, self.stream.send)
        except asyncio.CancelledError:
            status = 499
            self.metrics.websocket_turns.inc(("cancelled",))
            raise
        except Exception as exc:
            if previous is not None:
                session.forget(previous)
            status = await self._refuse(exc, request_id)
            self.metrics.websocket_turns.inc(("error",))
        else:
            outcome = response["status"]
            self.metrics.websocket_turns.inc((outcome,))
            if outcome in ("completed", "incomplete"):
                session.remember(run.id, _history_after(run, previous))
            elif previous is not None:
                session.forget(previous)
        finally:
            queued = run.route.waited if run is not None and run.route.queued else None
            self._log_turn(request_id, model, status, time.perf_counter() - started, queued)

    async def _refuse(self, exc: Exception, request_id: str | None = None) -> int:
        """A turn's error, sent as the envelope; its status."""
        status, body = describe_error(exc, request_id or self.request[REQUEST_ID])
        error = body.get("error")
        code = error.get("code") if isinstance(error, dict) else None
        self.metrics.websocket_errors.inc((str(code),))
        with contextlib.suppress(ConnectionError):
            await self.stream.error(status, body)
        return status

    def _log_turn(
        self, request_id: str, model: str, status: int, seconds: float, queued: float | None
    ) -> None:
        self.request[MODEL] = model
        self.metrics.count_request("/v1/responses (websocket)", model, status, seconds)
        if self.request_log.enabled:
            line = {
                "request_id": request_id,
                "method": "WEBSOCKET",
                "path": "/v1/responses",
                "model": model,
                "status": status,
                "duration_ms": round(seconds * 1000, 2),
            }
            if queued is not None:
                line["queued_ms"] = round(queued * 1000, 2)
            self.request_log.write(line)


def _history_after(run: ResponseRun, previous: str | None) -> History:
    """The chain a continuation of ``run`` reads: the turns it continued, then its own
    (a response in a conversation is continued by its own turn only, as from storage)."""
    prepared = run.prepared
    turn = run.stored_turn or turn_text(prepared, run.builder.output)
    earlier = prepared.history if previous is not None else []
    tokens = prepared.history_tokens if previous is not None else []
    return History(
        [*earlier, turn],
        [*tokens, estimate_tokens(turn)],
        set(prepared.mcp_listed),
    )


def _limit_reached(max_age: float) -> ConnectionLimitReached:
    minutes = max_age / 60
    return ConnectionLimitReached(
        f"This WebSocket connection reached its limit of {minutes:g} minutes "
        "(responses.websocket_max_age); open a new connection to continue.",
    )
