"""/v1/chat/completions with MCP servers: the tool loop behind one request.

The request names its servers (``mcp_servers`` in the body, the ``X-MCP-Servers``
header, or ``mcp.default_servers``); their tools join the client's own, and
``ToolLoop`` runs model -> MCP tools -> model. Plain requests get one final chat
completion; streamed ones get one stream: the content of every round as it
arrives, one ``finish_reason``, one usage chunk (when asked), one ``[DONE]``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from aiohttp import web

from proxy import chat_upstream
from proxy.chat_output import mcp_text_calls
from proxy.errors import BadRequest
from proxy.event_stream import EventStream
from proxy.keys import CONFIG, MCP, METERED, METRICS, OWNER, ROUTE, TURNS
from proxy.mcp.loop import LoopResult, StreamChat, ToolLoop
from proxy.mcp.names import ToolRef
from proxy.mcp.policy import LIMIT_NOTE
from proxy.mcp.results import ToolOutput
from proxy.model_records import ModelInfo
from proxy.profiles import ModelProfile
from proxy.queues import note_wait

ROUTE_LABEL = "/v1/chat/completions"
# Names the requested servers that were not connected (their tools were not offered).
UNAVAILABLE_HEADER = "X-MCP-Unavailable"


async def chat_with_tools(
    request: web.Request,
    body: dict[str, Any],
    model: ModelInfo,
    selection: list[str],
    switches: Mapping[str, bool] | None = None,
    profile: ModelProfile | None = None,
) -> web.StreamResponse:
    profile = profile or ModelProfile()
    servers = request.app[MCP]
    settings = request.app[CONFIG]
    config = settings.mcp
    offer = await servers.offer(selection)
    client_tools = body.get("tools") or []
    if not isinstance(client_tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    clash = sorted(
        {t.get("function", {}).get("name") for t in client_tools if isinstance(t, dict)}
        & set(offer.directory.by_name)
    )
    if clash:
        raise BadRequest(
            f"The client tool name(s) {', '.join(map(str, clash))} clash with MCP tools of "
            "this request; rename them or leave those servers out.",
            param="tools",
        )
    if offer.tools:
        body["tools"] = [*client_tools, *offer.tools]
    # The client never saw the MCP steps of a turn it was handed mid-loop: put them back.
    last_sent = body["messages"][-1] if body["messages"] else None
    body["messages"] = request.app[TURNS].restore(request[OWNER], body["messages"])
    sent = len(body["messages"])
    images = model.vision is True
    headers = {UNAVAILABLE_HEADER: ", ".join(offer.missing)} if offer.missing else {}

    async def call_tool(ref: ToolRef, arguments: dict[str, Any]) -> ToolOutput:
        return await servers.call(ref, arguments, images=images)

    # One place in its model's queue for the whole loop, a slot for each model call only;
    # the rounds go where the first was served (the request's route, passthrough.forward).
    route = request[ROUTE]

    async def complete(b: dict[str, Any]) -> dict[str, Any]:
        async with route:
            return await chat_upstream.complete(route, b, ROUTE_LABEL)

    async def stream(b: dict[str, Any]) -> AsyncGenerator[dict[str, Any], None]:
        async with route, contextlib.aclosing(chat_upstream.stream(route, b, ROUTE_LABEL)) as c:
            async for chunk in c:
                yield chunk

    text_calls = mcp_text_calls(profile.text_tool_calls, config.text_tool_calls, switches or {})
    loop = ToolLoop(
        offer.directory,
        call_tool,
        max_rounds=config.max_rounds,
        max_tool_calls=config.max_tool_calls,
        text_tool_calls=text_calls,
        keep_reasoning=profile.keeps_reasoning,
        describe_tools=profile.describe_tools and text_calls,
        profile=profile,
        images=images,
        client_tools=_names(client_tools),
    )
    try:
        if not body.get("stream"):
            result = await loop.run(body, complete=complete)
            _count_usage(request, model.id, result)
            _remember_hidden_steps(request, result, sent, last_sent)
            return web.json_response(result.completion, headers=headers)
        return await _stream(request, body, loop, stream, model.id, headers, sent, last_sent)
    finally:
        note_wait(request, route)


def _names(tools: list[Any]) -> frozenset[str]:
    """The names of the client's own tools (function tools and custom ones)."""
    names = set()
    for tool in tools:
        if isinstance(tool, dict):
            function = tool.get("function")
            name = function.get("name") if isinstance(function, dict) else tool.get("name")
            if isinstance(name, str):
                names.add(name)
    return frozenset(names)


async def _stream(
    request: web.Request,
    body: dict[str, Any],
    loop: ToolLoop,
    chat: StreamChat,
    model: str,
    headers: dict[str, str],
    sent: int,
    last_sent: Any,
) -> web.StreamResponse:
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage"))
    stream = EventStream(request, "chat", headers)
    stream_id = "chatcmpl-lmbridge"

    async def emit(chunks: list[dict[str, Any]]) -> None:
        nonlocal stream_id
        stream_id = chunks[0].get("id", stream_id)
        await stream.send(chunks)

    # An upstream failure before anything was sent is a plain HTTP error; after, the
    # middleware ends the stream with it.
    result = await loop.run(body, stream=chat, emit=emit)
    closing = ToolLoop.closing_chunks(result, stream_id, body.get("model"), include_usage)
    await stream.send(closing)
    response = await stream.finish()
    _count_usage(request, model, result)
    _remember_hidden_steps(request, result, sent, last_sent)
    return response


def _count_usage(request: web.Request, model: str, result: LoopResult) -> None:
    usage = result.completion.get("usage")
    request.app[METRICS].record_usage(model, usage)
    metered = request.get(METERED)
    if metered is not None:
        metered.add(usage)


def _remember_hidden_steps(
    request: web.Request, result: LoopResult, sent: int, last_sent: Any
) -> None:
    """A turn handed to the client for its own calls: keep what it did not see."""
    client_calls = result.completion["choices"][0]["message"].get("tool_calls")
    if not client_calls:
        return
    steps = [m for m in result.messages[sent:] if m.get("content") != LIMIT_NOTE]
    request.app[TURNS].remember(
        request[OWNER],
        client_calls,
        steps,
        ended_mid_round=result.ended_mid_round,
        follows=last_sent,
    )
