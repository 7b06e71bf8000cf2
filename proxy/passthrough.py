"""The pass-through routes: /v1/models, /v1/chat/completions, /v1/completions,
/v1/embeddings.

Flow of a POST: read and check the JSON body -> resolve the model from the
cached list (no upstream round trip while fresh) -> forward the body, the
original bytes unless the model had to be rewritten -> relay the answer: a
JSON body as received, or an SSE stream event by event as it arrives.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping
from functools import partial
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from proxy import chat_schema
from proxy.accounting import Api, Metered, usage_in_body
from proxy.chat_output import (
    SWITCHES_FIELD,
    ChatOutput,
    ChatStreamRewriter,
    normalise_completion,
    output_for,
    read_switches,
)
from proxy.chat_stream import StreamObserver, UsageFilter, ask_for_usage, usage_counts
from proxy.chat_stream_editor import ChatStreamEditor
from proxy.connections import body_error
from proxy.errors import BadRequest, ItemLimit, UpstreamError
from proxy.event_stream import REQUEST_ID_HEADER, EventStream, loading_comment
from proxy.jsontext import (
    JSONDecodeError,
    TooManyItems,
    dumps_bytes,
    dumps_bytes_in_pieces,
    free_in_pieces,
    json_type,
    loads,
    loads_request,
    loads_request_in_pieces,
)
from proxy.keys import (
    API_KEYS,
    CATALOG,
    CLIENT_GONE,
    MCP,
    METERED,
    METRICS,
    MODEL,
    OWNER,
    REQUEST_ID,
    ROUTE,
    STARTED,
    UPSTREAMS,
    USAGE,
    WARNING,
    WORKER,
)
from proxy.lifecycle import request_ttl
from proxy.mcp.chat import chat_with_tools
from proxy.model_output.think_tags import ThinkTags
from proxy.model_records import Purpose
from proxy.profiles import with_switches
from proxy.queues import note_wait
from proxy.sse import DONE_EVENT
from proxy.tool_prompt import describe_tools
from proxy.upstreams import Route, UpstreamPool

log = logging.getLogger("lmbridge.upstream")

# Upstream response headers worth passing back to the client.
_PASS_HEADERS = frozenset({"content-type", "retry-after", "openai-processing-ms"})
_PASS_PREFIXES = ("x-ratelimit-",)


async def list_models(request: web.Request) -> web.Response:
    catalog = request.app[CATALOG]
    models = await catalog.get()
    data = [catalog.described(m) for m in models.models]
    for alias, target in catalog.config.aliases.items():
        if alias not in models.by_name and target in models.by_name:
            entry = catalog.described(models.by_name[target])
            entry.update(id=alias, alias_for=models.by_name[target].id)
            data.append(entry)
    return web.json_response({"object": "list", "data": data})


async def get_model(request: web.Request) -> web.Response:
    requested = request.match_info["model"]
    catalog = request.app[CATALOG]
    model = await catalog.resolve(requested, "any")
    entry = catalog.described(model)
    if requested != model.id:
        entry.update(id=requested, alias_for=model.id)
    return web.json_response(entry)


CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
_APIS: dict[str, Api] = {
    CHAT_PATH: "chat",
    COMPLETIONS_PATH: "completions",
    "/v1/embeddings": "embeddings",
}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await forward(request, "/v1/chat/completions", "chat", ("messages", list, "an array"))


async def completions(request: web.Request) -> web.StreamResponse:
    return await forward(
        request, COMPLETIONS_PATH, "chat", ("prompt", str | list, "a string or an array")
    )


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await forward(
        request, "/v1/embeddings", "embeddings", ("input", str | list, "a string or an array")
    )


async def read_body(request: web.Request) -> bytes:
    """The request body, or a 400 when aiohttp could not read it (an encoding it cannot
    decode)."""
    try:
        return await request.read()
    except RequestPayloadError as exc:
        raise body_error(exc.__cause__) from exc


# Bodies larger than this are parsed in a worker thread, in pieces (jsontext): orjson
# reads a megabyte of the densest JSON (small objects) in about 10 ms, which the event
# loop can spare, but held it for 0.5 s over 34 MB, with no other request served.
LARGE_BODY = 1 << 20


async def read_json_object(
    request: web.Request, limits: Mapping[str, ItemLimit] | None = None
) -> tuple[bytes, dict[str, Any]]:
    """The raw body and its parsed JSON object, or a 400 that says what is wrong.
    ``limits`` bound arrays of the object: a longer one is refused before the rest of a
    large body is read."""
    raw = await read_body(request)
    if not raw or raw.isspace():
        raise BadRequest("The request body is empty; send a JSON object.")
    body = await parse_json(request, raw, limits)
    if not isinstance(body, dict):
        raise BadRequest(f"The request body must be a JSON object, not {type(body).__name__}.")
    return raw, body


async def parse_json(
    request: web.Request, raw: bytes, limits: Mapping[str, ItemLimit] | None = None
) -> Any:
    """A body parsed as strict JSON (a large one in the worker thread), or a 400 that
    says what is wrong."""
    try:
        if len(raw) > LARGE_BODY:
            counts = {key: limit.count for key, limit in (limits or {}).items()}
            body = await request.app[WORKER].run(partial(loads_request_in_pieces, raw, counts))
        else:
            body = loads_request(raw)
    except TooManyItems as exc:
        raise (limits or {})[exc.key].refuse(exc.key) from None
    except UnicodeDecodeError:
        raise BadRequest("The request body is not UTF-8 encoded JSON.") from None
    except JSONDecodeError as exc:
        raise BadRequest(
            f"The request body is not valid JSON: {exc.msg} at line {exc.lineno} column "
            f"{exc.colno}."
        ) from None
    return body


def check_common_fields(body: Mapping[str, Any]) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest(f"'model' must be a string, not {json_type(model)}.", param="model")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f"'stream' must be a boolean, not {json_type(stream)}.", param="stream")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest(
            f"'stream_options' must be an object, not {json_type(options)}.",
            param="stream_options",
        )


async def forward(
    request: web.Request,
    path: str,
    purpose: Purpose,
    required: tuple[str, Any, str],
) -> web.StreamResponse:
    raw, body = await read_json_object(request)
    size = len(raw)
    check_common_fields(body)
    name, types, described = required
    if name not in body:
        raise BadRequest(f"Missing required parameter: '{name}'.", param=name)
    if not isinstance(body[name], types):
        raise BadRequest(f"'{name}' must be {described}, not {json_type(body[name])}.", param=name)

    catalog = request.app[CATALOG]
    model = await catalog.resolve(body.get("model"), purpose)
    request[MODEL] = model.id
    request[METERED] = metered = Metered(_APIS[path])
    pool = request.app[UPSTREAMS]
    route = request[ROUTE] = pool.route(model, pool.first.queues.priority(request[OWNER]))
    loaders = pool.loaders(model)
    if loaders:
        ttl = request_ttl(body)
        if ttl is not None:
            for lifecycle in loaders:
                lifecycle.set_ttl(model.id, ttl)
            # Ollama's field, which lmbridge honoured; LM Studio's own ttl goes on.
            if body.pop("keep_alive", None) is not None:
                raw = b""
    output = ChatOutput()
    structured = None
    hide_usage = False
    if path == CHAT_PATH:
        # mcp_servers and lmbridge are lmbridge's own fields: they never go upstream.
        requested = body.pop("mcp_servers", None)
        switches = request_switches(body)
        selection = request.app[MCP].select(requested, request.headers.get("X-MCP-Servers"))
        profile = with_switches(catalog.profile(model), switches or {})
        output = output_for(body.get("tools"), profile)
        # A template that cannot render tools: they are described in the system message
        # and the calls read back from the text.
        describe = profile.describe_tools and not selection and bool(output.offered)
        offers = bool(selection or body.get("tools")) and not profile.describe_tools
        if offers and (warning := catalog.tools_warning(model)):
            request[WARNING] = warning
        if selection:
            body["model"] = model.id
            return await chat_with_tools(request, body, model, selection, switches, profile)
        structured = chat_schema.plan(request, body, model, switches or {})
        # Usage accounting counts every stream's tokens: asked for upstream, kept from a
        # client that did not ask.
        hide_usage = request.app[USAGE].enabled and ask_for_usage(body)
        if requested is not None or switches is not None or structured is not None:
            raw = b""  # a field was removed or rewritten: serialise again below
        if hide_usage:
            raw = b""
        if describe and describe_tools(body):
            raw = b""
    elif path == COMPLETIONS_PATH and request.app[USAGE].enabled and ask_for_usage(body):
        hide_usage, raw = True, b""  # a stream's tokens counted, as on chat
    if body.get("model") != model.id or not raw:
        body["model"] = model.id
        raw = await serialise(request, body, size)
    if size > LARGE_BODY and structured is None:  # a retry sends the messages again
        # Left to the end of the handler, a million messages would be freed in one go on
        # the event loop (0.1 s); the worker frees them a slice at a time.
        await request.app[WORKER].run(partial(free_in_pieces, body))

    # The route takes a slot of the model where it sends the call (a model with a limit),
    # held until the answer is read whole, a stream to its end; a model that upstream
    # must load first is loaded there, while a stream's client gets keep-alive comments.
    early: EventStream | None = None
    if loaders and body.get("stream") is True:
        early = EventStream(request, "chat")
        route.keepalive = partial(early.send_bytes, loading_comment(model.id))
    headers = _upstream_headers(request, pool)
    try:
        try:
            resp = await route.open("POST", path, body=raw, headers=headers, route=path)
        finally:
            note_wait(request, route)
        streamed = resp.content_type == "text/event-stream" and structured is None
        if streamed or (early is not None and early.opened):
            editor = ChatStreamEditor(ChatStreamRewriter(output)) if output.active else None
            opened = early if early is not None and early.opened else None
            hidden = UsageFilter() if hide_usage else None
            return await relay_stream(request, resp, model.id, route, editor, opened, hidden)
        content = await route.read_body(resp)
    finally:
        route.release()
    if output.active and resp.status == 200:
        content = normalised(content, output)
    if structured is not None:
        content = await chat_schema.settle(
            request,
            structured,
            body,
            content,
            model.id,
            route,
            partial(normalised, output=output),
            headers,
        )
    request.app[METRICS].record_tokens(model.id, *usage_counts(content))
    metered.add(usage_in_body(content))
    if structured is not None and structured.stream:
        return await chat_schema.send_as_stream(request, structured, content)
    return web.Response(body=content, status=resp.status, headers=_client_headers(resp))


def request_switches(body: dict[str, Any]) -> dict[str, bool] | None:
    """The request's ``lmbridge`` switches, taken out of the body (None: it had none)."""
    if SWITCHES_FIELD not in body:
        return None
    try:
        return read_switches(body.pop(SWITCHES_FIELD))
    except ValueError as exc:
        raise BadRequest(str(exc), param=SWITCHES_FIELD) from None


