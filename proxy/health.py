"""Operations routes: /healthz (the process answers), /readyz (it can serve),
/metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.breaker import CircuitState
from proxy.errors import LMBridgeError
from proxy.keys import CATALOG, MCP, METRICS, QUEUES, STORE, UPSTREAM
from storage.sqlite import StorageError

# /readyz may be polled every second; the model list proves the upstream
# answers and is reused for this long.
READY_MAX_AGE = 5.0
READY_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    upstream = app[UPSTREAM]
    checks: dict[str, dict[str, Any]] = {}

    state = upstream.breaker.state
    checks["circuit"] = {
        "ok": state is CircuitState.CLOSED,
        "state": state.name.lower().replace("_", "-"),
        "consecutive_failures": upstream.breaker.failures,
    }
    if state is CircuitState.OPEN:
        checks["circuit"]["retry_after_seconds"] = round(upstream.breaker.retry_after(), 1)

    try:
        async with asyncio.timeout(READY_TIMEOUT):
            models = await app[CATALOG].get(max_age=READY_MAX_AGE)
        checks["upstream"] = {
            "ok": True,
            "url": upstream.shown_url,
            "models": len(models.models),
            "api": models.dialect,
        }
    except (LMBridgeError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, LMBridgeError) else "timed out"
        checks["upstream"] = {"ok": False, "url": upstream.shown_url, "error": message}

    try:
        async with asyncio.timeout(READY_TIMEOUT):
            await app[STORE].ping()
        checks["storage"] = {"ok": True, "path": str(app[STORE].path)}
    except (StorageError, TimeoutError) as exc:
        checks["storage"] = {"ok": False, "path": str(app[STORE].path), "error": str(exc)}

    ready = all(check["ok"] for check in checks.values())
    # MCP servers are reported, not required: the daemon serves without them.
    mcp = app[MCP].status()
    failing = [name for name, check in checks.items() if not check["ok"]]
    body = {
        "status": "ready" if ready else "not_ready",
        "failing": failing,
        "checks": checks,
        "mcp_servers": mcp,
        # Reported, like MCP servers: a busy model is not a daemon that cannot serve.
        "model_queues": app[QUEUES].status(),
    }
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})
