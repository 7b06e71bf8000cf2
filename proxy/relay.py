"""The relay of every route lmbridge does not serve itself: Anthropic's ``/v1/messages``
(LM Studio 0.4.1+, llama.cpp), ``/tokenize``, ``/v1/rerank``, ``/v1/audio/*``,
``/props``, ``/slots`` and whatever else the upstream serves.

Flow: the middleware sends here a request no route matched whose path is not one of
lmbridge's own (``relay_rules.is_own_path``), after the browser checks and the client
key -> the body read; a JSON object naming ``model`` has it resolved like on every route
(404 ``model_not_found``; an alias rewritten) -> the request sent upstream with the same
method, path, query and body, its end-to-end headers, through ``UpstreamClient.open``
(retries, circuit breaker; a method that is not idempotent is sent again only when no
connection could be made) -> the answer relayed as it comes, chunk by chunk, with its
status and headers. An error status is relayed the same way, by the middleware
(``UpstreamStatus`` keeps the answer as it came).

The answer is bytes of an API lmbridge does not speak (``event_stream.RelayedStream``):
an upstream that breaks off mid-answer cannot be told in the API's own shape, so the
connection is closed before the body's end instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from functools import partial

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from proxy.accounting import Metered, usage_in_body
from proxy.browsers import is_json_type
from proxy.errors import BadRequest, UpstreamStatus
from proxy.event_stream import REQUEST_ID_HEADER, RelayedStream
from proxy.jsontext import free_in_pieces, json_type
from proxy.keys import (
    API_KEYS,
    CATALOG,
    CLIENT_GONE,
    METERED,
    MODEL,
    OWNER,
    RELAYED,
    REQUEST_ID,
    ROUTE,
    UPSTREAMS,
    WORKER,
)
from proxy.model_records import ModelInfo
from proxy.passthrough import LARGE_BODY, parse_json, read_body, serialise
from proxy.queues import note_wait
from proxy.relay_rules import (
    IDEMPOTENT_METHODS,
    RELAYED_METHODS,
    client_headers,
    upstream_headers,
)
from proxy.upstream import UpstreamClient
from proxy.upstreams import Route

# What a relayed answer may not do in a browser: run as a page of lmbridge's origin,
# which web pages of that origin may call (docs/operations.md, "Security model").
_CONFINED = {"Content-Security-Policy": "sandbox", "X-Content-Type-Options": "nosniff"}


async def forward(request: web.Request) -> web.StreamResponse:
    if request.method not in RELAYED_METHODS:
        raise web.HTTPMethodNotAllowed(request.method, sorted(RELAYED_METHODS))
    raw = await read_body(request)
    model, raw = await _check_model(request, raw)
    if model is not None:
        request[METERED] = Metered("relay")
    pool = request.app[UPSTREAMS]
    if model is None:
        return await _send(request, raw, pool.first.client)  # no model: the first upstream
    route = request[ROUTE] = pool.route(model, pool.first.queues.priority(request[OWNER]))
    try:
        async with route:  # its slot held until the answer is relayed whole
            return await _send(request, raw, route)
    finally:
        note_wait(request, route)


async def _send(
    request: web.Request, raw: bytes, upstream: Route | UpstreamClient
) -> web.StreamResponse:
    pool = request.app[UPSTREAMS]
    url = request.rel_url  # never the host of an absolute-form request target
    target = url.raw_path + (f"?{url.raw_query_string}" if url.raw_query_string else "")
    headers = upstream_headers(
        request.headers.items(),
        # A client's token is for one server: passed on only when there is one.
        pass_credentials=not request.app[API_KEYS]
        and len(pool.upstreams) == 1
        and pool.first.config.api_key is None,
    )
    headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    resp = await upstream.open(
        request.method,
        target,
        body=raw or None,
        headers=headers,
        route=request[RELAYED],
        idempotent=request.method in IDEMPOTENT_METHODS,
    )
    return await _relay_answer(request, resp, upstream)


async def _check_model(request: web.Request, raw: bytes) -> tuple[ModelInfo | None, bytes]:
    """The model named and the body to send: a JSON body (a JSON type or none, as on
    every route) must parse, and the ``model`` it names must be one the upstream has;
    an alias is replaced by its target, the only change ever made to a relayed body."""
    content_type = request.headers.get("Content-Type")
    if not raw or raw.isspace() or (content_type is not None and not is_json_type(content_type)):
        return None, raw
    body = await parse_json(request, raw)
    if not isinstance(body, dict) or body.get("model") in (None, ""):
        return None, raw
    requested = body["model"]
    if not isinstance(requested, str):
        raise BadRequest(f"'model' must be a string, not {json_type(requested)}.", param="model")
    model = await request.app[CATALOG].resolve(requested, "any")
    request[MODEL] = model.id
    if model.id != requested:
        body["model"] = model.id
        raw = await serialise(request, body, len(raw))
    if len(raw) > LARGE_BODY:
        # Freed on the event loop, a million items would hold it for 0.1 s (passthrough).
        await request.app[WORKER].run(partial(free_in_pieces, body))
    return model, raw


async def _relay_answer(
    request: web.Request, resp: aiohttp.ClientResponse, upstream: Route | UpstreamClient
) -> web.StreamResponse:
    """The upstream's answer written to the client as it arrives."""
    length = resp.content_length if "Content-Encoding" not in resp.headers else None
    stream = RelayedStream(
        request,
        resp.status,
        client_answer_headers(resp.headers.items()),
        reason=resp.reason,
        content_length=length,
    )
    metered = request.get(METERED)
    tail = b""
    try:
        await stream.open()
        async with contextlib.aclosing(upstream.iter_chunks(resp)) as chunks:
            async for chunk in chunks:
                await stream.send_bytes(chunk)
                if metered is not None:
                    tail = (tail + chunk)[-_USAGE_TAIL:]
        if metered is not None and resp.content_type == "application/json":
            metered.add(usage_in_body(tail))
        return await stream.finish()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        request[CLIENT_GONE] = True
        # The client went away before the headers could be sent, or after.
        return stream.response or web.Response(status=499)
    finally:
        # Closes the upstream request unless its body came whole (then it was released
        # for the next request): a client gone, or cancelled, stops the generation.
        resp.close()


# A JSON answer's usage object is at its end (OpenAI, Anthropic): only the end is kept.
_USAGE_TAIL = 4096


def upstream_answer(error: UpstreamStatus) -> web.Response:
    """An error status of the upstream, for a relayed request: as it came."""
    headers = client_answer_headers(error.headers)
    return web.Response(body=error.raw, status=error.status, headers=headers)


def client_answer_headers(headers: Iterable[tuple[str, str]]) -> CIMultiDict[str]:
    """The upstream's answer headers for the client (``relay_rules.client_headers``),
    with what confines the answer in a browser."""
    kept: CIMultiDict[str] = CIMultiDict(client_headers(headers))
    kept.update(_CONFINED)
    return kept
