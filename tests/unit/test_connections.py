"""The pure rules of client connections: read deadlines, log gates, the open-file limit,
raw answers, parser errors, and quiet accept errors."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import resource

import pytest
from aiohttp.http_exceptions import (
    BadHttpMessage,
    BadHttpMethod,
    InvalidHeader,
    LineTooLong,
    TransferEncodingError,
)

from proxy.connections import (
    RESERVED_FILES,
    Deadline,
    OncePerInterval,
    ReadClock,
    body_error,
    http_error,
    http_response,
    plan_file_limit,
)
from proxy.errors import RequestTimeout, TooManyConnections
from proxy.listener import quiet_accept_errors

HEADER, BODY, IDLE = 10.0, 60.0, 120.0


def new_clock(now: float = 0.0) -> ReadClock:
    return ReadClock(HEADER, BODY, IDLE, now)


def test_a_new_connection_owes_its_first_head_from_its_opening():
    """A connection that sends nothing must have sent a head header_timeout after it
    opened, and has started none."""
    c = new_clock(5.0)
    assert c.deadline() == Deadline(15.0, "header")
    assert not c.head_started


def test_a_head_in_part_keeps_its_deadline():
    """Bytes of a head do not extend its deadline."""
    c = new_clock(0.0)
    c.head_bytes(3.0)
    c.head_bytes(9.0)
    assert c.deadline() == Deadline(10.0, "header")
    assert c.head_started


def test_a_body_is_timed_from_the_end_of_its_head():
    """Once a head with a body is in, the body has body_timeout; then nothing is timed
    until the answer is written."""
    c = new_clock(0.0)
    c.head_received(2.0, body_follows=True)
    assert c.deadline() == Deadline(62.0, "body")
    c.body_received()
    assert c.deadline() is None


def test_an_answer_is_never_timed():
    """While a request is answered (a stream of minutes included) there is no deadline."""
    c = new_clock(0.0)
    c.head_received(1.0, body_follows=False)
    assert c.deadline() is None


def test_after_an_answer_the_connection_is_idle_then_owes_a_head_from_its_first_byte():
    """After an answer, idle_timeout runs until a byte comes; then header_timeout from
    that byte."""
    c = new_clock(0.0)
    c.head_received(1.0, body_follows=False)
    c.answered(4.0)
    assert c.deadline() == Deadline(124.0, "idle")
    c.head_bytes(100.0)
    assert c.deadline() == Deadline(110.0, "header")


def test_a_head_begun_during_an_answer_is_timed_from_the_answers_end():
    """Bytes of a next head that come while a request is answered start its header time
    when the answer ends (a pipelining client is not cut mid-answer)."""
    c = new_clock(0.0)
    c.head_received(1.0, body_follows=False)
    c.head_bytes(2.0)
    assert c.deadline() is None
    c.answered(50.0)
    assert c.deadline() == Deadline(60.0, "header")
    assert c.head_started


def test_pipelined_requests_are_answered_before_the_connection_is_idle():
    """Two heads parsed at once: the connection is idle only once both are answered."""
    c = new_clock(0.0)
    c.head_received(1.0, body_follows=False)
    c.head_received(1.0, body_follows=False)
    c.answered(2.0)
    assert c.deadline() is None
    c.answered(3.0)
    assert c.deadline() == Deadline(123.0, "idle")


def test_a_body_still_coming_after_its_answer_stays_timed():
    """A request answered without reading its body (a 401, a 404) leaves the body's
    deadline running while aiohttp reads the rest to discard it."""
    c = new_clock(0.0)
    c.head_received(1.0, body_follows=True)
    c.answered(2.0)
    assert c.deadline() == Deadline(61.0, "body")


def test_the_log_gate_lets_one_line_through_per_interval_with_the_count():
    """The first event is logged; the next ones in the interval are counted into the first
    line after it."""
    now = [0.0]
    gate = OncePerInterval(60.0, clock=lambda: now[0])
    assert gate() == 1
    assert [gate() for _ in range(5)] == [None] * 5
    now[0] = 59.9
    assert gate() is None
    now[0] = 60.0
    assert gate() == 7
    assert gate() is None


@pytest.mark.parametrize(
    ("max_connections", "upstream", "soft", "hard", "expected"),
    [
        # Enough already: nothing changes.
        (512, 256, 4096, 4096, (4096, 512)),
        # systemd's 1,024 with a higher hard limit: raised to what is needed.
        (1000, 256, 1024, 524288, (1000 + 256 + RESERVED_FILES, 1000)),
        # macOS's 256, hard unlimited.
        (512, 256, 256, -1, (512 + 256 + RESERVED_FILES, 512)),
        # A hard limit of 1,024: what it leaves beside the pool and lmbridge's own files.
        (1000, 256, 1024, 1024, (1024, 1024 - 256 - RESERVED_FILES)),
        # A tiny limit under a large pool: clients keep a quarter of it.
        (512, 256, 256, 256, (256, 64)),
    ],
)
def test_the_open_file_limit_is_raised_or_the_connections_lowered(
    max_connections, upstream, soft, hard, expected
):
    """The soft limit is raised to fit the client connections, the upstream pool and
    lmbridge's own files as far as the hard limit allows; else fewer clients fit."""
    assert plan_file_limit(max_connections, upstream, soft, hard) == expected


