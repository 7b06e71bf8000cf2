"""One MCP server, supervised: a task that owns its session, runs its calls, restarts it.

The SDK's ``Client`` must be entered and left in the same task, so callers never
touch it: ``call()`` hands the call to the supervisor task through a queue and
waits for its future. The task connects, lists the tools, then serves calls
(several at once on the one session) until the connection is lost: the server
process exited, the stream ended, or a call failed with "connection closed".
Then the calls in flight fail (the tool may or may not have run: never retried),
and the task reconnects, at once after a long-lived connection, with exponential
backoff and jitter after quick failures, up to ``mcp.restart_backoff_max``.

A server named by a request (``server_url``) may only redirect where
``mcp.remote_servers`` allows (transports.py checks each redirect).

Tool-list changes are picked up on both protocol eras: the older handshake sends a
``notifications/tools/list_changed`` message; the 2026 stateless protocol needs a
``listen`` subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import mcp.types as types
from mcp import Client, MCPError
from mcp.client.subscriptions import ListenNotSupportedError, SubscriptionLost
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

from proxy.config import MCPServerConfig
from proxy.mcp.remote_urls import RemoteURL
from proxy.mcp.transports import open_transport
from proxy.redact import redact_urls

log = logging.getLogger("lmbridge.mcp")

CONNECTION_CLOSED = -32000
REQUEST_TIMEOUT = -32001
# Errors about the call itself (bad params, unknown method, timeout): the session is fine.
CALL_LEVEL_CODES = frozenset({-32602, -32601, REQUEST_TIMEOUT})
CONNECT_TIMEOUT = 60.0  # npx may download a package on first start
RECONNECT_WAIT = 10.0
# A request waits for a server's retry only when it is due this soon (seconds).
BACKOFF_WAIT = 2.0
STABLE_AFTER = 10.0


class MCPUnavailable(Exception):
    """The server is not connected (starting, restarting or stopped): nothing was sent."""


class ConnectionLost(Exception):
    """The connection died during the call: the tool may or may not have run."""


class CallTimedOut(Exception):
    """The call took longer than the server's timeout."""


@dataclass(frozen=True, slots=True)
class ToolInfo:
    name: str
    description: str
    input_schema: dict[str, Any]
    read_only: bool | None
    annotations: dict[str, Any] | None

    @classmethod
    def from_sdk(cls, tool: types.Tool) -> ToolInfo:
        data = tool.model_dump(by_alias=True, mode="json", exclude_none=True)
        annotations = data.get("annotations")
        read_only = annotations.get("readOnlyHint") if isinstance(annotations, dict) else None
        return cls(
            name=tool.name,
            description=tool.description or "",
            input_schema=data.get("inputSchema") or {"type": "object", "properties": {}},
            read_only=read_only if isinstance(read_only, bool) else None,
            annotations=annotations if isinstance(annotations, dict) else None,
        )


@dataclass(eq=False)
class _Call:
    tool: str
    arguments: dict[str, Any]
    timeout: float
    future: asyncio.Future[dict[str, Any]]


_STOP = object()


class _Lost(Exception):
    """Leaves the session block to reconnect."""


