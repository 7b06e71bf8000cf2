"""The middleware: request context (id, log line, metrics), client authentication,
the relay of routes lmbridge does not serve (``proxy/relay.py``), and error rendering
(the only place exceptions become HTTP errors)."""

from __future__ import annotations

import asyncio
import hmac
import itertools
import logging
import os
import time

from aiohttp import ClientConnectionResetError, web
from aiohttp.typedefs import Handler

from proxy import relay
from proxy.browsers import is_json_type
from proxy.errors import (
    HostNotAllowed,
    LMBridgeError,
    ModelLoadFailed,
    NotFound,
    OriginNotAllowed,
    PayloadTooLarge,
    Unauthorized,
    UnsupportedMediaType,
    UpstreamError,
    UpstreamStatus,
    error_body,
)
from proxy.event_stream import (
    REQUEST_ID_HEADER,
    SCHEMA_HEADER,
    UPSTREAM_HEADER,
    WARNING_HEADER,
    EventStream,
    RelayedStream,
    served_header,
)
from proxy.keys import (
    API_KEYS,
    BROWSERS,
    CLIENT_GONE,
    CONFIG,
    CORS,
    LOAD_WAIT,
    METERED,
    METRICS,
    MODEL,
    OPEN_STREAM,
    OWNER,
    QUEUED,
    RELAYED,
    REQUEST_ID,
    REQUEST_LOG,
    ROUTE,
    SCHEMA,
    STARTED,
    USAGE,
    WARNING,
)
from proxy.relay_rules import is_own_path, route_label
from proxy.usage_http import check_quota
from storage.errors import DatabaseReplaced, StorageError

log = logging.getLogger("lmbridge.request")
__all__ = ["REQUEST_ID_HEADER", "WARNING_HEADER", "describe_error", "handle_request"]


# Request ids: a random prefix per process and a counter, unique across
# restarts without a syscall per request.
_ID_PREFIX = "req_" + os.urandom(6).hex()
_id_counter = itertools.count(1)


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_id_counter):08x}"


