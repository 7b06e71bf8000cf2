"""HTTP routes of the Responses and Conversations APIs: parse, call the service, render.

Streams go through ``proxy.event_stream`` (SSE, ``event: <type>`` plus one ``data:``
line per event, ending with ``data: [DONE]``, which the Open Responses spec expects and
the OpenAI SDKs ignore); an error after a stream began is ended there by the
middleware, with the API's ``error`` event.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

from aiohttp import web

from proxy.errors import BadRequest, ItemLimit
from proxy.event_stream import EventStream
from proxy.jsontext import dumps
from proxy.keys import (
    CATALOG,
    CONFIG,
    CONVERSATIONS,
    MODEL,
    OWNER,
    RESPONSES,
    ROUTE,
    SCHEMA,
    WARNING,
)
from proxy.passthrough import read_body, read_json_object
from proxy.queues import note_wait
from proxy.responses.input_items import input_limit
from proxy.responses.objects import deleted
from proxy.responses.output_items import Event
from proxy.responses.websocket import add_socket_route

JSON = "application/json"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/responses", create_response)
    add_socket_route(app)
    r.add_post("/v1/responses/input_tokens", input_tokens)
    r.add_post("/v1/responses/compact", compact)
    r.add_get("/v1/responses/{response_id}", get_response)
    r.add_delete("/v1/responses/{response_id}", delete_response)
    r.add_post("/v1/responses/{response_id}/cancel", cancel_response)
    r.add_get("/v1/responses/{response_id}/input_items", list_input_items)
    r.add_post("/v1/conversations", create_conversation)
    r.add_get("/v1/conversations/{conversation_id}", get_conversation)
    r.add_post("/v1/conversations/{conversation_id}", update_conversation)
    r.add_delete("/v1/conversations/{conversation_id}", delete_conversation)
    r.add_post("/v1/conversations/{conversation_id}/items", add_items)
    r.add_get("/v1/conversations/{conversation_id}/items", list_items)
    r.add_get("/v1/conversations/{conversation_id}/items/{item_id}", get_item)
    r.add_delete("/v1/conversations/{conversation_id}/items/{item_id}", delete_item)


def _json_text(text: str, status: int = 200) -> web.Response:
    return web.Response(text=text, status=status, content_type=JSON)


def _json(value: Any, status: int = 200) -> web.Response:
    return _json_text(dumps(value), status)


# --- SSE -------------------------------------------------------------------


async def _stream(request: web.Request, events: AsyncIterator[Event]) -> web.StreamResponse:
    stream = EventStream(request, "responses")
    await stream.open()
    async for event in events:
        await stream.send([event])
    return await stream.finish()


# --- responses ---------------------------------------------------------------


def _input_limits(request: web.Request) -> dict[str, ItemLimit]:
    return {"input": input_limit(request.app[CONFIG].responses.max_input_items)}


class _OpenWhenServed:
    """The sink of a streamed run: its start (``response.created``, ``in_progress``) is
    held until the next events, so that the stream opens once the model call was
    answered and its headers name the upstream that served it (X-LMBridge-Upstream).
    A keep-alive while the model loads, an error, or the end opens it all the same."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.held: list[Event] | None = None  # None: nothing held, the stream may be open

    async def __call__(self, events: list[Event]) -> None:
        if not self.stream.opened and self.held is None:
            self.held = events
            return
        if self.held is not None:
            events, self.held = [*self.held, *events], None
        await self.stream.send(events)

    async def flush(self) -> None:
        held, self.held = self.held, None
        if held:
            await self.stream.send(held)


async def create_response(request: web.Request) -> web.StreamResponse:
    _, body = await read_json_object(request, _input_limits(request))
    service = request.app[RESPONSES]
    run = await service.create(body, request[OWNER])
    prepared = run.prepared
    request[MODEL] = prepared.model.id
    request[ROUTE] = run.route
    offers = (prepared.tools.tools or prepared.mcp) and not prepared.profile.describe_tools
    if offers and (warning := request.app[CATALOG].tools_warning(prepared.model)):
        request[WARNING] = warning
    if run.request.background:
        if run.request.stream:
            return await _stream(request, run.follow(None))
        return _json(run.response)
    try:
        if not run.request.stream:
            final = await service.execute(run)
            return _json_text(run.stored_json) if run.stored_json else _json(final)
        stream = EventStream(request, "responses")
        sink = _OpenWhenServed(stream)
        try:
            await service.execute(run, sink)
        except Exception:
            await sink.flush()  # the error ends the stream its start opens, as ever
            raise
        await sink.flush()
        return await stream.finish()
    finally:
        note_wait(request, run.route)
        if run.schema_outcome is not None:
            request[SCHEMA] = run.schema_outcome


