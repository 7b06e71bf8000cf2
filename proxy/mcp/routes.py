"""lmbridge's own route about its MCP servers (not part of OpenAI's API): what
`lmbridge mcp`'s list_mcp_servers tool and other clients read."""

from __future__ import annotations

from aiohttp import web

from proxy.keys import MCP


async def list_servers(request: web.Request) -> web.Response:
    """GET /v1/mcp/servers: every configured server, its state and its tools."""
    return web.json_response({"object": "list", "data": request.app[MCP].describe()})
