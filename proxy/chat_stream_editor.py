"""A ``ChatStreamRewriter`` over the raw bytes of a chat completion stream (SSE): the
bytes of events nothing changes go out as they came, and the common event, a delta of
plain content, is recognised from its bytes without the SSE parser or JSON; once
nothing more can change (plain content began and no tools were offered, or the answer
ended) every later byte passes without being looked at. Pure."""

from __future__ import annotations

import re

from proxy.chat_output import ChatStreamRewriter
from proxy.jsontext import loads
from proxy.sse import DONE_EVENT, SSEEvent, SSEParser, encode_event


class ChatStreamEditor:
    """A ``ChatStreamRewriter`` over the raw bytes of an SSE stream: bytes in, bytes out.

    Bytes of events left unchanged go out as they came, once their events are complete;
    a changed event goes out encoded again, with the events completed before it. When
    the rewriter stops watching, ``relaying`` turns true and every later chunk is
    returned as it is, without being parsed."""

    def __init__(self, rewriter: ChatStreamRewriter) -> None:
        self.rewriter = rewriter
        self.relaying = False
        self._parser = SSEParser()
        self._held = b""  # raw bytes of events not yet complete, all unchanged so far
        # The events completed since: unchanged ones as they came (encoded only if they
        # must go out encoded), changed ones as their encoded replacement.
        self._pending: list[SSEEvent | bytes] = []
        self._dirty = False  # the raw bytes of an event in the parser were given up
        # Whether an event of plain content would pass as it came: it changes only when
        # an event is read (_feed), so it is kept rather than asked of the readers for
        # every chunk.
        self._plain = False
        self._frame = _NO_FRAME

    def feed(self, chunk: bytes) -> bytes:
        if self.relaying:
            return chunk
        if self._plain and self._plain_event(chunk):
            return chunk  # the common read: one event of plain content
        if b"\r" in chunk:  # rare framing: read whole
            return self._feed(chunk)
        # Event by event, so that relaying can start right after the event that decided
        # it; a run of events that pass goes out as one slice of the read (the whole
        # read, when every event in it passes), and the read is never copied piece by
        # piece.
        out: list[bytes] = []
        run = at = 0  # chunk[run:at] passes as it came
        size = len(chunk)
        while at < size:
            end = chunk.find(b"\n\n", at) + 2
            if end == 1:
                end = size
            piece = chunk[at:end] if at or end != size else chunk
            if self._plain:
                if self._plain_event(piece):
                    at = end
                    continue
                if self.rewriter.calls == 0 and _one_plain_event(piece, ending=True):
                    # The last delta, plain, with nothing held: nothing can change now.
                    self.relaying = True
                    at = size
                    break
            if run < at:
                out.append(chunk[run:at])
            out.append(self._feed(piece))
            run = at = end
            if self.relaying:
                at = size
                break
        if not out:
            return chunk  # every event passed
        if run < at:
            out.append(chunk[run:at])
        return b"".join(out)

    def _plain_event(self, chunk: bytes) -> bool:
        """Whether ``chunk`` is one whole ``data:`` event of plain content. Most streams
        frame every content delta in the same bytes (id, model, the same keys): when the
        chunk has the frame of the last plain event, only the text in it is looked at."""
        head, tail = self._frame
        end = len(chunk) - len(tail)
        if end >= len(head) and chunk.startswith(head) and chunk.endswith(tail):
            text = chunk[len(head) : end]
            return (
                b'"' not in text
                and b"\\" not in text
                and b"<" not in text
                and b"[" not in text
                and b"`" not in text
            )
        if not _one_plain_event(chunk):
            return False
        self._frame = _frame_of(chunk)
        return True

    def _feed(self, chunk: bytes) -> bytes:
        changed = self._read(self._parser.feed(chunk))
        idle = self._parser.idle
        if changed or self._dirty:
            out = self._encoded()
            self._pending, self._held = [], b""
            self._dirty = not idle
        elif idle:
            out = self._held + chunk
            self._pending, self._held = [], b""
        else:
            self._held += chunk
            self._plain = False
            return b""
        if idle and not self.rewriter.watching:
            self.relaying = True
        self._plain = idle and not self._dirty and self.rewriter.passing
        return out

    def finish(self) -> bytes:
        """The end of the upstream's stream: what is held, and what the rewriter held."""
        if self.relaying:
            return b""
        changed = self._read(self._parser.finish())
        flushed = self.rewriter.finish()
        if changed or self._dirty or flushed:
            return self._encoded() + b"".join(encode_event(c) for c in flushed)
        return self._held

    def _encoded(self) -> bytes:
        return b"".join(
            encode_event(p.data, p.event) if isinstance(p, SSEEvent) else p for p in self._pending
        )

    def _read(self, events: list[SSEEvent]) -> bool:
        """Each event into ``_pending``; whether any changed."""
        changed = False
        for event in events:
            result = self._rewrite(event)
            if result is None:
                self._pending.append(event)
            else:
                self._pending.append(result)
                changed = True
        return changed

    def _rewrite(self, event: SSEEvent) -> bytes | None:
        rewriter = self.rewriter
        if not rewriter.watching:  # a read ends with events nothing can change
            return None
        if rewriter.passing and _plain_content(event.data):
            return None  # the common case of a stream with tools offered: no parsing
        if event.is_done:
            flushed = self.rewriter.finish()
            if not flushed:
                return None
            return b"".join(encode_event(c) for c in flushed) + DONE_EVENT
        try:
            chunk = loads(event.data)
        except ValueError:
            return None
        chunks = self.rewriter.feed(chunk)
        if chunks is None:
            return None
        return b"".join(encode_event(c) for c in chunks)


