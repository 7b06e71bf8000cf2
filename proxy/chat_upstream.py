"""Reading chat completions from the upstream as data, for lmbridge's own use
(the Responses service and tool loops): a whole completion, or the chunks of a
stream as dicts, through the request's ``Route`` (the upstream it was sent to). The
pass-through routes relay bytes instead (proxy/passthrough.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator
from typing import Any

import aiohttp

from proxy.errors import UpstreamError, UpstreamStatus
from proxy.jsontext import dumps_bytes, loads
from proxy.sse import SSEParser
from proxy.upstreams import Route

CHAT_PATH = "/v1/chat/completions"


async def read_completion(upstream: Route, resp: aiohttp.ClientResponse) -> dict[str, Any]:
    raw = await upstream.read_body(resp)
    try:
        completion = loads(raw)
    except ValueError as exc:
        raise UpstreamError("The upstream answered with something that is not JSON.") from exc
    if not isinstance(completion, dict):
        raise UpstreamError("The upstream answered with something that is not an object.")
    return completion


async def read_chunks(
    upstream: Route, resp: aiohttp.ClientResponse
) -> AsyncGenerator[dict[str, Any], None]:
    """The chunks of a streamed reply; a reply that is not a stream (an upstream that
    ignored ``stream``) comes as one chunk."""
    if resp.content_type != "text/event-stream":
        raw = await upstream.read_body(resp)
        with contextlib.suppress(ValueError):
            data = loads(raw)
            if isinstance(data, dict):
                yield data
        return
    parser = SSEParser()
    async with contextlib.aclosing(upstream.iter_chunks(resp)) as chunks:
        async for raw in chunks:
            for event in parser.feed(raw):
                if event.is_done:
                    return
                chunk = chunk_json(event.data)
                if chunk is not None:
                    yield chunk
    for event in parser.finish():
        chunk = chunk_json(event.data)
        if chunk is not None and not event.is_done:
            yield chunk


def chunk_json(data: bytes) -> dict[str, Any] | None:
    try:
        chunk = loads(data)
    except ValueError:
        return None
    if not isinstance(chunk, dict):
        return None
    if chunk.get("error"):
        raise stream_error(chunk["error"])
    return chunk


def stream_error(error: Any) -> UpstreamError:
    """An error event of a stream, as the error its status would have been (llama.cpp
    reports a prompt too long for the context this way, with the status as ``code``)."""
    if not isinstance(error, dict):
        return UpstreamError(f"The upstream stream reported an error: {error}")
    code = error.get("code")
    status = code if isinstance(code, int) and 400 <= code < 600 else 502
    return UpstreamStatus(status, dumps_bytes({"error": error}), "application/json")


def request_bytes(body: dict[str, Any], *, stream: bool) -> bytes:
    payload = dict(body)
    if stream:
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
    else:
        payload.pop("stream", None)
        payload.pop("stream_options", None)
    return dumps_bytes(payload)


async def complete(upstream: Route, body: dict[str, Any], route: str) -> dict[str, Any]:
    resp = await upstream.open(
        "POST", CHAT_PATH, body=request_bytes(body, stream=False), route=route
    )
    return await read_completion(upstream, resp)


async def stream(
    upstream: Route, body: dict[str, Any], route: str
) -> AsyncGenerator[dict[str, Any], None]:
    resp = await upstream.open(
        "POST", CHAT_PATH, body=request_bytes(body, stream=True), route=route
    )
    async with contextlib.aclosing(read_chunks(upstream, resp)) as chunks:
        async for chunk in chunks:
            yield chunk
