"""The admin routes of the upstream's models, behind ``lmbridge ps``, ``load`` and
``unload``: ``GET /v1/lmbridge/models`` (what is loaded, by whom, idle for how long, the
requests running and queued), ``POST /v1/lmbridge/models/load {model, ttl?}`` and
``POST /v1/lmbridge/models/unload {model}``.

Like every /v1 route they need an API key when keys are configured, and the middleware's
browser checks apply: a page of another origin is refused, and a POST must carry a JSON
body, which no form or simple cross-origin request can send.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.catalog import ModelInfo
from proxy.config import parse_duration
from proxy.errors import BadRequest
from proxy.keys import CATALOG, LIFECYCLE, MODEL, QUEUES
from proxy.passthrough import json_type, read_json_object

ADMIN_PATH = "/v1/lmbridge/models"


def add_routes(app: web.Application) -> None:
    app.router.add_get(ADMIN_PATH, list_models)
    app.router.add_post(ADMIN_PATH + "/load", load_model)
    app.router.add_post(ADMIN_PATH + "/unload", unload_model)


async def list_models(request: web.Request) -> web.Response:
    await request.app[CATALOG].get()
    lifecycle = request.app[LIFECYCLE]
    queues = request.app[QUEUES].status()
    data = []
    for entry in lifecycle.loaded():
        queue = queues.get(entry["model"], {})
        entry["running"] = queue.get("running", 0)
        entry["queued"] = queue.get("queued", 0)
        data.append(entry)
    return web.json_response({"object": "list", "data": data, "loads_models": lifecycle.active})


async def load_model(request: web.Request) -> web.Response:
    body = await _admin_body(request, ("model", "ttl"))
    ttl = _ttl(body.get("ttl"))
    model = await _model(request, body)
    return web.json_response(await request.app[LIFECYCLE].load(model, ttl))


async def unload_model(request: web.Request) -> web.Response:
    body = await _admin_body(request, ("model",))
    model = await _model(request, body)
    lifecycle = request.app[LIFECYCLE]
    await lifecycle.unload(model)
    return web.json_response(lifecycle.describe(model.id))


async def _admin_body(request: web.Request, fields: tuple[str, ...]) -> dict[str, Any]:
    _, body = await read_json_object(request)
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(
            f"Unknown field {unknown[0]!r}; this route takes {', '.join(fields)}.",
            param=unknown[0],
        )
    return body


async def _model(request: web.Request, body: dict[str, Any]) -> ModelInfo:
    name = body.get("model")
    if not isinstance(name, str) or not name:
        shown = "missing" if name is None else json_type(name)
        raise BadRequest(f"'model' must be a model id (a string), not {shown}.", param="model")
    model = await request.app[CATALOG].resolve(name, "any")
    request[MODEL] = model.id
    return model


def _ttl(value: Any) -> float | None:
    """Seconds, or a duration such as "30m"; None when not given."""
    if value is None:
        return None
    try:
        seconds = parse_duration(value)
    except ValueError:
        seconds = None
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        raise BadRequest(
            "'ttl' must be a positive number of seconds or a duration such as \"30m\".",
            param="ttl",
        )
    return float(seconds)
