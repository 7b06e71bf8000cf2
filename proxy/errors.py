"""The one exception tree of lmbridge, and its OpenAI error shape.

Code anywhere below the handlers raises one of these; the error middleware
(``proxy.middleware``) is the only place that turns them into responses, but for what
happens before a request exists (a refused connection, a head that never came), which
``proxy.listener`` answers itself::

    LMBridgeError                      500 server_error
    ├── BadRequest                     400 invalid_request_error (param)
    │   ├── ModelRequired              400 model_required
    │   ├── LoadNotSupported           400 load_not_supported
    │   └── MalformedRequest           400 malformed_request (not HTTP/1.1 aiohttp reads)
    ├── Unauthorized                   401 invalid_api_key
    ├── Forbidden                      403
    │   ├── HostNotAllowed             403 host_not_allowed
    │   └── OriginNotAllowed           403 origin_not_allowed
    ├── NotFound                       404 not_found
    │   ├── ModelNotFound              404 model_not_found
    │   └── PreviousResponseNotFound   404 previous_response_not_found
    ├── RequestTimeout                 408 request_timeout
    ├── ConversationLocked             409 conversation_locked (Retry-After)
    ├── ModelNotLoaded                 409 model_not_loaded
    ├── PayloadTooLarge                413 request_too_large
    ├── URITooLong                     414 uri_too_long
    ├── UnsupportedMediaType           415 unsupported_media_type
    ├── ModelBusy                      429 model_busy (Retry-After)
    ├── QuotaExceeded                  429 quota_exceeded (Retry-After)
    ├── HeadersTooLarge                431 headers_too_large
    ├── TooManyConnections             503 too_many_connections
    ├── QueueTimeout                   504 queue_timeout
    └── UpstreamError                  502 upstream_error
        ├── SchemaMismatch             502 schema_mismatch (X-Should-Retry: false)
        ├── UpstreamUnavailable        502 upstream_unavailable
        ├── UpstreamTimeout            504 upstream_timeout
        ├── CircuitOpen                503 circuit_open
        ├── ModelLoadFailed            502 model_load_failed (the upstream's status and reason)
        └── UpstreamStatus             upstream's own status and error body

storage's StorageError (the database could not be written or read) becomes a
503 storage_unavailable in the same middleware. Lower-level exceptions (aiohttp,
asyncio timeouts) are converted where the I/O happens, with ``raise ... from exc``;
a 4xx always means the request was at fault, a 5xx that the upstream or the daemon
really failed (clients retry 5xx).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy.jsontext import loads

# How servers word "the prompt does not fit the context" when they give no code.
_CONTEXT_WORDING = re.compile(
    r"context (length|size|window)|exceeds? (the )?(available )?context|n_ctx|"
    r"too many tokens|maximum context|prompt is too long",
    re.IGNORECASE,
)


class LMBridgeError(Exception):
    status = 500
    error_type = "server_error"
    code: str | None = "internal_error"
    # Seconds a client should wait before trying again (sent as Retry-After).
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def extend_message(self, note: str) -> None:
        """Append to the message the client will see."""
        self.message += note


class BadRequest(LMBridgeError):
    status = 400
    error_type = "invalid_request_error"
    code = "invalid_request"


class ModelRequired(BadRequest):
    code = "model_required"


class LoadNotSupported(BadRequest):
    """A load or unload asked of an upstream without a load endpoint lmbridge knows (not
    LM Studio 0.4+, llama.cpp's router mode or Ollama)."""

    code = "load_not_supported"


class MalformedRequest(BadRequest):
    """Bytes aiohttp's HTTP parser rejects: no handler ever sees the request."""

    code = "malformed_request"


class Unauthorized(LMBridgeError):
    status = 401
    error_type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(LMBridgeError):
    """A browser request the daemon does not serve (a foreign Host or Origin)."""

    status = 403
    error_type = "invalid_request_error"
    code = "forbidden"


class HostNotAllowed(Forbidden):
    code = "host_not_allowed"


class OriginNotAllowed(Forbidden):
    code = "origin_not_allowed"


class NotFound(LMBridgeError):
    status = 404
    error_type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class PreviousResponseNotFound(NotFound):
    code = "previous_response_not_found"


class UpgradeRequired(LMBridgeError):
    """``GET /v1/responses`` without a WebSocket upgrade."""

    status = 426
    error_type = "invalid_request_error"
    code = "upgrade_required"


class ConnectionLimitReached(BadRequest):
    """A WebSocket connection reached ``responses.websocket_max_age``."""

    code = "websocket_connection_limit_reached"


class RequestTimeout(LMBridgeError):
    """The client did not send its request head or body in time."""

    status = 408
    error_type = "invalid_request_error"
    code = "request_timeout"


class ConversationLocked(LMBridgeError):
    """Another turn runs in the conversation: it takes one at a time. A 409, which the
    openai SDKs retry by themselves after Retry-After."""

    status = 409
    error_type = "invalid_request_error"
    code = "conversation_locked"
    retry_after = 1.0


class ModelNotLoaded(LMBridgeError):
    """An unload of a model that no instance of is loaded."""

    status = 409
    error_type = "invalid_request_error"
    code = "model_not_loaded"


class PayloadTooLarge(LMBridgeError):
    status = 413
    error_type = "invalid_request_error"
    code = "request_too_large"


class URITooLong(LMBridgeError):
    status = 414
    error_type = "invalid_request_error"
    code = "uri_too_long"


class UnsupportedMediaType(LMBridgeError):
    status = 415
    error_type = "invalid_request_error"
    code = "unsupported_media_type"


class ModelBusy(LMBridgeError):
    """The model runs its max_concurrent requests and its queue is full: try again after
    Retry-After (the openai SDKs do by themselves). Not the request's fault, but a 429
    is what clients know to retry later rather than at once."""

    status = 429
    error_type = "rate_limit_error"
    code = "model_busy"
    retry_after = 1.0


class QuotaExceeded(LMBridgeError):
    """A key spent its usage quota (tokens per day, requests per minute): refused before
    the upstream is called, until the reset time the message gives."""

    status = 429
    error_type = "rate_limit_error"
    code = "quota_exceeded"

    def __init__(self, message: str, *, retry_after: float, retry: bool) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        # False: the wait is long (a new day), and clients that honour x-should-retry
        # (the openai SDKs) should not retry at once.
        self.retry = retry


class QueueTimeout(LMBridgeError):
    """A request waited models.queue_timeout in a model's queue without getting a slot."""

    status = 504
    error_type = "server_error"
    code = "queue_timeout"


class HeadersTooLarge(LMBridgeError):
    status = 431
    error_type = "invalid_request_error"
    code = "headers_too_large"


class TooManyConnections(LMBridgeError):
    """server.max_connections are open: a new connection is answered this and closed."""

    status = 503
    error_type = "server_error"
    code = "too_many_connections"
    retry_after = 1.0


class UpstreamError(LMBridgeError):
    status = 502
    error_type = "upstream_error"
    code = "upstream_error"


class SchemaMismatch(UpstreamError):
    """The model's answer did not validate against the request's JSON schema, asked once
    more (models.schema_retry). A 5xx: the request was right, the model failed it; but
    lmbridge already asked twice, so the SDKs are told not to retry on their own."""

    code = "schema_mismatch"
    should_retry = False


class UpstreamUnavailable(UpstreamError):
    code = "upstream_unavailable"


class UpstreamTimeout(UpstreamError):
    status = 504
    code = "upstream_timeout"


class CircuitOpen(UpstreamError):
    status = 503
    code = "circuit_open"


class ModelLoadFailed(UpstreamError):
    """The upstream could not load a model a request needs: every request that waited for
    that load gets this same error (status and reason in the message)."""

    code = "model_load_failed"

    def again(self) -> ModelLoadFailed:
        """A copy for one more waiter: one exception object raised in many tasks would
        gather their tracebacks."""
        return ModelLoadFailed(self.message, param=self.param)


class UpstreamStatus(UpstreamError):
    """The upstream answered with an error status; its body is kept as it was sent
    when it already has the OpenAI shape. ``raw`` and ``headers`` are the answer as it
    came, which a relayed request gets back unchanged (proxy/relay.py)."""

    def __init__(
        self,
        status: int,
        raw: bytes,
        content_type: str | None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.status = status
        self.raw = raw
        self.content_type = content_type
        self.headers = headers
        default_type = "invalid_request_error" if status < 500 else "upstream_error"
        parsed = _openai_error(raw, default_type)
        if parsed is None:
            text = raw.decode("utf-8", "replace").strip()
            if len(text) > 500:
                text = text[:500] + "..."
            message = f"upstream returned HTTP {status}" + (f": {text}" if text else "")
            parsed = error_body(message, default_type, None, f"upstream_{status}")
        error = parsed["error"]
        self._body: dict[str, Any] = parsed
        message = str(error.get("message") or f"upstream returned HTTP {status}")
        self.context_overflow = _is_context_overflow(status, error, message)
        if self.context_overflow:
            # Every server words it differently; clients test for OpenAI's code.
            error["code"] = "context_length_exceeded"
            error["type"] = "invalid_request_error"
        self.error_type = str(error["type"])
        self.code = error["code"]
        super().__init__(message)

    def body(self) -> dict[str, Any]:
        return self._body

    def extend_message(self, note: str) -> None:
        self.message += note
        self._body["error"]["message"] = str(self._body["error"].get("message") or "") + note


def _is_context_overflow(status: int, error: dict[str, Any], message: str) -> bool:
    if error.get("code") == "context_length_exceeded":
        return True
    if error.get("type") == "exceed_context_size_error":  # llama.cpp
        return True
    return status in (400, 413) and bool(_CONTEXT_WORDING.search(message))


@dataclass(frozen=True, slots=True)
class ItemLimit:
    """The most elements an array of a request may hold, and the setting that says so."""

    count: int
    setting: str
    advice: str = ""  # what to do instead, after "; "

    def refuse(self, param: str) -> BadRequest:
        advice = f"; {self.advice}" if self.advice else ""
        return BadRequest(
            f"'{param}' holds more than {self.count} items, the most lmbridge takes in one "
            f"request ({self.setting}){advice}.",
            param=param,
            code="too_many_items",
        )


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def _openai_error(raw: bytes, default_type: str) -> dict[str, Any] | None:
    """The upstream's body if it is an OpenAI-style error (a string ``error`` is lifted)."""
    try:
        data = loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict) or "error" not in data:
        return None
    error = data["error"]
    if isinstance(error, str):
        return error_body(error, default_type, None, None)
    if isinstance(error, dict) and "message" in error:
        error = dict(error)
        error.setdefault("type", default_type)
        error.setdefault("param", None)
        error.setdefault("code", None)
        if not isinstance(error["code"], str | None):
            error["code"] = str(error["code"])  # llama.cpp sends the HTTP status as a number
        return {"error": error}
    return None
