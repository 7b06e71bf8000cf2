"""HTTP routes of the Responses and Conversations APIs: parse, call the service, render.

Streams are written as SSE, each event as ``event: <type>`` plus one ``data:``
line, never split across writes (some clients drop an event whose closing
blank line arrives in a separate read), and end with ``data: [DONE]`` (which
the Open Responses spec expects and the OpenAI SDKs ignore).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, cast

from aiohttp import web

from proxy.errors import BadRequest, ItemLimit, NotFound
from proxy.jsontext import dumps, loads
from proxy.keys import (
    CATALOG,
    CONFIG,
    MODEL,
    OPEN_STREAM,
    OWNER,
    REQUEST_ID,
    RESPONSES,
    WARNING,
)
from proxy.middleware import describe_error, end_stream, stream_headers
from proxy.passthrough import read_body, read_json_object
from proxy.responses.builder import Event
from proxy.responses.objects import conversation_object, deleted, list_page
from proxy.responses.request import input_limit
from proxy.responses.service import normalize_conversation_items
from proxy.sse import DONE_EVENT
from storage.records import ConversationRecord, StoredItem

JSON = "application/json"


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/responses", create_response)
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


def _frame(events: list[Event]) -> bytes:
    return b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + dumps(e).encode() + b"\n\n" for e in events
    )


async def _open_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        **stream_headers(request),
    })  # fmt: skip
    await response.prepare(request)
    request[OPEN_STREAM] = response
    return response


async def _stream(request: web.Request, events: AsyncIterator[Event]) -> web.StreamResponse:
    response = await _open_sse(request)
    sequence = 0
    try:
        async for event in events:
            await response.write(_frame([event]))
            sequence = int(event.get("sequence_number", sequence)) + 1
    except Exception as exc:
        await _end_with_error(request, response, exc, sequence)
        return response
    await response.write(DONE_EVENT)
    await response.write_eof()
    return response


async def _end_with_error(
    request: web.Request, response: web.StreamResponse, exc: Exception, sequence: int
) -> None:
    """A stream under way cannot change its status any more: it ends with the Responses
    API's ``error`` event, saying what the status and body would have said."""
    _, body = describe_error(exc, request[REQUEST_ID])
    error = cast(dict[str, Any], body["error"])
    event = {"type": "error", "code": error["code"], "message": error["message"],
             "param": error["param"], "sequence_number": sequence}  # fmt: skip
    await end_stream(request, response, _frame([event]))


# --- responses ---------------------------------------------------------------


def _input_limits(request: web.Request) -> dict[str, ItemLimit]:
    return {"input": input_limit(request.app[CONFIG].responses.max_input_items)}


async def create_response(request: web.Request) -> web.StreamResponse:
    _, body = await read_json_object(request, _input_limits(request))
    service = request.app[RESPONSES]
    run = await service.create(body, request[OWNER])
    prepared = run.prepared
    request[MODEL] = prepared.model.id
    if (prepared.tools.tools or prepared.mcp) and (
        warning := request.app[CATALOG].tools_warning(prepared.model)
    ):
        request[WARNING] = warning
    if run.request.background:
        if run.request.stream:
            return await _stream(request, run.follow(None))
        return _json(run.response)
    if not run.request.stream:
        final = await service.execute(run)
        return _json_text(run.stored_json) if run.stored_json else _json(final)
    response = await _open_sse(request)

    async def sink(events: list[Event]) -> None:
        if events:
            await response.write(_frame(events))

    try:
        await service.execute(run, sink)
    except Exception as exc:
        await _end_with_error(request, response, exc, run.builder.sequence)
        return response
    await response.write(DONE_EVENT)
    await response.write_eof()
    return response


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


def _retention(request: web.Request) -> int:
    return int(request.app[CONFIG].responses.retention)


async def create_conversation(request: web.Request) -> web.Response:
    body: dict[str, Any] = {}
    if await read_body(request):
        _, body = await read_json_object(request)
    service = request.app[RESPONSES]
    metadata = _metadata(body.get("metadata"))
    items = normalize_conversation_items(body.get("items") or [], service.ids)
    now = int(service.clock())
    conversation_id = service.ids("conv")
    await service.store.create_conversation(ConversationRecord(
        id=conversation_id, owner=request[OWNER], created_at=now,
        expires_at=now + _retention(request), metadata=dumps(metadata),
        items=tuple(StoredItem(i["id"], dumps(i)) for i in items),
    ))  # fmt: skip
    return _json(conversation_object(conversation_id, now, metadata))


