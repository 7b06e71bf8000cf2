"""The MCP server of ``lmbridge bench``: one cheap tool over stdio, so that what the
MCP measurement times is lmbridge's loop and the protocol, not the tool."""

from __future__ import annotations

from mcp.server import MCPServer

server = MCPServer("bench")


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


if __name__ == "__main__":
    server.run()
