"""Accepting and reading client connections: aiohttp's HTTP/1.1 protocol with lmbridge's
read deadlines and connection cap (rules in ``proxy.connections``).

``ClientSite`` listens in place of aiohttp's TCPSite (``proxy.serve``). Each accepted
connection is a ``ClientConnection``; one beyond ``server.max_connections`` is handed to
a ``RefusedConnection``, which answers 503 and closes it.

What aiohttp 3.14 offers is one ``keepalive_timeout``, running from the end of an answer
(or the connection's opening) until the next head is complete, and nothing that bounds a
request body. ``ClientConnection`` keeps aiohttp's parser and request flow and arms one
timer of its own from a ``ReadClock``; aiohttp's keep-alive timer stays, set beyond every
deadline of ours, as a backstop. To see a head complete before its handler runs it reads
``RequestHandler._messages``, the queue of parsed heads and their body streams: aiohttp
has no public hook at that point. An answer's end it learns from ``log_access``, which
aiohttp calls once per answer written. The parser's errors it answers in
``handle_error``, aiohttp's one place for them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
from collections.abc import Callable
from itertools import islice
from typing import Any

from aiohttp import web
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server
from yarl import URL

from proxy.config import ServerConfig
from proxy.connections import (
    OncePerInterval,
    ReadClock,
    body_error,
    http_error,
    http_response,
    times,
)
from proxy.errors import LMBridgeError, RequestTimeout, TooManyConnections, error_body
from proxy.jsontext import dumps_bytes
from proxy.metrics import Metrics

log = logging.getLogger("lmbridge.connections")

# How long a refused connection is kept for its client to read the 503 before it is closed.
REFUSAL_LINGER = 1.0
# Refused connections waiting to be closed at once; beyond, the 503 is written and the
# connection closed straight away (a flood of new connections must not pile them up).
MAX_LINGERING_REFUSALS = 64


class ClientSite(web.BaseSite):
    """The listening socket on ``server.host``:``server.port``."""

    def __init__(
        self,
        runner: web.BaseRunner,
        config: ServerConfig,
        metrics: Metrics,
        *,
        max_connections: int | None = None,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self.config = config
        self.metrics = metrics
        self.max_connections = max_connections or config.max_connections
        self._host = config.host
        self._port = config.port
        self.open = 0
        self._refusals: set[RefusedConnection] = set()
        self._refusal = http_response(
            TooManyConnections(
                f"lmbridge has {self.max_connections} client connections open, the most it "
                "keeps (server.max_connections); retry shortly."
            )
        )
        self._log_gates: dict[str, OncePerInterval] = {}

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._host, port=self._port))

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection, self._host, self._port, backlog=self._backlog
        )

    async def stop(self) -> None:
        for refusal in list(self._refusals):
            refusal.close()
        await super().stop()

    def _connection(self) -> ClientConnection:
        server = self._runner.server
        assert server is not None, "the runner is set up before its site starts"
        config = self.config
        return ClientConnection(
            self,
            server,
            loop=asyncio.get_running_loop(),
            access_log=None,
            # aiohttp's own timer must never come first: ours close an idle connection
            # after idle_timeout, and a head begun just before that after header_timeout.
            keepalive_timeout=config.idle_timeout + config.header_timeout + 1.0,
        )

    # --- called by the connections ---------------------------------------------------

    def admit(self) -> bool:
        if self.open >= self.max_connections:
            return False
        self.open += 1
        self.metrics.client_connections = self.open
        return True

    def release(self) -> None:
        self.open -= 1
        self.metrics.client_connections = self.open

    def refuse(self, transport: asyncio.Transport) -> None:
        linger = len(self._refusals) < MAX_LINGERING_REFUSALS
        refusal = RefusedConnection(self._refusal, linger=linger, done=self._refusals.discard)
        if linger:
            self._refusals.add(refusal)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)
        self.closed("limit")

    def closed(self, reason: str, error: LMBridgeError | None = None) -> None:
        """lmbridge closed a client connection (or answered it and will close it)."""
        self.metrics.client_connections_closed.inc((reason,))
        if reason == "idle":
            return  # the normal end of a keep-alive connection
        gate = self._log_gates.setdefault(reason, OncePerInterval())
        count = gate()
        if count is None:
            return
        config = self.config
        if reason == "limit":
            log.warning(
                "refused a connection: %d are open, the most server.max_connections allows%s",
                self.max_connections,
                times(count),
            )
        elif reason == "header_timeout":
            log.info(
                "closed a connection whose request head did not come within "
                "server.header_timeout (%gs)%s",
                config.header_timeout,
                times(count),
            )
        elif reason == "body_timeout":
            log.info(
                "answered 408 to a request whose body did not come within "
                "server.body_timeout (%gs)%s",
                config.body_timeout,
                times(count),
            )
        elif reason == "malformed" and error is not None:
            log.info(
                "answered %d %s to bytes that are not valid HTTP/1.1%s",
                error.status,
                error.code,
                times(count),
            )


class ClientConnection(RequestHandler):
    """One client connection: aiohttp's request handling, with lmbridge's deadlines."""

    __slots__ = (
        "_body",
        "_clock",
        "_line_done",
        "_line_length",
        "_line_too_long",
        "_site",
        "_timer",
    )

    def __init__(self, site: ClientSite, manager: Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._site = site
        config = site.config
        self._clock = ReadClock(
            config.header_timeout, config.body_timeout, config.idle_timeout, self._loop.time()
        )
        self._timer: asyncio.TimerHandle | None = None
        # The body stream of the last parsed head, while its bytes are still coming.
        self._body: StreamReader | None = None
        # The request line of the head being received: its bytes so far, whether it ended;
        # and whether the head the parser rejected had one too long (414, not 431).
        self._line_length = 0
        self._line_done = False
        self._line_too_long = False

    # --- the connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._site.admit():
            assert isinstance(transport, asyncio.Transport)
            self._site.refuse(transport)
            return
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._manager is not None:  # aiohttp's own guard against a second call
            self._site.release()
            self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        receiving_body = self._body is not None
        if not receiving_body:
            self._count_line(data)
        queued = len(self._messages)
        super().data_received(data)
        now = self._loop.time()
        parsed = len(self._messages) - queued
        for message, payload in islice(self._messages, queued, None) if parsed else ():
            if isinstance(message, RawRequestMessage):
                self._line_length, self._line_done = 0, False
            elif self._body is not None:
                # The parser failed inside a body (bad chunked framing): aiohttp would queue
                # the error as the next request and leave this one waiting for the rest.
                error = body_error(getattr(message, "exc", None))
                self._site.closed("malformed", error)
                self._fail_body(error)
                continue
            else:
                self._line_too_long = self._line_length > self.max_line_size
            body_follows = isinstance(message, RawRequestMessage) and not payload.is_eof()
            self._clock.head_received(now, body_follows=body_follows)
            if body_follows:
                self._body = payload
                payload.on_eof(self._body_complete)
        if not parsed and not receiving_body and data:
            self._clock.head_bytes(now)
        self._arm()

    def _count_line(self, data: bytes) -> None:
        if self._line_done:
            return
        end = data.find(b"\n")
        self._line_length += len(data) if end < 0 else end
        self._line_done = end >= 0

    def _body_complete(self) -> None:
        self._body = None
        self._clock.body_received()
        self._arm()

    def log_access(
        self, request: BaseRequest, response: StreamResponse, time: float | None
    ) -> None:
        # aiohttp calls this once per answer, when it is written (or the client has gone):
        # the one synchronous hook at that point. Its access log is off (lmbridge writes
        # its own request line).
        self._clock.answered(self._loop.time())
        self._arm()

    # --- errors --------------------------------------------------------------------

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> StreamResponse:
        """The answer to bytes aiohttp's parser rejected, or to an exception that escaped
        the middleware: JSON in the OpenAI shape (aiohttp's is text/plain, with a
        traceback in the log)."""
        if status >= 500:
            log.error("unhandled error outside the request middleware", exc_info=exc)
            body = error_body(
                "lmbridge failed while handling this request; see the daemon's log.",
                "server_error",
                None,
                "internal_error",
            )
        else:
            error = self._error(exc)
            self._site.closed("malformed", error)
            status, body = error.status, error.body()
        if request.writer.output_size > 0:
            # Part of an answer went out: no other can follow (aiohttp's own rule).
            raise ConnectionError("an answer was under way; the connection is closed")
        response = web.Response(
            body=dumps_bytes(body), status=status, content_type="application/json"
        )
        response.force_close()
        return response

    def _error(self, exc: BaseException | None) -> LMBridgeError:
        return http_error(
            exc,
            request_line_too_long=self._line_too_long,
            max_line_size=self.max_line_size,
            max_headers=self.max_headers,
        )

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if isinstance(kw.get("exc_info"), RequestPayloadError | LMBridgeError):
            # A body that failed (an encoding aiohttp cannot decode, or ended by a deadline
            # here) fails again when aiohttp reads its rest to discard it, after the
            # answer: the client was told already, no traceback is due.
            return
        super().log_exception(*args, **kw)

    # --- deadlines -----------------------------------------------------------------

    def _arm(self) -> None:
        """Make sure a timer fires by the deadline. A timer set for earlier is left: when
        it fires it looks again (so a busy connection costs no timer per request)."""
        when = self._clock.due()
        if when is None or self.transport is None:
            return
        timer = self._timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        self._timer = self._loop.call_at(when, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        deadline = self._clock.deadline()
        if deadline is None or self.transport is None:
            return
        if deadline.when > self._loop.time():
            self._arm()
            return
        if deadline.reason == "idle":
            self._site.closed("idle")
            self.force_close()
        elif deadline.reason == "header":
            self._site.closed("header_timeout")
            if self._clock.head_started:
                self.transport.write(
                    http_response(
                        RequestTimeout(
                            "The request's head (request line and headers) did not come "
                            f"within {self._clock.header_timeout:g}s (server.header_timeout)."
                        )
                    )
                )
            self.force_close()
        else:
            self._site.closed("body_timeout")
            self._fail_body(
                RequestTimeout(
                    f"The request body did not come within {self._clock.body_timeout:g}s "
                    "(server.body_timeout)."
                )
            )

    def _fail_body(self, exc: Exception) -> None:
        """End the body being received with ``exc``: its handler, reading it, raises it
        and answers, then the connection closes. Answered already (aiohttp is reading the
        rest to discard it), the connection is closed now."""
        body = self._body
        self._body = None
        self._clock.body_received()
        if body is None or not self._clock.unanswered:
            self.force_close()
            return
        body.set_exception(exc)
        body.feed_eof()  # no lingering read of the rest: it would raise ``exc`` again
        self.close()
        self._arm()


class RefusedConnection(asyncio.Protocol):
    """A connection beyond ``server.max_connections``: the 503 goes out at once, then the
    connection is closed when the client has read it (or after ``REFUSAL_LINGER``)."""

    def __init__(
        self, answer: bytes, *, linger: bool, done: Callable[[RefusedConnection], None]
    ) -> None:
        self._answer = answer
        self._linger = linger
        self._done = done
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.write(self._answer)
        if not (self._linger and transport.can_write_eof()):
            transport.close()
            return
        # Closed with the request unread, the connection would be reset and the client
        # might lose the 503: half-close, read what comes, close at its end.
        transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self.close)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # the transport closes itself

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._done(self)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


# --- running out of file descriptors --------------------------------------------------

_ACCEPT_FAILED = "socket.accept() out of system resource"


def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Callable[[], None]:
    """Log asyncio's "out of system resource" accept errors (out of file descriptors,
    mostly) as one line per interval instead of a traceback per attempt, up to 128 a
    second; everything else goes to the handler that was in place. Returns the function
    that puts that handler back."""
    previous = loop.get_exception_handler()
    gate = OncePerInterval()

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if context.get("message") != _ACCEPT_FAILED:
            if previous is not None:
                previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        count = gate()
        if count is None:
            return
        exc = context.get("exception")
        code = exc.errno if isinstance(exc, OSError) and exc.errno is not None else errno.EMFILE
        log.error(
            "cannot accept connections (%s): they wait until files are closed. Raise the "
            "open-file limit (LimitNOFILE, ulimit -n) or lower server.max_connections%s",
            os.strerror(code),
            times(count),
        )

    loop.set_exception_handler(handle)
    return lambda: loop.set_exception_handler(previous)
