"""The one place where a stream of events reaches the client: an SSE answer opened,
written event by event, and ended, with a ``[DONE]`` or with an error in the shape its
API's clients raise.

Two kinds, by the API:

- ``chat`` (chat completions, pass-through and tool loops): ``data:`` lines; an error
  is ``data: {"error": {...}}``, which the OpenAI SDKs raise as ``APIError``;
- ``responses``: ``event: TYPE`` plus ``data:``; an error is the Responses API's
  ``error`` event, numbered after the last event sent.

And ``RelayedStream``, an answer of a route lmbridge only relays (``proxy/relay.py``):
the upstream's status, headers and bytes, in an API lmbridge does not speak, so that an
error after the headers can only cut it short.

Code that produces events never writes to the socket itself: it hands them here (or,
for a Responses run, to a sink that ends here). An exception after the stream has
begun is ended here too, by the middleware (``fail``), never by the handler.

The WebSocket mode of ``/v1/responses`` is the third shape (``SocketStream``): the same
Responses events, one JSON text message each, over a connection that carries many
turns; an error is the envelope ``{"type": "error", "status", "error": {...}}`` and
leaves the connection open.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from aiohttp import ClientConnectionResetError, WSCloseCode, web
from multidict import CIMultiDict

from proxy.jsontext import dumps
from proxy.keys import CLIENT_GONE, CORS, OPEN_STREAM, REQUEST_ID, ROUTE, SCHEMA, WARNING
from proxy.sse import DONE_EVENT, encode_event

log = logging.getLogger("lmbridge.upstream")

Kind = Literal["chat", "responses"]
REQUEST_ID_HEADER = "X-Request-ID"
WARNING_HEADER = "X-LMBridge-Warning"
SCHEMA_HEADER = "X-LMBridge-Schema"
UPSTREAM_HEADER = "X-LMBridge-Upstream"


def served_header(request: web.Request) -> str | None:
    """X-LMBridge-Upstream: the upstream that served the request's model call, and the
    model when a fallback model served it; None before any call was served."""
    route = request.get(ROUTE)
    if route is None or route.served is None:
        return None
    upstream, model = route.served
    return upstream.name if model.id == route.model.id else f"{upstream.name}; model={model.id}"


def stream_headers(request: web.Request) -> dict[str, str]:
    """The headers lmbridge adds to a stream it opens itself (a plain response gets them
    from the middleware)."""
    headers = {REQUEST_ID_HEADER: request[REQUEST_ID]}
    if WARNING in request:
        headers[WARNING_HEADER] = request[WARNING]
    if SCHEMA in request:
        headers[SCHEMA_HEADER] = request[SCHEMA]
    served = served_header(request)
    if served is not None:
        headers[UPSTREAM_HEADER] = served
    cors = request.get(CORS)
    if cors is not None:
        headers.update(cors)
    return headers


INTERRUPTED = "The upstream stream was interrupted: "


def loading_comment(model: str) -> bytes:
    """The keep-alive of a stream whose model loads: an SSE comment, which clients skip
    but which resets their read timeout."""
    name = "".join(c if c.isprintable() and c.isascii() else "?" for c in model)
    return f": loading {name}\n\n".encode()


def responses_frame(events: Iterable[Mapping[str, Any]]) -> bytes:
    """Responses events as one write: each ``event:`` and its ``data:`` line together
    (some clients drop an event whose closing blank line comes in a later read)."""
    return b"".join(
        b"event: " + str(e["type"]).encode() + b"\ndata: " + dumps(e).encode() + b"\n\n"
        for e in events
    )


class EventStream:
    def __init__(
        self,
        request: web.Request,
        kind: Kind,
        headers: Mapping[str, str] | None = None,
        *,
        status: int = 200,
    ) -> None:
        self.request: web.Request | None = request
        self.kind = kind
        self._headers = headers or {}
        self._status = status
        self.response: web.StreamResponse | None = None
        # The sequence number an error event of a Responses stream takes.
        self.next_sequence = 0

    @property
    def opened(self) -> bool:
        return self.response is not None

    async def open(self) -> web.StreamResponse:
        """Send the status and headers (once); from now on an error can only end it."""
        if self.response is None:
            assert self.request is not None, "a stream is opened before it ends"
            response = web.StreamResponse(
                status=self._status,
                headers={
                    "Content-Type": "text/event-stream",
                    "Cache-Control": "no-cache",
                    "X-Accel-Buffering": "no",
                    **stream_headers(self.request),
                    **self._headers,
                },
            )
            await response.prepare(self.request)
            self.response = response
            self.request[OPEN_STREAM] = self
        return self.response

    async def send(self, events: list[dict[str, Any]]) -> None:
        """Events as one write, in this stream's frame."""
        if not events:
            return
        if self.kind == "responses":
            data = responses_frame(events)
            self.next_sequence = int(events[-1].get("sequence_number", -1)) + 1
        else:
            data = b"".join(encode_event(event) for event in events)
        await self.send_bytes(data)

    async def send_bytes(self, data: bytes) -> None:
        """Bytes already framed (a pass-through relays the upstream's as they come)."""
        response = await self.open()
        await response.write(data)

    async def finish(self, last: bytes = DONE_EVENT) -> web.StreamResponse:
        response = await self.open()
        if self.request is not None:
            await self._end(response, last)
        return response

    async def fail(self, body: Mapping[str, Any], *, interrupted: bool = False) -> None:
        """End with an error: the status and body an HTTP answer would have had, as this
        API's error event. ``interrupted``: the upstream broke off a chat stream."""
        if self.request is None:
            return  # it ended already: nothing can follow its last event
        error = dict(body["error"])
        if self.kind == "responses":
            event = {
                "type": "error",
                "code": error.get("code"),
                "message": error.get("message"),
                "param": error.get("param"),
                "sequence_number": self.next_sequence,
            }
            last = responses_frame([event])
        else:
            if interrupted:
                error["message"] = INTERRUPTED + str(error.get("message"))
            last = encode_event({"error": error})
        await self._end(await self.open(), last)

    async def _end(self, response: web.StreamResponse, last: bytes) -> None:
        request, self.request = self.request, None
        try:
            await response.write(last)
            await response.write_eof()
        except (ConnectionResetError, ClientConnectionResetError):
            if request is not None:
                request[CLIENT_GONE] = True
        # The request holds this stream (OPEN_STREAM): without the reference back, both
        # are freed when the request ends, not at the next garbage collection.