@dataclass
class Supervisor:
    name: str
    config: MCPServerConfig
    log_dir: Path
    backoff_max: float = 60.0
    on_restart: Callable[[str], None] | None = None
    on_tools: Callable[[str, list[ToolInfo]], None] | None = None
    # For a server named by a request: which redirect targets may be followed.
    allows_redirect: Callable[[RemoteURL], bool] | None = None

    state: str = "stopped"  # stopped | connecting | ready | backoff
    tools: list[ToolInfo] = field(default_factory=list)
    last_error: str | None = None
    connects: int = 0
    _queue: asyncio.Queue[Any] = field(default_factory=asyncio.Queue)
    _task: asyncio.Task[None] | None = None
    _ready: asyncio.Event = field(default_factory=asyncio.Event)
    # Set (and replaced) at each connection attempt's outcome (ready, failed, stopped), so
    # that a caller waiting on a broken server learns it at once, not at its deadline.
    _outcome: asyncio.Event = field(default_factory=asyncio.Event)
    _retry_at: float = 0.0
    _stopping: bool = False
    _inflight: set[_Call] = field(default_factory=set)
    _connect_scope: anyio.CancelScope | None = None

    # --- used by request handlers ------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self.state = "connecting"
            self._task = asyncio.create_task(self._run(), name=f"mcp server {self.name}")

    async def ready(self, within: float) -> bool:
        """Start if needed and wait (bounded) for the outcome of the connection attempt
        under way and, when that fails, of one retry due within BACKOFF_WAIT."""
        self.start()
        outcomes = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not self._ready.is_set():
                    if self.state == "backoff" and (
                        outcomes >= 2 or self._retry_at - time.monotonic() > BACKOFF_WAIT
                    ):
                        break  # failing again and again: not worth holding the request
                    await self._outcome.wait()
                    outcomes += 1
        return self._ready.is_set()

    async def call(self, tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """The call's result in its JSON form (content, structuredContent, isError)."""
        if self._stopping:
            raise MCPUnavailable(f"the MCP server {self.name!r} is stopped")
        if self.state == "connecting":
            # Reconnecting after a lost connection: worth a short wait, not a failure.
            await self.ready(min(self.config.timeout, RECONNECT_WAIT))
        if self.state != "ready":
            raise MCPUnavailable(
                f"the MCP server {self.name!r} is not connected ({self.state}"
                + (f": {self.last_error}" if self.last_error else "")
                + ")"
            )
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Call(tool, arguments, self.config.timeout, future))
        return await future

    async def stop(self) -> None:
        self._stopping = True
        self._queue.put_nowait(_STOP)
        if self._connect_scope is not None:
            self._connect_scope.cancel()
        if self._task is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._task)
        self._task = None
        self.state = "stopped"

    # --- the supervisor task ----------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while not self._stopping:
            self.state = "connecting"
            lost = anyio.Event()
            started = time.monotonic()
            connected = False
            try:
                async with contextlib.AsyncExitStack() as stack:
                    transport = await self._transport(stack, lost)
                    # The connect deadline is an anyio scope around the session block (the
                    # SDK's own shutdown of a stdio child must not be cut by asyncio).
                    deadline = anyio.current_time() + CONNECT_TIMEOUT
                    with anyio.CancelScope(deadline=deadline) as scope:
                        self._connect_scope = scope
                        async with Client(
                            transport, mode="auto", message_handler=self._on_message
                        ) as client:
                            scope.deadline = math.inf
                            self._connect_scope = None
                            connected = True
                            await self._serve(client, lost, started)
                    self._connect_scope = None
                    if scope.cancelled_caught and not connected and not self._stopping:
                        raise TimeoutError(f"no answer within {CONNECT_TIMEOUT:g}s")
            except Exception as exc:  # every way a server can fail ends here
                leaf = _leaf(exc)
                if not self._stopping:
                    # Shown to clients and logged: an HTTP error quotes the URL it was for.
                    self.last_error = redact_urls(f"{type(leaf).__name__}: {leaf}".strip())
                    log.warning(
                        "MCP server %s: connection %s: %s",
                        self.name,
                        "lost" if connected else "failed",
                        self.last_error,
                    )
            finally:
                self._ready.clear()
                self._fail_inflight(
                    ConnectionLost(
                        f"the connection to the MCP server {self.name!r} was lost during the call"
                    )
                )
            if self._stopping:
                break
            if self.on_restart is not None:
                self.on_restart(self.name)
            if connected and time.monotonic() - started >= STABLE_AFTER:
                attempt = 0
                continue  # a long-lived connection: reconnect at once
            attempt += 1
            delay = min(self.backoff_max, 0.5 * 2 ** (attempt - 1)) * random.uniform(0.8, 1.2)
            self.state = "backoff"
            self._retry_at = time.monotonic() + delay
            self._settle_attempt()
            self._fail_queued(MCPUnavailable(f"the MCP server {self.name!r} is restarting"))
            log.info("MCP server %s: restarting in %.1fs", self.name, delay)
            await self._sleep_unless_stopped(delay)
        self.state = "stopped"
        self._settle_attempt()
        self._fail_queued(MCPUnavailable(f"the MCP server {self.name!r} is stopped"))

    async def _transport(self, stack: contextlib.AsyncExitStack, lost: anyio.Event) -> Any:
        """A new transport (not yet entered) for one connection attempt."""
        return await open_transport(
            self.config,
            log_file=self.log_dir / f"mcp-{self.name}.log",
            allows_redirect=self.allows_redirect,
            stack=stack,
            on_end=lambda: self._lost(lost),
        )

    async def _serve(self, client: Client, lost: anyio.Event, started: float) -> None:
        self._tools_dirty = anyio.Event()
        self.tools = await _all_tools(client)
        self.connects += 1
        self.last_error = None
        self.state = "ready"
        self._ready.set()
        self._settle_attempt()
        log.info(
            "MCP server %s: connected in %.0f ms (protocol %s), %d tools",
            self.name,
            (time.monotonic() - started) * 1000,
            client.protocol_version,
            len(self.tools),
        )
        if self.on_tools is not None:
            self.on_tools(self.name, self.tools)
        async with anyio.create_task_group() as group:

            async def watchdog() -> None:
                await lost.wait()
                self.state = "connecting"
                raise _Lost("connection lost")

            group.start_soon(watchdog)
            group.start_soon(self._refresh_tools, client)
            capabilities = client.server_capabilities.tools
            if (
                client.protocol_version in MODERN_PROTOCOL_VERSIONS
                and capabilities is not None
                and capabilities.list_changed
            ):
                group.start_soon(self._listen, client, lost)
            while True:
                item = await self._queue.get()
                if item is _STOP:
                    group.cancel_scope.cancel()
                    return
                group.start_soon(self._run_call, client, item, lost)

    async def _run_call(self, client: Client, call: _Call, lost: anyio.Event) -> None:
        if call.future.done():  # the caller gave up while it waited
            return
        self._inflight.add(call)
        try:
            result = await client.call_tool(
                call.tool, call.arguments, read_timeout_seconds=call.timeout
            )
        except MCPError as exc:
            if exc.code == CONNECTION_CLOSED:
                _settle(
                    call.future,
                    ConnectionLost(
                        f"the connection to the MCP server {self.name!r} closed during the call"
                    ),
                )
                self._lost(lost)
            elif exc.code == REQUEST_TIMEOUT:
                _settle(
                    call.future,
                    CallTimedOut(
                        f"no result within {call.timeout:g}s (mcp.servers.{self.name}.timeout)"
                    ),
                )
            else:
                _settle(call.future, exc)
                if exc.code not in CALL_LEVEL_CODES:
                    await self._probe(client, lost)
        except Exception as exc:
            _settle(call.future, exc)
        except BaseException:
            _settle(
                call.future,
                ConnectionLost(
                    f"the connection to the MCP server {self.name!r} was lost during the call"
                ),
            )
            raise
        else:
            _settle(call.future, result.model_dump(by_alias=True, mode="json", exclude_none=True))
        finally:
            self._inflight.discard(call)

    async def _probe(self, client: Client, lost: anyio.Event) -> None:
        if lost.is_set():
            return
        try:
            with anyio.fail_after(5):
                await client.list_tools(cache_mode="bypass")
        except Exception as exc:
            log.warning(
                "MCP server %s: health check failed (%s): reconnecting", self.name, _leaf(exc)
            )
            self._lost(lost)

    # --- tool-list changes ----------------------------------------------------

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            dirty = getattr(self, "_tools_dirty", None)
            if dirty is not None:
                dirty.set()

    async def _refresh_tools(self, client: Client) -> None:
        while True:
            await self._tools_dirty.wait()
            self._tools_dirty = anyio.Event()
            await anyio.sleep(0.05)  # one refresh for a burst of notifications
            self.tools = await _all_tools(client, refresh=True)
            log.info("MCP server %s: tool list changed, %d tools", self.name, len(self.tools))
            if self.on_tools is not None:
                self.on_tools(self.name, self.tools)

    async def _listen(self, client: Client, lost: anyio.Event) -> None:
        while True:
            try:
                async with client.listen(tools_list_changed=True) as subscription:
                    async for _ in subscription:
                        self._tools_dirty.set()
                return
            except ListenNotSupportedError:
                return
            except SubscriptionLost:
                # An idle HTTP listen stream ends at the read timeout: listen again, and
                # read the list in case a change was missed meanwhile.
                await self._probe(client, lost)
                self._tools_dirty.set()
                await anyio.sleep(0.5)

    # --- helpers ------------------------------------------------------------

    def _lost(self, lost: anyio.Event) -> None:
        """The connection is gone: no new call may take it from now on."""
        self._ready.clear()
        if not self._stopping:
            self.state = "connecting"
        lost.set()

    def _settle_attempt(self) -> None:
        event, self._outcome = self._outcome, asyncio.Event()
        event.set()

    def _fail_inflight(self, exc: Exception) -> None:
        for call in list(self._inflight):
            _settle(call.future, exc)
        self._inflight.clear()

    def _fail_queued(self, exc: Exception) -> None:
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is _STOP:
                self._stopping = True
            else:
                _settle(item.future, exc)

    async def _sleep_unless_stopped(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        while not self._stopping:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    item = await self._queue.get()
            except TimeoutError:
                return
            if item is _STOP:
                self._stopping = True
            else:
                _settle(item.future, MCPUnavailable(f"the MCP server {self.name!r} is restarting"))


async def _all_tools(client: Client, refresh: bool = False) -> list[ToolInfo]:
    tools: list[ToolInfo] = []
    cursor: str | None = None
    for _ in range(100):  # pages
        page = await client.list_tools(cursor=cursor, cache_mode="refresh" if refresh else "use")
        tools += [ToolInfo.from_sdk(tool) for tool in page.tools]
        cursor = page.next_cursor
        if cursor is None:
            break
    return tools


def _settle(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, BaseException):
        future.set_exception(value)
    else:
        future.set_result(value)


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc
