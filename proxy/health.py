"""Operations routes: /healthz (the process answers), /readyz (it can serve),
/metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from proxy.breaker import CircuitState
from proxy.errors import LMBridgeError
from proxy.keys import MCP, METRICS, STORE, UPSTREAMS
from proxy.upstreams import Upstream
from storage.sqlite import StorageError

# /readyz may be polled every second; the model list proves the upstream
# answers and is reused for this long.
READY_MAX_AGE = 5.0
READY_TIMEOUT = 5.0


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    app = request.app
    pool = app[UPSTREAMS]
    checks: dict[str, dict[str, Any]] = {}
    if len(pool.upstreams) == 1:
        circuit, listed = await _upstream_checks(pool.first)
        checks["circuit"] = circuit
        checks["upstream"] = listed
        queues: dict[str, Any] = pool.first.queues.status()
    else:
        # Ready while one upstream can serve: the others' models are then missing, not
        # the daemon.
        each = await asyncio.gather(*(_upstream_checks(u) for u in pool.upstreams))
        upstreams = {
            u.name: {**listed, "circuit": circuit}
            for u, (circuit, listed) in zip(pool.upstreams, each, strict=True)
        }
        for entry in upstreams.values():
            entry["ok"] = entry["ok"] and entry["circuit"]["ok"]
        checks["upstreams"] = {
            "ok": any(entry["ok"] for entry in upstreams.values()),
            "upstreams": upstreams,
        }
        queues = {u.name: u.queues.status() for u in pool.upstreams}

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
        "model_queues": queues,
    }
    return web.json_response(body, status=200 if ready else 503)


async def _upstream_checks(upstream: Upstream) -> tuple[dict[str, Any], dict[str, Any]]:
    """One upstream's circuit, and whether its model list can be read now."""
    client = upstream.client
    state = client.breaker.state
    circuit: dict[str, Any] = {
        "ok": state is CircuitState.CLOSED,
        "state": state.name.lower().replace("_", "-"),
        "consecutive_failures": client.breaker.failures,
    }
    if state is CircuitState.OPEN:
        circuit["retry_after_seconds"] = round(client.breaker.retry_after(), 1)
    try:
        async with asyncio.timeout(READY_TIMEOUT):
            models = await upstream.catalog.get(max_age=READY_MAX_AGE)
        listed: dict[str, Any] = {
            "ok": True,
            "url": client.shown_url,
            "models": len(models.models),
            "api": models.dialect,
        }
    except (LMBridgeError, TimeoutError) as exc:
        message = exc.message if isinstance(exc, LMBridgeError) else "timed out"
        listed = {"ok": False, "url": client.shown_url, "error": message}
    return circuit, listed


async def metrics(request: web.Request) -> web.Response:
    m = request.app[METRICS]
    return web.Response(body=m.render(), headers={"Content-Type": m.content_type})
