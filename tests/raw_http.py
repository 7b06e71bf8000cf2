"""HTTP/1.1 by hand over asyncio streams, for tests that send what no client library
would (half a head, a trickled body, TLS bytes) and read what comes back."""

from __future__ import annotations

import asyncio
import json
from typing import Any

GUARD = 10.0  # seconds before a test that waits for the daemon gives up
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the daemon sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), GUARD)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, leaving the connection open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), GUARD)
    status_line, *lines = head.decode().split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return int(status_line.split()[1]), headers, body


def parse(raw: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Status, headers (lower-case names) and JSON body of one whole response."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode().split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines)}
    return int(status_line.split()[1]), headers, json.loads(body)


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], dict[str, Any]]:
    """Send ``data`` on a new connection; the one answer, read to the connection's end."""
    reader, writer = await connect(port)
    writer.write(data)
    try:
        return parse(await until_closed(reader))
    finally:
        writer.close()
