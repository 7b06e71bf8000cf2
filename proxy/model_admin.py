"""The admin routes of the upstream's models, behind ``lmbridge ps``, ``load`` and
``unload``: ``GET /v1/lmbridge/models`` (what is loaded, by whom, idle for how long, the
requests running and queued), ``POST /v1/lmbridge/models/load {model, ttl?}`` and
``POST /v1/lmbridge/models/unload {model}``. With several upstreams the list has each
upstream's models (an ``upstream`` field), and a load or unload goes to the ``upstream``
named, else to the first that lists the model.

Like every /v1 route they need an API key when keys are configured, and the middleware's
browser checks apply: a page of another origin is refused, and a POST must carry a JSON
body, which no form or simple cross-origin request can send.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from proxy.config import parse_duration
from proxy.errors import BadRequest
from proxy.jsontext import json_type
from proxy.keys import MODEL, UPSTREAMS
from proxy.model_records import ModelInfo
from proxy.passthrough import read_json_object
from proxy.upstreams import Upstream

ADMIN_PATH = "/v1/lmbridge/models"


def add_routes(app: web.Application) -> None:
    app.router.add_get(ADMIN_PATH, list_models)
    app.router.add_post(ADMIN_PATH + "/load", load_model)
    app.router.add_post(ADMIN_PATH + "/unload", unload_model)


async def list_models(request: web.Request) -> web.Response:
    pool = request.app[UPSTREAMS]
    await pool.catalog.get()
    data = []
    for upstream in pool.upstreams:
        queues = upstream.queues.status()
        for entry in upstream.lifecycle.loaded():
            queue = queues.get(entry["model"], {})
            entry["upstream"] = upstream.name
            entry["running"] = queue.get("running", 0)
            entry["queued"] = queue.get("queued", 0)
            data.append(entry)
    loads = any(u.lifecycle.active for u in pool.upstreams)
    return web.json_response({"object": "list", "data": data, "loads_models": loads})


async def load_model(request: web.Request) -> web.Response:
    body = await _admin_body(request, ("model", "ttl", "upstream"))
    ttl = _ttl(body.get("ttl"))
    upstream, model = await _target(request, body)
    entry = await upstream.lifecycle.load(model, ttl)
    return web.json_response({**entry, "upstream": upstream.name})


async def unload_model(request: web.Request) -> web.Response:
    body = await _admin_body(request, ("model", "upstream"))
    upstream, model = await _target(request, body)
    await upstream.lifecycle.unload(model)
    return web.json_response({**upstream.lifecycle.describe(model.id), "upstream": upstream.name})


async def _admin_body(request: web.Request, fields: tuple[str, ...]) -> dict[str, Any]:
    _, body = await read_json_object(request)
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise BadRequest(
            f"Unknown field {unknown[0]!r}; this route takes {', '.join(fields)}.",
            param=unknown[0],
        )
    return body


async def _target(request: web.Request, body: dict[str, Any]) -> tuple[Upstream, ModelInfo]:
    """The upstream and model an admin action is for: the upstream named, else the first
    that lists the model; the model as that upstream lists it."""
    name = body.get("model")
    if not isinstance(name, str) or not name:
        shown = "missing" if name is None else json_type(name)
        raise BadRequest(f"'model' must be a model id (a string), not {shown}.", param="model")
    pool = request.app[UPSTREAMS]
    wanted = body.get("upstream")
    if wanted is not None and (not isinstance(wanted, str) or wanted not in pool.by_name):
        raise BadRequest(
            f"'upstream' must name one of the upstreams: {', '.join(pool.by_name)}.",
            param="upstream",
        )
    model = await pool.catalog.resolve(name, "any")
    request[MODEL] = model.id
    upstream = pool.upstream_of(wanted, model)
    return upstream, upstream.listed(model.id) or model


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
