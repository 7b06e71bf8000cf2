"""calc.py served over the network (streamable HTTP or legacy SSE) on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

CALC = str(Path(__file__).with_name("calc.py"))
PATHS = {"http": "/mcp", "sse": "/sse"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for_port(port: int) -> None:
    """Until something accepts connections on 127.0.0.1:port (at most 20 s)."""
    for _ in range(400):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def served_calc(transport: str) -> AsyncIterator[str]:
    """Yields the server's URL once it accepts connections."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        CALC,
        transport,
        str(port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port)
        yield f"http://127.0.0.1:{port}{PATHS[transport]}"
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 3)
        except TimeoutError:  # uvicorn waits for the clients' open streams to close
            process.kill()
            await process.wait()
