"""One WebSocket connection to ``/v1/responses``, the pure part: what a client message
asks, the responses the connection keeps in memory, and how long it may last. No I/O;
``websocket.py`` drives it.

The transport follows the Open Responses specification (2026-04-24, "WebSocket
Transport"): each turn is a ``response.create`` message carrying a create body without
the HTTP-only fields; turns run one at a time, in order; the latest responses of the
connection are kept here, so that a ``previous_response_id`` continuation reads nothing
from storage and works with ``store: false``; a continuation that fails forgets the
response it continued; the connection ends at its age limit.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from json import JSONDecodeError
from typing import Any, Generic, TypeVar

from proxy.errors import BadRequest, PreviousResponseNotFound
from proxy.jsontext import loads_request

# Fields of the HTTP create body that mean nothing on a socket: every turn streams, and
# a turn outlives nothing (the connection is its client).
HTTP_ONLY_FIELDS = ("stream", "stream_options", "background")
# Values that say what the socket does anyway: Codex CLI sends "stream": true on it.
TOLERATED: dict[str, object] = {"stream": True, "background": False}
# Responses kept per connection: a client continues the latest, or one a few turns
# back when it retries; each holds the rendered chain, shared with its predecessors.
KEPT_RESPONSES = 16

T = TypeVar("T")


def read_create(data: str) -> dict[str, Any]:
    """The create body a client message carries (to be streamed), or BadRequest."""
    try:
        message = loads_request(data.encode("utf-8", "surrogatepass"))
    except (JSONDecodeError, UnicodeDecodeError) as exc:
        where = (
            f": {exc.msg} at line {exc.lineno} column {exc.colno}"
            if isinstance(exc, JSONDecodeError)
            else ""
        )
        raise BadRequest(
            f"The message is not valid JSON{where}. Send one JSON object per text message."
        ) from None
    if not isinstance(message, dict):
        raise BadRequest("A message must be a JSON object with a 'type'.", param="type")
    kind = message.pop("type", None)
    if kind != "response.create":
        shown = repr(kind) if isinstance(kind, str) else "none"
        raise BadRequest(
            f"Unknown message type {shown[:80]}: lmbridge takes 'response.create', with the "
            "fields of a create request.",
            param="type",
            code="unknown_message_type",
        )
    for name in HTTP_ONLY_FIELDS:
        if name in message and message[name] != TOLERATED.get(name, ...):
            raise BadRequest(
                f"'{name}' is not sent over a WebSocket: every response streams its events "
                "on the connection.",
                param=name,
            )
    message.pop("background", None)
    message["stream"] = True
    return message


def continued(body: dict[str, Any]) -> str | None:
    """The ``previous_response_id`` a create body continues, if it names one."""
    previous = body.get("previous_response_id")
    return previous if isinstance(previous, str) else None


@dataclass
class SocketSession(Generic[T]):
    """The connection's clock and memory. ``T`` is what a kept response holds (the
    rendered chain of turns it ends)."""

    opened_at: float
    max_age: float
    kept: int = KEPT_RESPONSES
    turns: int = 0
    _memory: OrderedDict[str, T] = field(default_factory=OrderedDict)

    def remaining(self, now: float) -> float:
        return self.opened_at + self.max_age - now

    def expired(self, now: float) -> bool:
        return self.remaining(now) <= 0

    def remember(self, response_id: str, value: T) -> None:
        memory = self._memory
        memory[response_id] = value
        memory.move_to_end(response_id)
        while len(memory) > self.kept:
            memory.popitem(last=False)

    def recall(self, response_id: str) -> T | None:
        value = self._memory.get(response_id)
        if value is not None:
            self._memory.move_to_end(response_id)
        return value

    def forget(self, response_id: str) -> None:
        self._memory.pop(response_id, None)

    def __contains__(self, response_id: str) -> bool:
        return response_id in self._memory

    def continuation(self, body: dict[str, Any]) -> T | None:
        """What the turn continues from memory; None when it continues nothing or reads
        storage. With ``store: false`` nothing is read from storage: an id this
        connection does not hold is not found."""
        previous = continued(body)
        if previous is None:
            return None
        value = self.recall(previous)
        if value is None and body.get("store") is False:
            raise PreviousResponseNotFound(
                f"Previous response with id '{previous}' not found on this connection: with "
                "'store': false a response is kept only by the WebSocket connection that "
                "made it. Send the whole input again, without 'previous_response_id'.",
                param="previous_response_id",
            )
        return value
