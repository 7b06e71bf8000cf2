"""Bytes aiohttp's HTTP parser rejects before any handler runs get the OpenAI error shape
with the right status, and leave no traceback in the log. Raw sockets on 127.0.0.1
through the daemon's own listener."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging

import pytest

from tests.raw_http import GUARD, connect, exchange, read_response

HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"
CHAT_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
)
TLS_CLIENT_HELLO = bytes.fromhex("16030100f8010000f40303") + bytes(64)


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        (HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
        (
            HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "headers_too_large",
        ),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", 414, "uri_too_long"),
        (
            CHAT_HEAD + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
            400,
            "malformed_request",
        ),
        (TLS_CLIENT_HELLO, 400, "tls_on_http_port"),
        (b"NOT HTTP AT ALL\r\n\r\n", 400, "malformed_request"),
        (HEAD + b"Content-Length: ten\r\n\r\n", 400, "malformed_request"),
    ],
    ids=[
        "header-over-8190",
        "too-many-headers",
        "url-over-8190",
        "bad-chunked",
        "tls",
        "garbage",
        "bad-content-length",
    ],
)
async def test_what_the_parser_rejects_is_answered_in_the_openai_shape(
    serve, caplog, request_bytes, status, code
):
    """Each is answered with its status and a JSON error in the OpenAI shape (not
    aiohttp's text/plain), logged as one line without a traceback."""
    port = await serve()
    with caplog.at_level(logging.DEBUG):
        got, headers, body = await exchange(port, request_bytes)
    assert got == status
    assert headers["content-type"].startswith("application/json")
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["type"] == "invalid_request_error"
    assert "aaaa" not in body["error"]["message"]  # the client's bytes are not echoed
    assert not [r for r in caplog.records if r.exc_info]
    assert [r.getMessage() for r in caplog.records if r.name == "lmbridge.connections"] == [
        f"answered {status} {code} to bytes that are not valid HTTP/1.1"
    ]


async def test_a_bad_chunk_after_the_head_fails_the_request_at_once(serve, caplog):
    """Chunked framing that breaks once the handler is reading the body gets a 400 in the
    OpenAI shape at once, instead of leaving the request waiting for the rest."""
    port = await serve()
    reader, writer = await connect(port)
    try:
        writer.write(CHAT_HEAD + b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"a":\r\n')
        await until_handling(port)
        with caplog.at_level(logging.DEBUG):
            writer.write(b"zz\r\nnot a chunk\r\n0\r\n\r\n")
            status, _, body = await read_response(reader)
            await asyncio.wait_for(reader.read(), GUARD)  # then the connection is closed
    finally:
        writer.close()
    assert status == 400
    error = json.loads(body)["error"]
    assert error["code"] == "malformed_request"
    assert "body" in error["message"]
    assert not [r for r in caplog.records if r.exc_info]


async def until_handling(port: int) -> None:
    """Return once a request is being handled (its head parsed, its handler reading the
    body), as /metrics says."""
    for _ in range(200):
        reader, writer = await connect(port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        _, _, text = await read_response(reader)
        writer.close()
        if b"lmbridge_requests_in_flight 2.0" in text:  # that one and /metrics itself
            return
    pytest.fail("the request was never handled")


async def test_a_body_in_an_encoding_that_cannot_be_decoded_is_a_400(serve, caplog):
    """A body that says gzip and is not: 400 in the OpenAI shape, not a 500 with a
    traceback."""
    port = await serve()
    broken = gzip.compress(b'{"model": "test-model"}')[:-8] + b"garbage!"
    with caplog.at_level(logging.DEBUG):
        status, _, body = await exchange(
            port,
            CHAT_HEAD + b"Content-Encoding: gzip\r\nConnection: close\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(broken), broken),
        )
    assert status == 400
    assert body["error"]["code"] == "malformed_request"
    assert not [r for r in caplog.records if r.exc_info]


async def test_malformed_requests_are_logged_once_per_interval(serve, caplog):
    """A client sending garbage again and again makes one log line, not one each."""
    port = await serve()
    with caplog.at_level(logging.INFO, logger="lmbridge.connections"):
        for _ in range(5):
            assert (await exchange(port, TLS_CLIENT_HELLO))[0] == 400
    assert len([r for r in caplog.records if r.name == "lmbridge.connections"]) == 1
