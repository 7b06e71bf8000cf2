"""What one request spent, noted while it runs and read when it ends.

A handler that calls a model marks its request ``Metered`` (proxy/keys.py ``METERED``)
and adds the usage the upstream reported, in whichever form it came (chat completions,
Responses, Anthropic messages); the middleware, which knows the status the request
ended with, turns the note into a usage record (proxy/usage_recorder.py). Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any, Literal

Api = Literal["chat", "completions", "embeddings", "responses", "relay"]
Outcome = Literal["ok", "error", "cancelled"]

# What a request says nothing about costs nothing: missing or malformed counts are 0.
Tokens = tuple[int, int, int, int]  # prompt, cached, completion, reasoning


def tokens_of(usage: Any) -> Tokens:
    """Prompt, cached, completion and reasoning tokens of a ``usage`` object of any API
    lmbridge relays or serves."""
    if not isinstance(usage, dict):
        return 0, 0, 0, 0
    prompt = _int(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _int(usage.get("completion_tokens", usage.get("output_tokens")))
    prompt_details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    completion_details = usage.get("completion_tokens_details", usage.get("output_tokens_details"))
    cached = _int(_get(prompt_details, "cached_tokens"))
    # Anthropic's messages count the cache apart from input_tokens.
    cache_read = _int(usage.get("cache_read_input_tokens"))
    cached += cache_read
    prompt += cache_read + _int(usage.get("cache_creation_input_tokens"))
    reasoning = _int(_get(completion_details, "reasoning_tokens"))
    return prompt, cached, completion, reasoning


def usage_in_body(body: bytes) -> dict[str, Any] | None:
    """The top-level ``usage`` object of a JSON answer, read from its last ``"usage"``
    key without parsing the rest (the answer may be megabytes of embeddings). Inside
    JSON strings quotes are escaped, so generated text cannot imitate the key."""
    start = body.rfind(b'"usage"')
    if start < 0:
        return None
    colon = body.find(b":", start + 7)
    if colon < 0:
        return None
    try:
        tail = body[colon + 1 :].decode()
        value, _ = json.JSONDecoder().raw_decode(tail.lstrip())
    except (UnicodeDecodeError, ValueError):
        return None
    return value if isinstance(value, dict) else None


class Metered:
    """A request that calls a model: its API, the tokens reported so far (summed over
    the upstream calls of a tool loop), when its first token was relayed, and the
    error that ended a stream whose status was already sent."""

    __slots__ = ("api", "error_code", "reported", "tokens", "ttft")

    def __init__(self, api: Api) -> None:
        self.api: Api = api
        self.tokens: Tokens = (0, 0, 0, 0)
        self.reported = False
        self.ttft: float | None = None  # seconds from the request's start
        self.error_code: str | None = None

    def add(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        self.reported = True
        p, c, o, r = tokens_of(usage)
        tp, tc, to, tr = self.tokens
        self.tokens = (tp + p, tc + c, to + o, tr + r)

    def first_token(self, seconds: float) -> None:
        if self.ttft is None:
            self.ttft = seconds


def outcome_of(status: int, error_code: str | None) -> tuple[Outcome, str | None]:
    """How a request ended, from its status and the code of its error if any: 499 is a
    client that went away; a 200 stream that ended on an error event is an error."""
    if status == 499:
        return "cancelled", error_code or "client_gone"
    if status >= 400 or error_code is not None:
        return "error", error_code or f"http_{status}"
    return "ok", None


def responses_outcome(response: dict[str, Any]) -> tuple[Outcome, str | None]:
    """How a Response ended, from its status and error."""
    status = response.get("status")
    if status in ("completed", "incomplete"):
        return "ok", None
    if status == "cancelled":
        return "cancelled", "cancelled"
    error = response.get("error")
    code = error.get("code") if isinstance(error, dict) else None
    return "error", str(code) if code else "failed"


def _get(details: Any, key: str) -> Any:
    return details.get(key) if isinstance(details, dict) else None


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
