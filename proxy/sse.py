"""Server-sent events: an incremental parser and the encoder. No I/O.

The parser is fed raw bytes as they come off the wire (events may be split
across reads, or several may share one) and returns complete events. It
accepts ``\\n``, ``\\r\\n`` and ``\\r`` line endings, comments, multi-line
``data:`` fields, and a last event without its closing blank line (``finish``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.jsontext import dumps_bytes, loads

DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    data: bytes
    event: str | None = None

    @property
    def is_done(self) -> bool:
        return self.data.strip() == DONE

    def json(self) -> Any:
        return loads(self.data)


class SSEParser:
    __slots__ = ("_buffer", "_data", "_event")

    def __init__(self) -> None:
        self._buffer = b""
        self._data: list[bytes] = []
        self._event: str | None = None

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        buffer = self._buffer + chunk if self._buffer else chunk
        if b"\r" in buffer:
            # Keep a trailing \r: it may be the first half of \r\n.
            tail = b"\r" if buffer.endswith(b"\r") else b""
            body = buffer[:-1] if tail else buffer
            buffer = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + tail
        events: list[SSEEvent] = []
        start = 0
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            self._line(buffer[start:end], events)
            start = end + 1
        self._buffer = buffer[start:]
        return events

    @property
    def idle(self) -> bool:
        """Whether every byte fed so far belongs to a complete event."""
        return not self._buffer and not self._data and self._event is None

    def finish(self) -> list[SSEEvent]:
        """Events still pending when the stream ends without a final blank line."""
        events: list[SSEEvent] = []
        if self._buffer:
            self._line(self._buffer.rstrip(b"\r"), events)
            self._buffer = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                events.append(SSEEvent(b"\n".join(self._data), self._event))
            self._data = []
            self._event = None
            return
        if line.startswith(b":"):
            return
        field, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if field == b"data":
            self._data.append(value)
        elif field == b"event":
            self._event = value.decode("utf-8", "replace")


def encode_event(payload: Any, event: str | None = None) -> bytes:
    """One event as bytes, to be written in a single write."""
    data = payload if isinstance(payload, bytes) else dumps_bytes(payload)
    head = f"event: {event}\n".encode() if event else b""
    if b"\n" in data:  # only raw bytes can hold one; JSON never does
        data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\ndata: ")
    return head + b"data: " + data + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
