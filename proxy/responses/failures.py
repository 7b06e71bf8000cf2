"""What a failed turn becomes: the Response's ``error`` (code and type) and what a
non-streamed create answers. Pure."""

from __future__ import annotations

from proxy.errors import (
    BadRequest,
    LMBridgeError,
    ModelBusy,
    NotFound,
    QueueTimeout,
    UpstreamError,
    UpstreamStatus,
)

# What fails a turn (stored as a failed response) rather than the request: the upstream
# failed, or the model's queue refused the call or kept it too long.
TURN_FAILURES = (UpstreamError, ModelBusy, QueueTimeout)


def failure_code(exc: LMBridgeError) -> str:
    if isinstance(exc, UpstreamStatus) and exc.context_overflow:
        return "context_length_exceeded"
    return exc.code or "upstream_error"


def response_error_code(exc: LMBridgeError, code: str) -> str:
    """The Response's ``error.code``: one of the API's codes (the SDK's models accept no
    other); lmbridge's own, finer code goes in ``error.type``. The context error keeps
    its well-known code, which clients test for."""
    if code == "context_length_exceeded":
        return code
    if isinstance(exc, ModelBusy):
        return "rate_limit_exceeded"
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        return "rate_limit_exceeded" if exc.status == 429 else "invalid_prompt"
    return "server_error"


def client_error(exc: LMBridgeError, code: str, response_id: str) -> LMBridgeError:
    """What a non-streamed create answers when the upstream failed: the request's own
    fault (context too long) is a 400, anything else keeps the upstream's status."""
    note = f" (response {response_id} was stored with status 'failed')"
    if code == "context_length_exceeded":
        return BadRequest(exc.message + note, param="input", code=code)
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        return BadRequest(exc.message + note, code=code)
    exc.extend_message(note)
    return exc


def response_not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")