def _one_plain_event(chunk: bytes, *, ending: bool = False) -> bool:
    """Whether ``chunk`` is one whole ``data:`` event (one line) of plain content
    (``ending``: with a finish reason)."""
    return (
        chunk.find(b"\n") == len(chunk) - 2
        and chunk.endswith(b"\n\n")
        and chunk.startswith(b"data: ")
        and _plain_content(chunk, ending=ending)
    )


_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
# A frame no event has: every event starts with "data: ".
_NO_FRAME = (b"\0", b"")


def _frame_of(event: bytes) -> tuple[bytes, bytes]:
    """The bytes of a plain event before and after the text of its content string."""
    at = event.find(b'"content":')
    if at < 0 or event.find(b'"content":', at + 1) >= 0:
        return _NO_FRAME
    start = event.find(b'"', at + 10)
    if start < 0 or event[at + 10 : start].strip():  # "content": null, or not a string
        return _NO_FRAME
    end = event.find(b'"', start + 1)  # plain content has no escapes: no \" inside
    if end < 0:
        return _NO_FRAME
    return event[: start + 1], event[end:]


def _plain_content(data: bytes, *, ending: bool = False) -> bool:
    """Whether an event is a content delta the readers would pass unchanged, seen from its
    bytes: no ``<``, backtick or ``[`` but the one of ``"choices": [``, no escape (a
    ``\\u003c`` is a ``<``), no calls, reasoning or error, and no finish reason (or, when
    ``ending``, one). (Separate ``in`` tests: twice as fast here as one regular
    expression with alternatives; a null finish reason written with other spacing than
    these two is read the slow way.)"""
    return (
        data.count(b"[") == 1
        and b"<" not in data
        and b"`" not in data
        and b"\\" not in data
        and b'"tool_calls"' not in data
        and b'"reasoning' not in data
        and b'"error"' not in data
        and (
            _FINISHED.search(data) is not None
            if ending
            else (
                b'"finish_reason"' not in data
                or b'"finish_reason":null' in data
                or b'"finish_reason": null' in data
            )
        )
    )
