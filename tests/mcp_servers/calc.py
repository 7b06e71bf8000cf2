"""A small MCP server for the tests, written with the SDK.

Run over stdio (``python calc.py``), streamable HTTP (``python calc.py http PORT``,
served at /mcp) or legacy SSE (``python calc.py sse PORT``, served at /sse). Its tools
cover what a tool loop meets: plain results, structured results, images, errors,
slowness, long output, and a way to die.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import sys

from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.types import ImageContent, TextContent, ToolAnnotations

server = MCPServer("calc")
TINY_PNG = base64.b64encode(
    bytes.fromhex(
        "89504e470d0a1a0a0000000d49484452000000010000000108060000001f15c489"
        "0000000d4944415478da63f8cfc0f01f0005000201e2f9a4340000000049454e44ae426082"
    )
).decode()


@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def echo(text: str) -> str:
    """Repeat the text."""
    return text


@server.tool()
def fail(reason: str = "boom") -> str:
    """Always raise."""
    raise RuntimeError(reason)


@server.tool()
async def slow(seconds: float) -> str:
    """Sleep, then answer."""
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


_running = 0


@server.tool()
async def overlap(seconds: float) -> int:
    """Sleep, and answer how many overlap calls ran at once (shows parallelism)."""
    global _running
    _running += 1
    at_start = _running
    try:
        await asyncio.sleep(seconds)
        return max(at_start, _running)
    finally:
        _running -= 1


@server.tool()
def big(chars: int) -> str:
    """A long text."""
    return "x" * chars


@server.tool()
def picture() -> list[ImageContent | TextContent]:
    """An image with a caption."""
    return [
        TextContent(type="text", text="a red dot"),
        ImageContent(type="image", data=TINY_PNG, mimeType="image/png"),
    ]


@server.tool()
def die() -> str:
    """Exit the server process at once (to test restarts)."""
    os._exit(3)


def triple(n: int) -> int:
    """Three times n (added at run time by grow)."""
    return 3 * n


@server.tool()
async def grow(ctx: Context) -> str:
    """Add the tool triple and announce that the tool list changed (both protocol eras)."""
    server.add_tool(triple)
    await ctx.notify_tools_changed()
    with contextlib.suppress(Exception):  # the legacy notification, where it exists
        await ctx.session.send_tool_list_changed()
    return "grown"


@server.tool()
def pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "http":
        server.run(transport="streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    elif len(sys.argv) >= 3 and sys.argv[1] == "sse":
        server.run(transport="sse", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