def test_a_raw_answer_is_complete_http_with_the_openai_error():
    """An answer written before any request exists is HTTP/1.1 with a JSON error body, a
    length, Connection: close, and Retry-After when the error has one."""
    raw = http_response(TooManyConnections("full"))
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert "Connection: close" in lines
    assert "Retry-After: 1" in lines
    assert f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {
        "error": {
            "message": "full",
            "type": "server_error",
            "param": None,
            "code": "too_many_connections",
        }
    }
    assert not any(
        line.startswith("Retry-After")
        for line in http_response(RequestTimeout("slow")).decode().split("\r\n")
    )


async def test_out_of_file_descriptors_is_one_log_line_per_interval_without_traceback(caplog):
    """asyncio's accept error (EMFILE), reported up to 128 times a second, becomes one
    line per interval with no traceback; other loop errors still reach the old handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict] = []
    loop.set_exception_handler(lambda loop, context: seen.append(context))
    restore = quiet_accept_errors(loop)
    try:
        with caplog.at_level(logging.ERROR, logger="lmbridge.connections"):
            for _ in range(300):
                loop.call_exception_handler(
                    {
                        "message": "socket.accept() out of system resource",
                        "exception": OSError(errno.EMFILE, "Too many open files"),
                    }
                )
            loop.call_exception_handler({"message": "something else"})
    finally:
        restore()
    lines = [r for r in caplog.records if r.name == "lmbridge.connections"]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    assert "Too many open files" in lines[0].getMessage()
    assert [c["message"] for c in seen] == ["something else"]
    loop.call_exception_handler({"message": "after"})
    assert seen[-1]["message"] == "after"
    loop.set_exception_handler(None)


def test_serve_raises_the_soft_file_limit_for_its_connections(monkeypatch, make_config):
    """Under a soft limit too small for server.max_connections, serve raises it (within
    the hard limit) and keeps every connection it was asked for."""
    from proxy import serve

    limits = {"soft": 1024, "hard": 524288}
    monkeypatch.setattr(resource, "getrlimit", lambda _: (limits["soft"], limits["hard"]))
    monkeypatch.setattr(resource, "setrlimit", lambda _, value: limits.update(soft=value[0]))
    config = make_config(server__max_connections=2000)
    assert serve.fit_file_limit(config) == 2000
    assert limits["soft"] == 2000 + config.upstream.max_connections + RESERVED_FILES


def test_serve_lowers_its_connections_to_what_the_file_limit_allows(
    monkeypatch, make_config, caplog
):
    """When the hard limit is too small, serve keeps fewer connections and says so in
    one warning naming the settings to change."""
    from proxy import serve

    monkeypatch.setattr(resource, "getrlimit", lambda _: (1024, 1024))
    monkeypatch.setattr(resource, "setrlimit", lambda *_: pytest.fail("nothing to raise"))
    config = make_config(server__max_connections=2000)
    with caplog.at_level(logging.WARNING, logger="lmbridge"):
        room = serve.fit_file_limit(config)
    assert room == 1024 - config.upstream.max_connections - RESERVED_FILES
    (line,) = [r.getMessage() for r in caplog.records]
    assert "server.max_connections" in line and "LimitNOFILE" in line


@pytest.mark.parametrize(
    ("exc", "line_too_long", "status", "code"),
    [
        (LineTooLong(b"x" * 100, 8190), True, 414, "uri_too_long"),
        (LineTooLong(b"x" * 100, 8190), False, 431, "headers_too_large"),
        (BadHttpMessage("Too many headers received"), False, 431, "headers_too_large"),
        (
            BadHttpMethod(error="Received HTTPS traffic on an HTTP port"),
            False,
            400,
            "tls_on_http_port",
        ),
        (InvalidHeader(b"Bearer sk-secret\x00"), False, 400, "malformed_request"),
        (
            BadHttpMessage("Invalid character in chunk size:\n\n  b'sk-secret'\n    ^"),
            False,
            400,
            "malformed_request",
        ),
        (None, False, 400, "malformed_request"),
    ],
    ids=["url", "header", "header-count", "tls", "invalid-header", "chunk", "unknown"],
)
def test_what_the_parser_rejects_maps_to_a_status_and_code(exc, line_too_long, status, code):
    """Each parser error has its status and code, and the message never quotes the
    client's bytes."""
    error = http_error(
        exc, request_line_too_long=line_too_long, max_line_size=8190, max_headers=128
    )
    assert (error.status, error.code) == (status, code)
    assert "sk-secret" not in error.message
    assert "xxx" not in error.message


def test_a_body_that_cannot_be_read_is_a_400_saying_why():
    """A body aiohttp could not decode is a malformed request, with aiohttp's reason and
    none of the bytes."""
    error = body_error(TransferEncodingError("Invalid character in chunk size:\n  b'secret'"))
    assert (error.status, error.code) == (400, "malformed_request")
    assert error.message == "The request body could not be read: Invalid character in chunk size."