async def get_response(request: web.Request) -> web.StreamResponse:
    service = request.app[RESPONSES]
    response_id = request.match_info["response_id"]
    if request.query.get("stream", "").lower() == "true":
        starting_after = _optional_int(request, "starting_after")
        await service.get(response_id, request[OWNER])  # 404 before the stream opens
        return await _stream(request, service.events(response_id, request[OWNER], starting_after))
    return _json_text(await service.get(response_id, request[OWNER]))


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    await request.app[RESPONSES].delete(response_id, request[OWNER])
    return _json(deleted(response_id, "response"))


async def cancel_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    return _json_text(await request.app[RESPONSES].cancel(response_id, request[OWNER]))


async def list_input_items(request: web.Request) -> web.Response:
    after, limit, order = _paging(request)
    page = await request.app[RESPONSES].input_items(
        request.match_info["response_id"], request[OWNER], after=after, limit=limit, order=order
    )
    return _json(page)


async def input_tokens(request: web.Request) -> web.Response:
    _, body = await read_json_object(request, _input_limits(request))
    count = await request.app[RESPONSES].input_tokens(body, request[OWNER])
    return _json({"object": "response.input_tokens", "input_tokens": count})


async def compact(request: web.Request) -> web.Response:
    _, body = await read_json_object(request, _input_limits(request))
    return _json(await request.app[RESPONSES].compact(body, request[OWNER]))


# --- conversations -----------------------------------------------------------


def _ids(request: web.Request) -> tuple[str, str]:
    return request.match_info["conversation_id"], request[OWNER]


async def create_conversation(request: web.Request) -> web.Response:
    body: dict[str, Any] = {}
    if await read_body(request):
        _, body = await read_json_object(request)
    return _json(await request.app[CONVERSATIONS].create(body, request[OWNER]))


async def get_conversation(request: web.Request) -> web.Response:
    return _json(await request.app[CONVERSATIONS].get(*_ids(request)))


async def update_conversation(request: web.Request) -> web.Response:
    _, body = await read_json_object(request)
    return _json(await request.app[CONVERSATIONS].update(*_ids(request), body))


async def delete_conversation(request: web.Request) -> web.Response:
    return _json(await request.app[CONVERSATIONS].delete(*_ids(request)))


async def add_items(request: web.Request) -> web.Response:
    _, body = await read_json_object(request)
    return _json(await request.app[CONVERSATIONS].add_items(*_ids(request), body))


async def list_items(request: web.Request) -> web.Response:
    after, limit, order = _paging(request)
    page = await request.app[CONVERSATIONS].list_items(
        *_ids(request), after=after, limit=limit, order=order
    )
    return _json(page)


async def get_item(request: web.Request) -> web.Response:
    item_id = request.match_info["item_id"]
    return _json_text(await request.app[CONVERSATIONS].get_item(*_ids(request), item_id))


async def delete_item(request: web.Request) -> web.Response:
    item_id = request.match_info["item_id"]
    return _json(await request.app[CONVERSATIONS].delete_item(*_ids(request), item_id))


# --- parameters -------------------------------------------------------------


def _optional_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer.", param=name) from None


def _paging(request: web.Request) -> tuple[str | None, int, Literal["asc", "desc"]]:
    limit = _optional_int(request, "limit")
    if limit is None:
        limit = 20
    if not 1 <= limit <= 100:
        raise BadRequest("'limit' must be between 1 and 100.", param="limit")
    order: Literal["asc", "desc"]
    match request.query.get("order", "desc"):
        case "asc":
            order = "asc"
        case "desc":
            order = "desc"
        case _:
            raise BadRequest("'order' must be 'asc' or 'desc'.", param="order")
    return request.query.get("after") or None, limit, order
