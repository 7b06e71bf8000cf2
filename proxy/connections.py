"""Client connections, the pure part: when a connection must have sent more, how many
connections the open-file limit leaves room for, what to answer bytes that are not
HTTP, answers written before any request exists, and log lines that must not flood. No
I/O; ``proxy.listener`` applies them to aiohttp's protocol.

A connection owes the daemon, in turn: the head of its first request (from its opening,
``server.header_timeout``), that request's body (``server.body_timeout``), nothing while
the request is answered (an answer, a stream of minutes included, is never timed), then,
idle, the first byte of its next request (``server.idle_timeout``) and that request's
head (``server.header_timeout`` from its first byte), and so on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    HttpProcessingError,
    InvalidHeader,
    LineTooLong,
)

from proxy.errors import (
    HeadersTooLarge,
    LMBridgeError,
    MalformedRequest,
    URITooLong,
)
from proxy.jsontext import dumps_bytes

Reason = Literal["header", "body", "idle"]

# A line about a repeated connection-level event (refused, timed out, malformed, out of
# file descriptors) at most this often: the first at once, the next with the count.
LOG_INTERVAL = 60.0

# Files the daemon keeps open besides client and upstream connections: its database and
# writer process, MCP servers' pipes, the embedded server, logs, the event loop's own.
RESERVED_FILES = 128


@dataclass(frozen=True, slots=True)
class Deadline:
    when: float
    reason: Reason


class ReadClock:
    """When one client connection must next have sent something, from what it did so far.

    The protocol tells it what happened, with the time; ``deadline`` is then the one
    timer to arm, or None while a request is being answered."""

    __slots__ = (
        "_body_since",
        "_busy_head",
        "_head_since",
        "_idle_since",
        "body_timeout",
        "head_started",
        "header_timeout",
        "idle_timeout",
        "unanswered",
    )

    def __init__(
        self, header_timeout: float, body_timeout: float, idle_timeout: float, now: float
    ) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.idle_timeout = idle_timeout
        # Heads parsed whose answers are not written yet.
        self.unanswered = 0
        # A new connection owes its first head from the start.
        self._head_since: float | None = now
        # Whether any byte of that head came (a silent connection is closed without a word).
        self.head_started = False
        self._body_since: float | None = None
        self._idle_since: float | None = None
        # Bytes of a next head came while a request was being answered.
        self._busy_head = False

    def head_bytes(self, now: float) -> None:
        """Bytes came that completed no head and belonged to no body."""
        if self.unanswered:
            self._busy_head = True
            return
        if self._head_since is None:
            self._head_since = now
            self._idle_since = None
        self.head_started = True

    def head_received(self, now: float, *, body_follows: bool) -> None:
        self.unanswered += 1
        self._head_since = None
        self._idle_since = None
        self.head_started = False
        self._busy_head = False
        if body_follows:
            self._body_since = now

    def body_received(self) -> None:
        self._body_since = None

    def answered(self, now: float) -> None:
        self.unanswered = max(0, self.unanswered - 1)
        if self.unanswered:
            return
        if self._busy_head:
            # The client began its next head during the answer; it has had the answer's
            # time, and gets the full header time from now.
            self._busy_head = False
            self._head_since = now
            self.head_started = True
        else:
            self._idle_since = now

    def due(self) -> float | None:
        """When the next deadline passes (``deadline`` says which), allocating nothing:
        it is asked after every read and every answer."""
        if self._body_since is not None:
            return self._body_since + self.body_timeout
        if self.unanswered:
            return None
        if self._head_since is not None:
            return self._head_since + self.header_timeout
        if self._idle_since is not None:
            return self._idle_since + self.idle_timeout
        return None

    def deadline(self) -> Deadline | None:
        when = self.due()
        if when is None:
            return None
        if self._body_since is not None:
            return Deadline(when, "body")
        return Deadline(when, "header" if self._head_since is not None else "idle")


class OncePerInterval:
    """Lets through one log line per interval for an event that may happen thousands of
    times a second (each line then says how many it stands for)."""

    __slots__ = ("_clock", "_next", "_quiet", "interval")

    def __init__(
        self, interval: float = LOG_INTERVAL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval = interval
        self._clock = clock
        self._next = float("-inf")
        self._quiet = 0

    def __call__(self) -> int | None:
        """None to stay quiet; else the number of events since the last line (this one
        included)."""
        now = self._clock()
        self._quiet += 1
        if now < self._next:
            return None
        self._next = now + self.interval
        count, self._quiet = self._quiet, 0
        return count


def times(count: int) -> str:
    """The note for a line that stands for several events."""
    if count <= 1:
        return ""
    return f" ({count} since the last report)"


def plan_file_limit(
    max_connections: int, upstream_connections: int, soft: int, hard: int
) -> tuple[int, int]:
    """The open-file soft limit to ask for, and how many client connections the limit
    leaves room for. ``hard`` < 0 means unlimited (RLIM_INFINITY)."""
    needed = max_connections + upstream_connections + RESERVED_FILES
    wanted = needed if hard < 0 else min(needed, hard)
    limit = max(soft, wanted)
    room = limit - upstream_connections - RESERVED_FILES
    # A pool that may take most of a small limit rarely does: leave clients a quarter.
    return limit, min(max_connections, max(room, limit // 4))


def http_response(error: LMBridgeError, extra_headers: Mapping[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 answer carrying ``error`` in the OpenAI shape, for a connection
    that has no request to answer through aiohttp (refused, or its head never came); the
    connection is closed after it."""
    body = dumps_bytes(error.body())
    headers = {
        "Content-Type": "application/json",
        "Content-Length": str(len(body)),
        "Connection": "close",
    }
    if error.retry_after:
        headers["Retry-After"] = str(max(1, round(error.retry_after)))
    headers.update(extra_headers or {})
    status = HTTPStatus(error.status)
    head = f"HTTP/1.1 {status.value} {status.phrase}\r\n" + "".join(
        f"{name}: {value}\r\n" for name, value in headers.items()
    )
    return (head + "\r\n").encode("ascii") + body