def _route_label(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource
    if info.http_exception is not None or resource is None:
        label: str = request.get(RELAYED, "unmatched")
        return label
    return resource.canonical


def _relay_label(request: web.Request) -> str | None:
    """The metric label of a request to relay upstream: one no route of lmbridge
    matched (a wrong method stays a 405) and not on one of lmbridge's own paths."""
    error = request.match_info.http_exception
    if error is None or error.status != 404:
        return None
    if not request.app[CONFIG].server.relay_unknown_routes or is_own_path(request.path):
        return None
    return route_label(request.path)


@web.middleware
async def handle_request(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, client authentication, in-flight gauge, the one place errors become
    responses, metrics and the request log line. One middleware rather than three: each
    costs a coroutine frame on every request."""
    started = time.perf_counter()
    incoming = request.headers.get(REQUEST_ID_HEADER)
    if incoming and len(incoming) <= 128 and incoming.isprintable():
        request_id = incoming
    else:
        request_id = _new_request_id()
    request[REQUEST_ID] = request_id
    request[STARTED] = started
    app = request.app
    metrics = app[METRICS]
    metrics.in_flight += 1
    status = 500
    error_code: object = None
    try:
        try:
            label = _relay_label(request)
            if label is not None:
                request[RELAYED] = label
                handler = relay.forward
            preflight = admit_browser(request)
            authenticate(request)
            if preflight is None:
                check_quota(request)
            response = preflight or await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            response = _error_response(exc.status, _http_error_body(request, exc), None)
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's convention)
            raise
        except Exception as exc:
            code, body = describe_error(exc, request_id)
            error_code = _code_of(body)
            stream: EventStream | RelayedStream | None = request.get(OPEN_STREAM)
            if isinstance(exc, UpstreamStatus) and RELAYED in request:
                response = relay.upstream_answer(exc)  # the upstream's own, as it came
            elif stream is None:
                response = _error_response(code, body, exc)
            else:
                # A failed load came before the upstream's stream: nothing was interrupted.
                interrupted = isinstance(exc, UpstreamError) and not isinstance(
                    exc, ModelLoadFailed
                )
                await stream.fail(body, interrupted=interrupted)
                response = await stream.open()
        status = 499 if request.get(CLIENT_GONE) else response.status
        if not response.prepared:
            response.headers[REQUEST_ID_HEADER] = request_id
            if WARNING in request:
                response.headers[WARNING_HEADER] = request[WARNING]
            if SCHEMA in request:
                response.headers[SCHEMA_HEADER] = request[SCHEMA]
            served = served_header(request)
            if served is not None:
                response.headers[UPSTREAM_HEADER] = served
            cors = request.get(CORS)
            if cors is not None:
                response.headers.update(cors)
        return response
    finally:
        metrics.in_flight -= 1
        elapsed = time.perf_counter() - started
        route = _route_label(request)
        model = request.get(MODEL, "-")
        metrics.count_request(route, model, status, elapsed)
        metered = request.get(METERED)
        routed = request.get(ROUTE)
        if metered is not None:
            app[USAGE].ended(
                metered,
                owner=request.get(OWNER, ""),
                model=model,
                status=status,
                error_code=error_code if isinstance(error_code, str) else None,
                seconds=elapsed,
                upstream=routed.upstream_name if routed is not None else None,
            )
        request_log = app[REQUEST_LOG]
        if request_log.enabled and route not in _QUIET_ROUTES:
            line = {
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "model": model,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            }
            if QUEUED in request:
                line["queued_ms"] = round(request[QUEUED] * 1000, 2)
            if LOAD_WAIT in request:
                line["load_wait_ms"] = round(request[LOAD_WAIT] * 1000, 2)
            if SCHEMA in request:
                line["schema"] = request[SCHEMA]
            if routed is not None and routed.served is not None:
                line["upstream"] = routed.served[0].name
            if routed is not None and routed.hops:
                line["hops"] = routed.hops
            request_log.write(line)


_QUIET_ROUTES = frozenset({"/healthz", "/metrics"})


def _code_of(body: dict[str, object]) -> object:
    error = body.get("error")
    return error.get("code") if isinstance(error, dict) else None


def describe_error(exc: Exception, request_id: str) -> tuple[int, dict[str, object]]:
    """The status and OpenAI error body for an exception out of a handler, and the log
    line the operator needs. Used as the response here, and as the ``error`` event of a
    stream that had already begun (proxy/responses/routes.py)."""
    if isinstance(exc, LMBridgeError):
        return exc.status, exc.body()
    if isinstance(exc, ConnectionResetError | ClientConnectionResetError):
        # A write to a client that went away: nothing failed, nobody is left to tell.
        return 499, error_body("The client closed the connection.", "client_gone")
    fields = {"fields": {"request_id": request_id}}
    if isinstance(exc, DatabaseReplaced):
        # Retrying cannot help until an operator restarts the daemon: say so.
        log.error("storage failed: %s", exc, extra=fields)
        return 503, error_body(
            f"The database file of lmbridge was removed or replaced while it ran, so "
            f"nothing of this request was kept (request id {request_id}); lmbridge must "
            "be restarted.",
            "server_error",
            None,
            "storage_unavailable",
        )
    if isinstance(exc, StorageError):
        # Disk full, locked by another process, the writer process gone: the daemon
        # cannot keep what it would acknowledge, so the client is told to retry.
        log.error("storage failed: %s", exc, extra=fields)
        return 503, error_body(
            "lmbridge could not use its database, so nothing of this request was kept "
            f"(request id {request_id}); retry, and see the daemon's log if it persists.",
            "server_error",
            None,
            "storage_unavailable",
        )
    if isinstance(exc, RecursionError):
        # The parsers take JSON nested up to ~1,000 levels; writing such a body back
        # (a model alias, a Responses translation) can exceed Python's recursion limit.
        log.warning("request nested too deeply to process", extra=fields)
        return 400, error_body(
            "The request body nests arrays and objects too deeply for lmbridge to process.",
            "invalid_request_error",
            None,
            "nested_too_deeply",
        )
    log.error("unhandled error", exc_info=exc, extra=fields)
    return 500, error_body(
        f"lmbridge failed while handling this request (request id {request_id}); "
        "see the daemon's log.",
        "server_error",
        None,
        "internal_error",
    )


def _error_response(status: int, body: dict[str, object], exc: Exception | None) -> web.Response:
    headers = {}
    if getattr(exc, "should_retry", True) is False:
        headers["X-Should-Retry"] = "false"  # the OpenAI SDKs' own header
    retry_after = getattr(exc, "retry_after", None)
    if isinstance(retry_after, int | float) and retry_after > 0:
        headers["Retry-After"] = str(max(1, round(retry_after)))
    if getattr(exc, "retry", True) is False:
        headers["x-should-retry"] = "false"
    return web.json_response(body, status=status, headers=headers)


def _http_error_body(request: web.Request, exc: web.HTTPException) -> dict[str, object]:
    if exc.status == 404:
        return NotFound(
            f"Unknown route: {request.method} {request.path}. lmbridge serves /v1/models, "
            "/v1/chat/completions, /v1/completions, /v1/embeddings, /v1/responses and "
            "/v1/conversations.",
            code="unknown_route",
        ).body()
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return error_body(
            f"Method {request.method} is not allowed on {request.path} (allowed: {allowed}).",
            "invalid_request_error",
            None,
            "method_not_allowed",
        )
    if exc.status == 413:
        limit = request.app[CONFIG].server.max_body_size
        return PayloadTooLarge(
            f"The request body is larger than lmbridge accepts ({limit} bytes; "
            "server.max_body_size)."
        ).body()
    return error_body(exc.reason or "request failed", "invalid_request_error", None, None)


def admit_browser(request: web.Request) -> web.Response | None:
    """Refuse what a web page must not make the daemon do (docs/operations.md, "Security
    model"); the answer to an allowed origin's preflight, which needs no API key."""
    policy = request.app[BROWSERS]
    headers = request.headers
    host = headers.get("Host")
    if not policy.host_allowed(host):
        raise HostNotAllowed(
            f"lmbridge does not answer to the host name {_shown(host)}: a web page may be "
            "trying to reach it through DNS rebinding. If you use this name, add it to "
            "server.allowed_hosts."
        )
    relayed = RELAYED in request
    origin = headers.get("Origin")
    if origin is None:
        # No Origin, yet a browser marks it as sent by a page of another site: an
        # <img>, a <script>, a link, a browser that left Origin out. Refused on what
        # lmbridge relays (whose effects it cannot know), which takes any body.
        if relayed and headers.get("Sec-Fetch-Site") in _OTHER_SITES:
            raise OriginNotAllowed(
                "A web page of another site cannot reach the upstream through lmbridge. "
                "To let a browser app you trust call it, add its origin to "
                "server.cors_origins."
            )
    else:
        if not policy.origin_allowed(origin, host):
            raise OriginNotAllowed(
                f"Requests from web pages of {_shown(origin)} are not allowed. To let a "
                "browser app you trust call lmbridge, add its origin to server.cors_origins."
            )
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in headers:
            return web.Response(
                status=204,
                headers=policy.preflight_headers(
                    origin, headers.get("Access-Control-Request-Headers")
                ),
            )
        request[CORS] = policy.response_headers(origin)
    if request.body_exists and not relayed:
        # A body of another type is what a form or a no-preflight fetch sends; an empty
        # one (a cancel) may carry any type: clients add application/octet-stream. A
        # relayed route takes any type (an audio file in multipart/form-data): a page
        # of another origin was refused above, since browsers send Origin with every
        # cross-origin request that has a body.
        content_type = headers.get("Content-Type")
        if content_type is not None and not is_json_type(content_type):
            raise UnsupportedMediaType(
                f"lmbridge reads JSON bodies: send 'Content-Type: application/json', not "
                f"{_shown(content_type)}."
            )
    return None


_OTHER_SITES = frozenset({"cross-site", "same-site"})


def _shown(value: str | None) -> str:
    """A client-chosen header value quoted for a message, cut short."""
    text = value or ""
    return repr(text if len(text) <= 100 else text[:100] + "...")


def authenticate(request: web.Request) -> None:
    """With client keys configured, every /v1 route and every relayed one needs one, as
    ``Authorization: Bearer <key>`` or as Anthropic's ``x-api-key: <key>``; sets who owns
    what this request stores."""
    keys = request.app[API_KEYS]
    request[OWNER] = ""
    if not keys or not (request.path.startswith("/v1") or RELAYED in request):
        return
    header = request.headers.get("Authorization")
    if header is None and "x-api-key" in request.headers:
        scheme, token = "bearer", request.headers["x-api-key"]
    else:
        scheme, _, token = (header or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthorized(
            "Missing API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>') "
            "with one of the keys in lmbridge's [auth] api_keys."
        )
    presented = token.encode()
    owner = None
    # Compare against every key so that timing does not tell which one nearly matched.
    for key, key_owner in keys.items():
        if hmac.compare_digest(presented, key):
            owner = key_owner
    if owner is None:
        raise Unauthorized("Incorrect API key provided.")
    request[OWNER] = owner
