"""The daemon's HTTP API as the MCP server uses it: JSON in, JSON out, and two errors
that say what went wrong in one line."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from proxy.sse import SSEParser

START_HINT = (
    "start it with `lmbridge serve` (or its service: see docs/operations.md), point "
    "`lmbridge mcp --url` at it, or run `lmbridge mcp --standalone`"
)


class DaemonUnreachable(Exception):
    """No daemon answers at the URL."""


class DaemonError(Exception):
    """The daemon answered with an error (in the OpenAI shape)."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code


class DaemonClient:
    def __init__(self, base_url: str, api_key: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        # No total timeout: a chat may take minutes on a slow machine; delegate bounds
        # its own wait. Connecting is quick or not at all.
        self._session = aiohttp.ClientSession(
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=None, connect=5, sock_connect=5),
        )

    async def close(self) -> None:
        await self._session.close()

    async def get(self, path: str, *, errors_ok: bool = False) -> dict[str, Any]:
        """``errors_ok``: an error status still returns the body (for /readyz)."""
        return await self._request("GET", path, None, errors_ok)

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return await self._request("POST", path, body, False)

    async def events(self, path: str, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """POST with ``stream: true``: the events, as they come."""
        try:
            async with self._session.post(self.base_url + path, json=body) as resp:
                if resp.status >= 400:
                    raise _error(resp.status, await resp.read())
                parser = SSEParser()
                async for chunk in resp.content.iter_any():
                    for event in parser.feed(chunk):
                        if not event.is_done:
                            yield event.json()
                for event in parser.finish():
                    if not event.is_done:
                        yield event.json()
        except aiohttp.ClientConnectionError as exc:
            raise DaemonUnreachable(self._unreachable(exc)) from exc

    async def _request(
        self, method: str, path: str, body: dict[str, Any] | None, errors_ok: bool
    ) -> dict[str, Any]:
        try:
            async with self._session.request(method, self.base_url + path, json=body) as resp:
                raw = await resp.read()
        except aiohttp.ClientConnectionError as exc:
            raise DaemonUnreachable(self._unreachable(exc)) from exc
        if resp.status >= 400 and not errors_ok:
            raise _error(resp.status, raw)
        try:
            parsed = json.loads(raw)
        except ValueError as exc:
            raise DaemonError(resp.status, f"the daemon sent a non-JSON answer to {path}") from exc
        if not isinstance(parsed, dict):
            raise DaemonError(resp.status, f"the daemon sent an unexpected answer to {path}")
        return parsed

    def _unreachable(self, exc: Exception) -> str:
        if isinstance(exc, aiohttp.ClientConnectorError):
            refused = isinstance(exc.os_error, ConnectionRefusedError)
            why = "connection refused" if refused else "cannot connect"
        elif isinstance(exc, aiohttp.ServerDisconnectedError):
            why = "it closed the connection"
        else:
            why = type(exc).__name__
        return f"lmbridge is not reachable at {self.base_url} ({why}): {START_HINT}."


def _error(status: int, raw: bytes) -> DaemonError:
    try:
        error = json.loads(raw)["error"]
        return DaemonError(status, str(error["message"]), error.get("code"))
    except (ValueError, KeyError, TypeError):
        return DaemonError(status, f"the daemon answered {status}")
