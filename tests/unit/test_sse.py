"""SSE parsing and encoding: events survive any split of the byte stream."""

from __future__ import annotations

import pytest

from proxy.sse import DONE_EVENT, SSEEvent, SSEParser, encode_event


def parse_whole(raw: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(raw) + parser.finish()


def parse_pieces(pieces: list[bytes]) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events + parser.finish()


def ev(data: bytes, event: str | None = None) -> SSEEvent:
    return SSEEvent(data, event)


# (name, stream, expected events after finish())
STREAMS: list[tuple[str, bytes, list[SSEEvent]]] = [
    ("empty", b"", []),
    ("one-lf", b"data: a\n\n", [ev(b"a")]),
    ("one-crlf", b"data: a\r\n\r\n", [ev(b"a")]),
    ("one-cr", b"data: a\r\r", [ev(b"a")]),
    ("two-lf", b"data: a\n\ndata: b\n\n", [ev(b"a"), ev(b"b")]),
    ("two-crlf", b"data: a\r\n\r\ndata: b\r\n\r\n", [ev(b"a"), ev(b"b")]),
    ("two-cr", b"data: a\r\rdata: b\r\r", [ev(b"a"), ev(b"b")]),
    ("mixed-endings", b"data: a\r\n\ndata: b\r\rdata: c\n\r\n", [ev(b"a"), ev(b"b"), ev(b"c")]),
    ("multi-line-data", b"data: a\ndata: b\ndata: c\n\n", [ev(b"a\nb\nc")]),
    ("multi-line-data-crlf", b"data: a\r\ndata: b\r\n\r\n", [ev(b"a\nb")]),
    ("no-space", b"data:a\n\n", [ev(b"a")]),
    ("one-space-only-removed", b"data:  a \n\n", [ev(b" a ")]),
    ("empty-data", b"data:\n\n", [ev(b"")]),
    ("bare-data-field", b"data\n\n", [ev(b"")]),
    ("empty-data-lines", b"data:\ndata:\n\n", [ev(b"\n")]),
    ("colon-in-value", b'data: {"a":"b:c"}\n\n', [ev(b'{"a":"b:c"}')]),
    ("comment-only", b": keep-alive\n\n", []),
    ("comment-inside", b"data: a\n: ping\ndata: b\n\n", [ev(b"a\nb")]),
    ("comments-between", b": x\n\ndata: a\n\n:\n\n", [ev(b"a")]),
    ("event-field", b"event: response.created\ndata: {}\n\n", [ev(b"{}", "response.created")]),
    ("event-after-data", b"data: x\nevent: error\n\n", [ev(b"x", "error")]),
    ("event-not-carried-over", b"event: a\ndata: 1\n\ndata: 2\n\n", [ev(b"1", "a"), ev(b"2")]),
    ("event-without-data", b"event: ping\n\ndata: 2\n\n", [ev(b"2")]),
    ("other-fields-ignored", b"id: 7\nretry: 100\nfoo: bar\ndata: a\n\n", [ev(b"a")]),
    ("blank-lines-only", b"\n\n\r\n\r\r", []),
    ("utf8", "data: héllo 🚀\n\n".encode(), [ev("héllo 🚀".encode())]),
    ("done", b"data: [DONE]\n\n", [ev(b"[DONE]")]),
    (
        "openai-chunks",
        b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\n'
        b"data: [DONE]\n\n",
        [
            ev(b'{"choices":[{"delta":{"content":"Hi"}}]}'),
            ev(b'{"choices":[{"delta":{},"finish_reason":"stop"}]}'),
            ev(b"[DONE]"),
        ],
    ),
    # Ended without the closing blank line: finish() delivers the last event.
    ("last-without-blank-line", b"data: a\n\ndata: b\n", [ev(b"a"), ev(b"b")]),
    ("last-without-newline", b"data: a\n\ndata: b", [ev(b"a"), ev(b"b")]),
    ("last-without-newline-crlf", b"data: a\r\n\r\ndata: b\r\n", [ev(b"a"), ev(b"b")]),
    ("last-with-lone-cr", b"data: b\r", [ev(b"b")]),
    ("last-with-event", b"event: done\ndata: b", [ev(b"b", "done")]),
    ("trailing-comment", b"data: a\n\n: bye", [ev(b"a")]),
]

STREAM_TABLE = pytest.mark.parametrize(
    ("stream", "expected"), [s[1:] for s in STREAMS], ids=[s[0] for s in STREAMS]
)


@STREAM_TABLE
def test_whole_stream(stream, expected):
    """A stream fed in one piece yields its events."""
    assert parse_whole(stream) == expected


@STREAM_TABLE
def test_split_at_every_position(stream, expected):
    """Splitting the stream in two at any byte (even inside \\r\\n or a UTF-8 character)
    gives the same events."""
    for cut in range(len(stream) + 1):
        assert parse_pieces([stream[:cut], stream[cut:]]) == expected, f"cut at {cut}"


@STREAM_TABLE
def test_split_at_every_pair_of_positions(stream, expected):
    """Splitting the stream in three at any two bytes gives the same events."""
    for first in range(len(stream) + 1):
        for second in range(first, len(stream) + 1):
            pieces = [stream[:first], stream[first:second], stream[second:]]
            assert parse_pieces(pieces) == expected, f"cuts at {first}, {second}"


@STREAM_TABLE
def test_byte_by_byte(stream, expected):
    """Feeding one byte at a time gives the same events."""
    assert parse_pieces([stream[i : i + 1] for i in range(len(stream))]) == expected


@pytest.mark.parametrize(
    ("pieces", "per_feed", "at_finish"),
    [
        ([b"data: a\r", b"\n\r\n"], [[], [ev(b"a")]], []),
        ([b"data: a\r\n\r", b"\n"], [[], [ev(b"a")]], []),
        ([b"data: a\r\n", b"\r\n"], [[], [ev(b"a")]], []),
        ([b"data: a\n", b"\n"], [[], [ev(b"a")]], []),
        ([b"data: a\n\ndata: b\n\n"], [[ev(b"a"), ev(b"b")]], []),
        ([b"data: a\n\nda", b"ta: b\n\n"], [[ev(b"a")], [ev(b"b")]], []),
        ([b"data: a\n\nda", b"ta: b"], [[ev(b"a")], []], [ev(b"b")]),
        # A \r ending a feed may be the first half of \r\n, so with bare-\r line
        # endings the blank line is only seen with the next byte (or at finish).
        ([b"data: a\r", b"\r"], [[], []], [ev(b"a")]),
        ([b"data: a\r\r", b"data: b\r"], [[], [ev(b"a")]], [ev(b"b")]),
        ([b"data: a\r\r", b"d"], [[], [ev(b"a")]], []),
    ],
)
def test_events_are_returned_as_soon_as_complete(pieces, per_feed, at_finish):
    """Each feed returns the events its bytes complete; finish() returns the rest."""
    parser = SSEParser()
    assert [parser.feed(piece) for piece in pieces] == per_feed
    assert parser.finish() == at_finish


def test_cr_at_end_of_feed_is_held_until_the_next_byte():
    """A \\r ending a feed is not a line end yet: a following \\n makes it one \\r\\n."""
    parser = SSEParser()
    assert parser.feed(b"data: a\r") == []
    assert parser.feed(b"\n") == []  # one line end, not two: no blank line yet
    assert parser.feed(b"\r\n") == [ev(b"a")]


def test_feed_empty_chunk():
    """An empty chunk changes nothing."""
    parser = SSEParser()
    assert parser.feed(b"data: a") == []
    assert parser.feed(b"") == []
    assert parser.feed(b"\n\n") == [ev(b"a")]


def test_finish_is_idempotent():
    """finish() delivers the pending event once and then nothing more."""
    parser = SSEParser()
    parser.feed(b"data: a")
    assert parser.finish() == [ev(b"a")]
    assert parser.finish() == []


def test_finish_on_fresh_parser():
    """finish() without any input yields nothing."""
    assert SSEParser().finish() == []


def test_parser_is_reusable_after_finish():
    """After finish() the parser starts clean for new input."""
    parser = SSEParser()
    parser.feed(b"event: x\ndata: a")
    parser.finish()
    assert parser.feed(b"data: b\n\n") == [ev(b"b")]


@pytest.mark.parametrize(
    ("data", "done"),
    [
        (b"[DONE]", True),
        (b" [DONE] ", True),
        (b"[DONE]\n", True),
        (b"[done]", False),
        (b'"[DONE]"', False),
        (b"[DONE]x", False),
        (b"", False),
        (b'{"choices":[]}', False),
    ],
)
def test_is_done(data, done):
    """Only the data [DONE] (surrounding whitespace allowed) marks the end of a stream."""
    assert SSEEvent(data).is_done is done


def test_event_json():
    """json() decodes the event's data."""
    assert SSEEvent(b'{"a": [1, "\xc3\xa9"]}').json() == {"a": [1, "é"]}


# --- encoding ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "event", "expected"),
    [
        ({"a": 1}, None, b'data: {"a":1}\n\n'),
        ({"a": [1, 2], "b": None}, None, b'data: {"a":[1,2],"b":null}\n\n'),
        ({"text": "héllo"}, None, 'data: {"text":"héllo"}\n\n'.encode()),
        ({"text": "a\nb"}, None, b'data: {"text":"a\\nb"}\n\n'),
        ({"type": "x"}, "response.created", b'event: response.created\ndata: {"type":"x"}\n\n'),
        (b"[DONE]", None, b"data: [DONE]\n\n"),
        (b'{"raw": true}', "done", b'event: done\ndata: {"raw": true}\n\n'),
        ("text", None, b'data: "text"\n\n'),
        ({}, "", b"data: {}\n\n"),
    ],
)
def test_encode_event(payload, event, expected):
    """encode_event writes compact UTF-8 JSON (or bytes as given) in one data line."""
    assert encode_event(payload, event) == expected


@pytest.mark.parametrize(
    ("payload", "event"),
    [
        ({"choices": [{"delta": {"content": "line 1\nline 2\r\n"}}]}, None),
        ({"text": "🚀 é"}, "response.output_text.delta"),
        ([1, 2, 3], None),
    ],
)
def test_encode_then_parse(payload, event):
    """An encoded event parses back to the same JSON and event name."""
    (parsed,) = parse_whole(encode_event(payload, event))
    assert parsed.json() == payload
    assert parsed.event == event


def test_done_event_constant():
    """DONE_EVENT is the [DONE] event the parser recognises."""
    (parsed,) = parse_whole(DONE_EVENT)
    assert parsed.is_done


def test_encode_bytes_with_newline_round_trips():
    """Bytes with a newline are encoded as several data lines and parse back unchanged."""
    (parsed,) = parse_whole(encode_event(b"first\nsecond"))
    assert parsed.data == b"first\nsecond"
