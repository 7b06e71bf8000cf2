"""Running `lmbridge mcp`: against a daemon at a URL, or with the daemon's app in this
process (``--standalone``), over stdio or streamable HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Literal

from mcp.server.transport_security import TransportSecuritySettings

from proxy import serve
from proxy.bridge.client import DaemonClient
from proxy.bridge.server import Settings, build_server
from proxy.config import Config
from proxy.redact import redact_url

log = logging.getLogger("lmbridge.bridge")

Transport = Literal["stdio", "http"]


def daemon_url(config: Config) -> str:
    """bridge.url, else where this configuration's daemon listens."""
    if config.bridge.url:
        return config.bridge.url
    host = config.server.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{config.server.port}"


def daemon_key(config: Config) -> str | None:
    """bridge.api_key, else the first client key of this configuration's daemon."""
    key = config.bridge.api_key or next(iter(config.auth.api_keys), None)
    return key.get_secret_value() if key is not None else None


def transport_security(config: Config) -> TransportSecuritySettings:
    """The HTTP transport answers only to loopback names and the exact names of
    server.allowed_hosts, and only to browser origins of server.cors_origins: the MCP
    specification asks servers to check Origin so that web pages cannot drive them. The
    bridge holds the daemon's key, so no origin wildcard is honoured here."""
    names = [h for h in config.server.allowed_hosts if h not in ("*",) and not h.startswith(".")]
    hosts = ["127.0.0.1", "localhost", "[::1]", *names]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[form for host in hosts for form in (host, f"{host}:*")],
        allowed_origins=[o for o in config.server.cors_origins if o != "*"],
    )


async def run(config: Config, transport: Transport, port: int, *, standalone: bool) -> None:
    stop = asyncio.Event()
    daemon: asyncio.Task[None] | None = None
    if standalone:
        local = config.server.model_copy(update={"host": "127.0.0.1", "port": 0})
        own = config.model_copy(update={"server": local})
        listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        daemon = asyncio.create_task(serve.run(own, stop=stop, on_listening=listening.set_result))
        first: set[asyncio.Future[Any]] = {daemon, listening}
        await asyncio.wait(first, return_when=asyncio.FIRST_COMPLETED)
        if not listening.done():
            daemon.result()  # raises what stopped the daemon
            raise RuntimeError("the daemon stopped before it listened")
        url = listening.result()
    else:
        url = daemon_url(config)
    client = DaemonClient(url, daemon_key(config))
    server, delegations = build_server(
        client, Settings(config.bridge.result_max_chars, config.bridge.wait_seconds)
    )
    log.info(
        "lmbridge mcp: %s transport, daemon %s%s",
        transport,
        redact_url(url),
        " (in this process)" if standalone else "",
    )
    if transport == "stdio":
        serving = asyncio.create_task(server.run_stdio_async())
    else:
        serving = asyncio.create_task(
            server.run_streamable_http_async(
                host="127.0.0.1", port=port, transport_security=transport_security(config)
            )
        )
    try:
        watched = {serving} if daemon is None else {serving, daemon}
        await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
    finally:
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await serving
        await delegations.close()
        await client.close()
        if daemon is not None:
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await daemon
    if serving.done() and not serving.cancelled() and serving.exception() is not None:
        raise serving.exception()  # type: ignore[misc]
