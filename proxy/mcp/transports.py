"""The transports of an MCP client session: stdio, SSE and streamable HTTP.

Each comes wrapped so that the end of its read stream (the server went away) is
noticed even when no call is running, and, for a server named by a request,
with a response hook that refuses redirects ``mcp.remote_servers`` does not
allow before the SDK can follow them.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx2
from mcp import StdioServerParameters
from mcp.client.sse import sse_client
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client

from proxy.config import MCPServerConfig
from proxy.mcp.remote_urls import RemoteURL, RemoteURLError, parse_url
from proxy.redact import redact_url


class RedirectRefused(Exception):
    """A server named by a request redirected where mcp.remote_servers does not allow."""


async def open_transport(
    config: MCPServerConfig,
    *,
    log_file: Path,
    allows_redirect: Callable[[RemoteURL], bool] | None,
    stack: contextlib.AsyncExitStack,
    on_end: Callable[[], None],
) -> Any:
    """A new transport (not yet entered) for one connection attempt; what it needs
    around it (the server's log file, the HTTP client) is closed with ``stack``.
    ``on_end`` is called when the server's stream ends."""
    kind = config.transport
    if kind == "auto":
        if config.command is not None:
            kind = "stdio"
        else:
            kind = "sse" if (config.url or "").rstrip("/").endswith("/sse") else "http"
    headers = {k: v.get_secret_value() for k, v in config.headers.items()}
    if kind == "stdio":
        assert config.command is not None
        params = StdioServerParameters(
            command=config.command,
            args=config.args,
            env={k: v.get_secret_value() for k, v in config.env.items()} or None,
            cwd=config.cwd,
        )
        log_file.parent.mkdir(parents=True, exist_ok=True)
        errlog = stack.enter_context(log_file.open("a"))
        return _watched(stdio_client(params, errlog=errlog), on_end)
    assert config.url is not None
    hooks = {} if allows_redirect is None else {"response": [_redirect_guard(allows_redirect)]}
    if kind == "sse":

        def sse_http(
            headers: dict[str, str] | None = None,
            timeout: httpx2.Timeout | None = None,
            auth: httpx2.Auth | None = None,
        ) -> httpx2.AsyncClient:
            return httpx2.AsyncClient(
                headers=headers, timeout=timeout, auth=auth, event_hooks=hooks
            )

        return _watched(
            sse_client(config.url, headers=headers, httpx_client_factory=sse_http),
            on_end,
        )
    # Headers go through an httpx2 client of our own, which the stack closes.
    http = await stack.enter_async_context(
        httpx2.AsyncClient(
            headers=headers,
            timeout=httpx2.Timeout(30.0, read=max(300.0, config.timeout)),
            event_hooks=hooks,
        )
    )
    return _watched(streamable_http_client(config.url, http_client=http), on_end)


class _WatchedReadStream:
    """The transport's read stream, noticing its end (the server went away) even when
    no call is running."""

    def __init__(self, inner: Any, on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_end = on_end

    @property
    def last_context(self) -> Any:
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        try:
            return await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise

    def __aiter__(self) -> _WatchedReadStream:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _WatchedReadStream:
        await self._inner.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        result: bool | None = await self._inner.__aexit__(*exc)
        return result


@asynccontextmanager
async def _watched(transport: Any, on_end: Callable[[], None]) -> AsyncIterator[Any]:
    async with transport as (read_stream, write_stream):
        yield _WatchedReadStream(read_stream, on_end), write_stream


def _redirect_guard(
    allows: Callable[[RemoteURL], bool],
) -> Callable[[httpx2.Response], Awaitable[None]]:
    """A response hook refusing a redirect whose target ``allows`` refuses; raised from
    inside the client's send, so the target is never contacted."""

    async def check(response: httpx2.Response) -> None:
        if not response.has_redirect_location:
            return
        location = response.headers["Location"]
        try:
            target = str(response.request.url.join(location))
            allowed = allows(parse_url(target))
        except (httpx2.InvalidURL, RemoteURLError):
            target, allowed = location, False
        if not allowed:
            raise RedirectRefused(
                f"the server redirected to {redact_url(target)}, which mcp.remote_servers "
                "does not allow; not followed"
            )

    return check
