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
        # Whether the readers read nothing yet: a plain first delta is seen from its bytes.
        self._starting = rewriter.starting

    def feed(self, chunk: bytes) -> bytes:
        if self.relaying:
            return chunk
        if self._plain:  # the common read, one event of plain content (_framed, inlined)
            head, tail = self._frame
            if (
                chunk.startswith(head)
                and chunk.endswith(tail)
                and _PLAIN_TEXT(chunk, len(head), len(chunk) - len(tail)) is not None
            ):
                return chunk
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
            whole = not at and end == size  # its frame was tried above
            piece = chunk if whole else chunk[at:end]
            if self._plain:
                if not whole and self._framed(piece):
                    at = end
                    continue
                kind = _event_kind(piece)
                if kind == _PLAIN:
                    self._frame = _frame_of(piece)
                    at = end
                    continue
                if kind == _ENDING and self.rewriter.calls == 0:
                    # The last delta, plain, with nothing held: nothing can change now.
                    self.relaying = True
                    at = size
                    break
            elif self._starting and self._plain_start(piece):
                at = end
                if self.relaying:
                    at = size
                    break
                continue
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

    def _framed(self, piece: bytes) -> bool:
        """Whether ``piece`` is an event of plain content in the frame of the last one:
        most streams frame every content delta in the same bytes (id, model, the same
        keys), so only the text in it is looked at, by three calls into C."""
        head, tail = self._frame
        return (
            piece.startswith(head)
            and piece.endswith(tail)
            and _PLAIN_TEXT(piece, len(head), len(piece) - len(tail)) is not None
        )

    def _plain_start(self, piece: bytes) -> bool:
        """Whether ``piece`` is an event before any content or with a plain first delta,
        which passes as it came (the readers told of the delta)."""
        if _event_kind(piece) != _PLAIN:
            return False
        head, tail = frame = _frame_of(piece)
        if frame is _NO_FRAME:
            # No content (a role, say): passes. A content of another shape is read.
            contents = piece.count(b'"content"')
            return contents == 0 or (contents == 1 and _NULL_CONTENT.search(piece) is not None)
        end = len(piece) - len(tail)
        if end == len(head):
            return True  # empty content, which the readers never see
        first = piece[len(head)]
        if first == 0x20 or first == 0x7B or first >= 0x80:  # space, brace, not ASCII
            return False
        self.rewriter.plain_start()
        self._starting = False
        self._frame = frame
        self._plain = self.rewriter.passing
        # Thinking only looked for at the start: from here every byte passes.
        self.relaying = not self.rewriter.watching
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
            self._plain = self._starting = False
            return b""
        if idle and not self.rewriter.watching:
            self.relaying = True
        self._plain = idle and not self._dirty and self.rewriter.passing
        self._starting = idle and not self._dirty and self.rewriter.starting
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
        if rewriter.passing and _content_kind(event.data) == _PLAIN:
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


# What the bytes of an event are: not plain content, a delta of plain content, or the
# last delta (with a finish reason) of plain content.
_NOT_PLAIN, _PLAIN, _ENDING = 0, 1, 2


def _event_kind(chunk: bytes) -> int:
    """What ``chunk`` is when it is one whole ``data:`` event (one line)."""
    if (
        chunk.find(b"\n") != len(chunk) - 2
        or not chunk.endswith(b"\n\n")
        or not chunk.startswith(b"data: ")
    ):
        return _NOT_PLAIN
    return _content_kind(chunk)


# The text of a content string that no reader would change: no quote (an escaped one
# ends it), escape (a \u003c is a <), <, [ or backtick.
_PLAIN_TEXT = re.compile(rb'[^"\\<\[`]*').fullmatch
_FINISHED = re.compile(rb'"finish_reason"\s*:\s*"')
_NULL_CONTENT = re.compile(rb'"content"\s*:\s*null')
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


def _content_kind(data: bytes) -> int:
    """Whether an event is a content delta the readers would pass unchanged, seen from its
    bytes: no ``<``, backtick, escape (a ``\\u003c`` is a ``<``) or ``[`` but the one of
    ``"choices": [`` (so no list of calls either), no reasoning or error; and whether it
    has a finish reason. (Few separate tests, each one call into C: faster here than one
    regular expression with alternatives; a null finish reason written with other
    spacing than these two is read the slow way.)"""
    if (
        data.count(b"[") != 1
        or len(data) - len(data.translate(None, b"<`\\[")) != 1
        or b'"reasoning' in data
        or b'"error"' in data
    ):
        return _NOT_PLAIN
    if (
        b'"finish_reason"' not in data
        or b'"finish_reason":null' in data
        or b'"finish_reason": null' in data
    ):
        return _PLAIN
    return _ENDING if _FINISHED.search(data) is not None else _NOT_PLAIN
