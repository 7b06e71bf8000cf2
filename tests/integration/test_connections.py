"""Client connections through the daemon's own listener (the ``serve`` fixture), with
real sockets on 127.0.0.1: read deadlines, the connection cap, and what each answers.

Timeouts are configured tiny so that a deadline passes quickly; nothing here asserts a
duration (``asyncio.wait_for`` only keeps a broken test from hanging).
"""

from __future__ import annotations

import asyncio
import json
import logging

from tests.fake_upstream import CHAT, Reply, chunk
from tests.raw_http import GUARD, HEALTHZ, connect, parse, read_response, until_closed


async def test_a_head_sent_in_part_gets_408_and_is_closed_after_the_header_timeout(serve):
    """A client that sends half its headers and stops gets a 408 in the OpenAI shape, then
    the connection is closed."""
    port = await serve(server__header_timeout=0.2)
    reader, writer = await connect(port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    status, headers, body = parse(await until_closed(reader))
    assert status == 408
    assert headers["content-type"] == "application/json"
    assert body["error"]["code"] == "request_timeout"
    assert "server.header_timeout" in body["error"]["message"]
    writer.close()


async def test_a_connection_that_sends_nothing_is_closed_after_the_header_timeout(serve):
    """A new connection owes its first head from the start: silent, it is closed without
    an answer."""
    port = await serve(server__header_timeout=0.2)
    reader, writer = await connect(port)
    assert await until_closed(reader) == b""
    writer.close()


async def test_a_trickled_body_gets_408_and_the_connection_is_closed(serve):
    """A body that keeps coming a byte at a time past server.body_timeout gets a 408, then
    the connection is closed."""
    port = await serve(server__body_timeout=0.2)
    reader, writer = await connect(port)
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
    )

    async def trickle() -> None:
        while not reader.at_eof():
            writer.write(b" ")
            await asyncio.sleep(0.02)  # a slow client, not a wait for the daemon

    trickling = asyncio.create_task(trickle())
    try:
        status, _, body = await read_response(reader)
    finally:
        trickling.cancel()
    assert status == 408
    assert body and json.loads(body)["error"]["code"] == "request_timeout"
    assert "server.body_timeout" in json.loads(body)["error"]["message"]
    await until_closed(reader)
    writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_the_idle_timeout(serve):
    """A keep-alive connection serves requests, then, idle, is closed after
    server.idle_timeout."""
    port = await serve(server__idle_timeout=0.2)
    reader, writer = await connect(port)
    for _ in range(2):
        writer.write(HEALTHZ)
        status, _, body = await read_response(reader)
        assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert await until_closed(reader) == b""
    writer.close()


async def test_beyond_max_connections_a_new_connection_gets_503_while_open_ones_answer(serve):
    """With server.max_connections open, one more gets a 503 in the OpenAI shape and is
    closed; /healthz on an open connection still answers."""
    port = await serve(server__max_connections=2)
    held = [await connect(port) for _ in range(2)]
    for reader, writer in held:  # admitted and served
        writer.write(HEALTHZ)
        assert (await read_response(reader))[0] == 200
    reader, writer = await connect(port)
    writer.write(HEALTHZ)
    status, headers, body = parse(await until_closed(reader))
    assert status == 503
    assert headers["retry-after"] == "1"
    assert body["error"]["code"] == "too_many_connections"
    assert "server.max_connections" in body["error"]["message"]
    writer.close()
    reader, writer = held[0]
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    for _, writer in held:
        writer.close()


async def test_a_closed_connection_frees_its_place(serve):
    """With the one allowed connection open a second is refused; once the first closes, a
    new one is admitted in its place."""
    port = await serve(server__max_connections=1)
    reader, writer = await connect(port)
    writer.write(HEALTHZ)
    assert (await read_response(reader))[0] == 200
    refused_reader, refused_writer = await connect(port)
    assert parse(await until_closed(refused_reader))[0] == 503
    refused_writer.close()
    writer.close()
    await writer.wait_closed()
    statuses = []
    # The daemon runs on this loop: it sees the close within a few turns of it, each
    # attempt below being several.
    for _ in range(20):
        reader, writer = await connect(port)
        writer.write(HEALTHZ)
        statuses.append((await read_response(reader))[0])
        writer.close()
        if statuses[-1] == 200:
            break
    assert statuses[-1] == 200, statuses


async def test_a_stream_outlasting_every_read_timeout_is_not_cut(serve, fake_upstream):
    """The read deadlines bound reading requests, never writing answers: a stream that
    runs past all of them ends normally."""
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("first"), release, chunk("second"), chunk(finish="stop")])
    )
    port = await serve(
        server__header_timeout=0.1, server__body_timeout=0.1, server__idle_timeout=0.1
    )
    reader, writer = await connect(port)
    body = json.dumps(
        {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await asyncio.wait_for(reader.readuntil(b'"first"'), GUARD)
    # A connection opened after the stream began is closed by its header deadline: by
    # then every deadline of the streaming connection would have passed too.
    probe_reader, probe_writer = await connect(port)
    await until_closed(probe_reader)
    probe_writer.close()
    release.set()
    rest = await asyncio.wait_for(reader.readuntil(b"data: [DONE]\n\n"), GUARD)
    assert b'"second"' in rest
    writer.close()


async def test_closed_connections_are_counted(serve):
    """/metrics counts open client connections and those lmbridge closed, by reason."""
    port = await serve(server__header_timeout=0.2, server__max_connections=2)
    reader, writer = await connect(port)
    await until_closed(reader)  # header_timeout
    writer.close()
    reader, writer = await connect(port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    _, _, text = await read_response(reader)
    assert b'lmbridge_client_connections_closed_total{reason="header_timeout"} 1.0' in text
    assert b"lmbridge_client_connections 1.0" in text
    writer.close()


async def test_refusals_are_logged_once_per_interval(serve, caplog):
    """Many refused connections make one log line, not one each."""
    port = await serve(server__max_connections=1)
    reader, writer = await connect(port)
    writer.write(HEALTHZ)
    await read_response(reader)
    with caplog.at_level(logging.INFO, logger="lmbridge.connections"):
        for _ in range(5):
            refused_reader, refused_writer = await connect(port)
            await until_closed(refused_reader)
            refused_writer.close()
    lines = [r for r in caplog.records if "refused a connection" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].exc_info is None
    writer.close()
