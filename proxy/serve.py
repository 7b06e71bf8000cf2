"""Running the daemon: start the embedded upstream if asked, bind, serve until
SIGTERM/SIGINT, then drain.

On a signal the listening socket closes first (no new connections), in-flight
requests and streams get up to ``server.shutdown_grace`` seconds to finish,
then whatever is left is cancelled and the app's resources are closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import resource
import signal
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from proxy.app import create_app
from proxy.config import Config, ServerConfig
from proxy.connections import plan_file_limit
from proxy.embedded import EmbeddedUpstream
from proxy.keys import METRICS
from proxy.listener import ClientSite, quiet_accept_errors
from proxy.redact import redact_url

log = logging.getLogger("lmbridge")


async def run(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until ``stop`` is set or a SIGTERM/SIGINT arrives; ``on_listening`` gets the
    base URL once the socket is bound (for a port 0)."""
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    embedded: EmbeddedUpstream | None = None
    try:
        if config.embedded.enabled:
            embedded = EmbeddedUpstream(
                config.embedded, config.storage.path.parent / "embedded-llama.log"
            )
            url = await embedded.start()
            config = config.model_copy(
                update={"upstream": config.upstream.model_copy(update={"url": url})}
            )
        app = create_app(config)
        max_connections = fit_file_limit(config)
        restore_handler = quiet_accept_errors(loop)
        try:
            async with listening(app, config.server, max_connections=max_connections) as runner:
                _tune_gc()
                addresses = ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses)
                log.info(
                    "lmbridge listening on %s (upstream %s)",
                    addresses,
                    redact_url(config.upstream.url),
                )
                if on_listening is not None:
                    host, port = runner.addresses[0][:2]
                    on_listening(f"http://{host}:{port}")
                await stop.wait()
                in_flight = app[METRICS].requests_in_flight()
                log.info(
                    "shutting down: %d request(s) in flight, waiting up to %gs",
                    in_flight,
                    config.server.shutdown_grace,
                )
        finally:
            restore_handler()
        log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if embedded is not None:
            await embedded.stop()


@contextlib.asynccontextmanager
async def listening(
    app: web.Application, server: ServerConfig, *, max_connections: int | None = None
) -> AsyncIterator[web.AppRunner]:
    """Serve ``app`` on ``server.host``:``server.port`` through lmbridge's own listener
    (read deadlines, at most ``max_connections`` clients) until the block ends, then let
    in-flight requests finish for ``server.shutdown_grace``."""
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,
        shutdown_timeout=server.shutdown_grace,
    )
    await runner.setup()
    try:
        site = ClientSite(runner, server, app[METRICS], max_connections=max_connections)
        await site.start()
        yield runner
    finally:
        await runner.cleanup()


def fit_file_limit(config: Config) -> int:
    """Raise the open-file soft limit to what server.max_connections needs beside the
    upstream pool, as far as the hard limit allows (systemd's default soft limit is
    1,024, macOS's 256); returns the client connections the limit leaves room for."""
    wanted_max = config.server.max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted_max
    upstream = config.upstream.max_connections
    unlimited = hard == resource.RLIM_INFINITY
    limit, room = plan_file_limit(wanted_max, upstream, soft, -1 if unlimited else hard)
    if limit > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
            log.info("raised the open-file limit from %d to %d", soft, limit)
        except (ValueError, OSError):
            limit, room = plan_file_limit(wanted_max, upstream, soft, soft)
    if room < wanted_max:
        log.warning(
            "the open-file limit (%d) leaves room for %d client connections, fewer than "
            "server.max_connections (%d): more are refused. Raise LimitNOFILE (systemd) or "
            "ulimit -n.",
            limit,
            room,
            wanted_max,
        )
    return room


# Young objects collected every this many net allocations instead of Python's 700.
GC_YOUNG_THRESHOLD = 10_000


def _tune_gc() -> None:
    """Set the garbage collector for a long-running server.

    What start-up built (modules, the app, pydantic's schemas: some 100,000
    objects) lives as long as the process, yet every older-generation collection
    walked it again; frozen, it is skipped. A request allocates hundreds of
    short-lived containers, so collecting the young generation every 700 meant
    several collections per request. Together worth 15% more proxied requests/s
    (docs/benchmarks.md); cycles made later are still collected."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)
