"""What a failed turn becomes: the Response's ``error`` (code and type) and what a
non-streamed create answers. Pure."""

from __future__ import annotations

from proxy.errors import BadRequest, LMBridgeError, NotFound, UpstreamError, UpstreamStatus


def failure_code(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamStatus) and exc.context_overflow:
        return "context_length_exceeded"
    return exc.code or "upstream_error"


def response_error_code(exc: UpstreamError, code: str) -> str:
    """The Response's ``error.code``: one of the API's codes (the SDK's models accept no
    other); lmbridge's own, finer code goes in ``error.type``. The context error keeps
    its well-known code, which clients test for."""
    if code == "context_length_exceeded":
        return code
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        return "rate_limit_exceeded" if exc.status == 429 else "invalid_prompt"
    return "server_error"


def client_error(exc: UpstreamError, code: str, response_id: str) -> LMBridgeError:
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