def normalised(content: bytes, output: ChatOutput) -> bytes:
    """A completion's body with its text calls and thinking read out; the same bytes
    when there is nothing to change."""
    if not output.offered and not _may_think(output, content):
        return content  # only tags can change it, and there are none
    try:
        completion = loads(content)
    except ValueError:
        return content
    if not normalise_completion(completion, output):
        return content
    return dumps_bytes(completion)


def _may_think(output: ChatOutput, content: bytes) -> bool:
    think = output.think
    if think is None:
        return False
    if output.think_opened:
        return True  # the answer starts inside the block: no opening tag to look for
    tags = (think,) if isinstance(think, ThinkTags) else think
    return any(t.open.encode() in content for t in tags)


async def serialise(request: web.Request, body: dict[str, Any], size: int) -> bytes:
    """A request body written again (its model rewritten): a large one in the worker
    thread, in pieces, like it was read."""
    if size > LARGE_BODY:
        return await request.app[WORKER].run(partial(dumps_bytes_in_pieces, body))
    return dumps_bytes(body)


async def relay_stream(
    request: web.Request,
    resp: aiohttp.ClientResponse,
    model: str,
    route: Route,
    editor: ChatStreamEditor | None = None,
    stream: EventStream | None = None,
    hidden: UsageFilter | None = None,
) -> web.StreamResponse:
    """Write each upstream chunk to the client as it arrives, unchanged, or as the
    ``editor`` rewrites it (text calls, thinking in tags); into ``stream`` when it was
    opened already (keep-alives while the model loaded); without the usage chunk that
    lmbridge asked for (``hidden``), which the observer still reads.

    The stream always ends well-formed for the client: a clean end without
    ``[DONE]`` gets one; a stream broken off before its ``finish_reason`` ends
    with an error event, which the OpenAI SDKs raise as an exception.
    """
    upstream = route  # reads through the client of the upstream that answered
    metrics = request.app[METRICS]
    if stream is None:
        stream = EventStream(request, "chat", _client_headers(resp), status=resp.status)
    observer = StreamObserver()
    metered = request.get(METERED)
    failure: UpstreamError | None = None
    try:
        response = await stream.open()
        async with contextlib.aclosing(upstream.iter_chunks(resp)) as chunks:
            try:
                async for chunk in chunks:
                    if editor is not None and not editor.relaying:
                        # Edited in this loop rather than by a generator around it: one
                        # hop less per chunk.
                        chunk = editor.feed(chunk)
                        if not chunk:
                            continue
                    if hidden is None:
                        await response.write(chunk)  # as it came: the hot loop of a relay
                    elif out := hidden.feed(chunk):  # the observer still reads its usage
                        await response.write(out)
                    if observer.data_events == 0:
                        if observer.feed(chunk):
                            ttft = time.perf_counter() - request[STARTED]
                            metrics.ttft_seconds.observe((model,), ttft)
                            if metered is not None:
                                metered.first_token(ttft)
                    else:
                        observer.feed(chunk)
                tail = editor.finish() if editor is not None else b""
                if tail:  # what the readers held to the end
                    first = observer.data_events == 0
                    if observer.feed(tail) and first:
                        metrics.ttft_seconds.observe(
                            (model,), time.perf_counter() - request[STARTED]
                        )
                    if hidden is not None:
                        tail = hidden.feed(tail)
                if hidden is not None:
                    tail += hidden.finish()
                if tail:
                    await response.write(tail)
            except UpstreamError as exc:
                failure = exc
        observer.finish()
        if failure is not None and not observer.finished and not observer.done:
            if metered is not None:
                metered.error_code = failure.code
            await stream.fail(failure.body(), interrupted=True)
        else:
            await stream.finish(b"" if observer.done else DONE_EVENT)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        request[CLIENT_GONE] = True
    if observer.usage is not None:
        metrics.record_usage(model, observer.usage)
        if metered is not None:
            metered.add(observer.usage)
    if observer.upstream_error is not None:
        if metered is not None:
            metered.error_code = "stream_error"
        # Relayed to the client as it came; only here does the operator see that a
        # 200 stream carried a failure.
        metrics.upstream_failures.labels("stream_error").inc()
        log.warning(
            "the upstream reported an error inside its stream (%s)",
            _error_kind(observer.upstream_error["error"]),
            extra={"fields": {"request_id": request[REQUEST_ID], "model": model}},
        )
    if stream.response is None:  # the client went away before the headers
        return web.Response(status=499)
    return stream.response


def _upstream_headers(request: web.Request, pool: UpstreamPool) -> dict[str, str]:
    headers = {REQUEST_ID_HEADER: request[REQUEST_ID]}
    # A transparent proxy passes the client's own upstream token on, unless
    # lmbridge checks client keys (then the header holds lmbridge's key) or
    # has an upstream key of its own (UpstreamClient adds it), or the request may go
    # to one of several upstreams (a token is for one server).
    if not request.app[API_KEYS] and len(pool.upstreams) == 1 and pool.first.config.api_key is None:
        auth = request.headers.get("Authorization")
        if auth:
            headers["Authorization"] = auth
    return headers


def _client_headers(resp: aiohttp.ClientResponse) -> dict[str, str]:
    headers = {}
    for name, value in resp.headers.items():
        lower = name.lower()
        if lower in _PASS_HEADERS or lower.startswith(_PASS_PREFIXES):
            headers[name] = value
    return headers


def _error_kind(error: Any) -> str:
    """The type and code of an upstream error, never its message (it may quote the
    prompt)."""
    if not isinstance(error, dict):
        return "no type"
    kind = ", ".join(str(error[k]) for k in ("type", "code") if error.get(k) is not None)
    return kind or "no type"