async def _conversation(request: web.Request) -> ConversationRecord:
    conversation_id = request.match_info["conversation_id"]
    record = await request.app[RESPONSES].store.get_conversation(conversation_id, request[OWNER])
    if record is None:
        raise _conversation_not_found(conversation_id)
    return record


async def get_conversation(request: web.Request) -> web.Response:
    record = await _conversation(request)
    return _json(conversation_object(record.id, record.created_at, loads(record.metadata)))


async def update_conversation(request: web.Request) -> web.Response:
    _, body = await read_json_object(request)
    service = request.app[RESPONSES]
    conversation_id = request.match_info["conversation_id"]
    metadata = _metadata(body.get("metadata"))
    record = await service.store.update_conversation(
        conversation_id, request[OWNER], metadata=dumps(metadata),
        expires_at=int(service.clock()) + _retention(request),
    )  # fmt: skip
    if record is None:
        raise _conversation_not_found(conversation_id)
    return _json(conversation_object(record.id, record.created_at, metadata))


async def delete_conversation(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    if not await request.app[RESPONSES].store.delete_conversation(conversation_id, request[OWNER]):
        raise _conversation_not_found(conversation_id)
    return _json(deleted(conversation_id, "conversation.deleted"))


async def add_items(request: web.Request) -> web.Response:
    _, body = await read_json_object(request)
    service = request.app[RESPONSES]
    conversation_id = request.match_info["conversation_id"]
    items = normalize_conversation_items(body.get("items"), service.ids)
    added = await service.store.add_conversation_items(
        conversation_id, request[OWNER], tuple(StoredItem(i["id"], dumps(i))
                                               for i in items),
        int(service.clock()) + _retention(request),
    )  # fmt: skip
    if not added:
        raise _conversation_not_found(conversation_id)
    return _json(list_page(items, False))


async def list_items(request: web.Request) -> web.Response:
    after, limit, order = _paging(request)
    conversation_id = request.match_info["conversation_id"]
    page = await request.app[RESPONSES].store.list_conversation_items(
        conversation_id,
        request[OWNER],
        after=after,
        limit=limit,
        order=order,  # type: ignore[arg-type]
    )
    if page is None:
        raise _conversation_not_found(conversation_id)
    return _json(list_page([loads(i.json) for i in page.items], page.has_more))


async def get_item(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    item_id = request.match_info["item_id"]
    item = await request.app[RESPONSES].store.get_conversation_item(
        conversation_id, request[OWNER], item_id
    )
    if item is None:
        await _conversation(request)
        raise NotFound(
            f"Item with id '{item_id}' not found.", param="item_id", code="item_not_found"
        )
    return _json_text(item.json)


async def delete_item(request: web.Request) -> web.Response:
    conversation_id = request.match_info["conversation_id"]
    item_id = request.match_info["item_id"]
    store = request.app[RESPONSES].store
    if not await store.delete_conversation_item(conversation_id, request[OWNER], item_id):
        await _conversation(request)
        raise NotFound(
            f"Item with id '{item_id}' not found.", param="item_id", code="item_not_found"
        )
    record = await _conversation(request)
    return _json(conversation_object(record.id, record.created_at, loads(record.metadata)))


# --- parameters -------------------------------------------------------------


def _optional_int(request: web.Request, name: str) -> int | None:
    value = request.query.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"'{name}' must be an integer.", param=name) from None


def _paging(request: web.Request) -> tuple[str | None, int, str]:
    limit = _optional_int(request, "limit")
    if limit is None:
        limit = 20
    if not 1 <= limit <= 100:
        raise BadRequest("'limit' must be between 1 and 100.", param="limit")
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise BadRequest("'order' must be 'asc' or 'desc'.", param="order")
    return request.query.get("after") or None, limit, order


def _metadata(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if (
        not isinstance(value, dict)
        or len(value) > 16
        or not all(isinstance(v, str) for v in value.values())
    ):
        raise BadRequest(
            "'metadata' must be an object of at most 16 string values.", param="metadata"
        )
    return value


def _conversation_not_found(conversation_id: str) -> NotFound:
    return NotFound(
        f"Conversation with id '{conversation_id}' not found.",
        param="conversation_id",
        code="conversation_not_found",
    )