class SocketStream:
    """A WebSocket connection to ``/v1/responses``: events of many turns, and errors
    that end a turn but not the connection."""

    def __init__(self, request: web.Request, *, max_message: int, heartbeat: float) -> None:
        self.request = request
        # No permessage-deflate: on loopback, compressing each small event costs more CPU
        # and latency than the bytes it saves.
        self.socket = web.WebSocketResponse(
            max_msg_size=max_message, heartbeat=heartbeat, compress=False
        )

    async def open(self) -> web.WebSocketResponse:
        self.socket.headers.update(stream_headers(self.request))
        await self.socket.prepare(self.request)
        return self.socket

    async def send(self, events: list[dict[str, Any]]) -> None:
        """A run's sink: each event as one text message."""
        for event in events:
            await self.socket.send_str(dumps(event))

    async def error(self, status: int, body: Mapping[str, Any]) -> None:
        """A turn's failure, as the transport's error envelope."""
        await self.socket.send_str(dumps({"type": "error", "status": status, **body}))

    async def close(self, *, going_away: bool = False) -> None:
        code = WSCloseCode.GOING_AWAY if going_away else WSCloseCode.OK
        await self.socket.close(code=code)


class RelayedStream:
    """An upstream answer relayed as it comes: its status and headers, then its body's
    bytes. With no error event of its API to write, a failure after the headers closes
    the connection before the body's end (no last chunk, or fewer bytes than its
    Content-Length), which every HTTP client reports as an incomplete answer."""

    def __init__(
        self,
        request: web.Request,
        status: int,
        headers: CIMultiDict[str],
        *,
        reason: str | None = None,
        content_length: int | None = None,
    ) -> None:
        self.request: web.Request | None = request
        self._status = status
        self._reason = reason
        self._headers = headers
        self._content_length = content_length
        self.response: web.StreamResponse | None = None

    async def open(self) -> web.StreamResponse:
        """Send the status and headers (once)."""
        if self.response is None:
            assert self.request is not None, "a stream is opened before it ends"
            response = web.StreamResponse(
                status=self._status, reason=self._reason, headers=self._headers
            )
            response.headers.update(stream_headers(self.request))
            if self._content_length is not None:
                response.content_length = self._content_length
            await response.prepare(self.request)
            self.response = response
            self.request[OPEN_STREAM] = self
        return self.response

    async def send_bytes(self, data: bytes) -> None:
        response = await self.open()
        await response.write(data)

    async def finish(self) -> web.StreamResponse:
        response = await self.open()
        request, self.request = self.request, None
        if request is not None:
            try:
                await response.write_eof()
            except (ConnectionResetError, ClientConnectionResetError):
                request[CLIENT_GONE] = True
        return response

    async def fail(self, body: Mapping[str, Any], *, interrupted: bool = False) -> None:
        """Cut the answer short: what was sent stays, the rest never comes."""
        request, self.request = self.request, None
        if request is None:
            return
        log.warning(
            "a relayed answer was cut short: %s",
            body["error"].get("message"),
            extra={"fields": {"request_id": request[REQUEST_ID]}},
        )
        if self.response is not None:
            self.response.force_close()
        if request.transport is not None:
            request.transport.close()
