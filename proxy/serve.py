"""Running the daemon: start the embedded upstream if asked, bind, serve until
SIGTERM/SIGINT, then drain.

On a signal the listening socket closes first (no new connections), in-flight
requests and streams get up to ``server.shutdown_grace`` seconds to finish,
then whatever is left is cancelled and the app's resources are closed.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from proxy.app import create_app
from proxy.config import Config
from proxy.embedded import EmbeddedUpstream
from proxy.keys import METRICS
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
        runner = web.AppRunner(
            app,
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=config.server.shutdown_grace,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, config.server.host, config.server.port)
            await site.start()
            _tune_gc()
            addresses = ", ".join(f"http://{a[0]}:{a[1]}" for a in runner.addresses)
            log.info(
                "lmbridge listening on %s (upstream %s)", addresses, redact_url(config.upstream.url)
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
            await runner.cleanup()
        log.info("stopped")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if embedded is not None:
            await embedded.stop()


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