def http_error(
    exc: BaseException | None,
    *,
    request_line_too_long: bool,
    max_line_size: int,
    max_headers: int,
) -> LMBridgeError:
    """What to answer a request head aiohttp's HTTP parser rejected (no handler sees it).
    Messages never quote the client's bytes: they may hold a key."""
    if isinstance(exc, LineTooLong):
        if request_line_too_long:
            return URITooLong(
                f"The request line (method, URL, version) is longer than the {max_line_size} "
                "bytes lmbridge reads; send long parameters in the JSON body."
            )
        return HeadersTooLarge(
            f"A request header is longer than the {max_line_size} bytes lmbridge reads."
        )
    text = exc.message if isinstance(exc, HttpProcessingError) else ""
    if isinstance(exc, BadHttpMessage) and text.startswith("Too many headers"):
        return HeadersTooLarge(
            f"The request has more than the {max_headers} headers lmbridge reads."
        )
    if isinstance(exc, BadHttpMethod) and "HTTPS" in text:
        return MalformedRequest(
            "This port speaks plain HTTP and received TLS: use http://, not https://, for "
            "lmbridge (or put a TLS proxy in front of it).",
            code="tls_on_http_port",
        )
    return MalformedRequest(f"The request is not valid HTTP/1.1: {_reason(exc)}.")


def body_error(exc: BaseException | None) -> MalformedRequest:
    """What to answer a request whose body aiohttp's parser could not read: broken chunked
    framing, an encoding it cannot decode."""
    return MalformedRequest(f"The request body could not be read: {_reason(exc)}.")


def _reason(exc: BaseException | None) -> str:
    if isinstance(exc, InvalidHeader):
        return "a header holds a character HTTP does not allow"
    if not isinstance(exc, HttpProcessingError):
        return "it is not valid HTTP/1.1"
    # aiohttp's wording up to its first colon: after it come the client's bytes.
    return exc.message.split(":", 1)[0].strip().rstrip(".")[:200] or "it is not valid HTTP/1.1"
