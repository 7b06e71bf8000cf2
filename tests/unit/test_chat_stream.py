"""StreamObserver: what the relay learns from a chat/completions stream it passes on; the
usage lmbridge asks for on a client's behalf, kept from that client."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.chat_stream import StreamObserver, UsageFilter, ask_for_usage
from proxy.sse import DONE_EVENT, encode_event

ID = "chatcmpl-123"
USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> dict:
    return {
        "id": ID,
        "object": "chat.completion.chunk",
        "created": 1735000000,
        "model": "qwen/qwen3-4b",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
        **extra,
    }


def stream(*events: Any, done: bool = True) -> bytes:
    raw = b"".join(e if isinstance(e, bytes) else encode_event(e) for e in events)
    return raw + (DONE_EVENT if done else b"")


def tool_delta(index: int, arguments: str, *, call_id: str = "call_1", name: str = "get_weather"):
    # llama.cpp-python repeats id, type and name in every delta of a tool call.
    return {
        "tool_calls": [
            {
                "index": index,
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        ]
    }


USAGE_CHUNK = {
    "id": ID,
    "object": "chat.completion.chunk",
    "created": 1735000000,
    "model": "qwen/qwen3-4b",
    "choices": [],
    "usage": USAGE,
}

# (name, stream bytes, data_events, finished, done, usage, upstream_error)
CASES: list[tuple[str, bytes, int, bool, bool, Any, Any]] = [
    (
        "complete-with-usage",
        stream(
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Hel"}),
            chunk({"content": "lo"}),
            chunk(finish="stop"),
            USAGE_CHUNK,
        ),
        5,
        True,
        True,
        USAGE,
        None,
    ),
    (
        "complete-without-usage",
        stream(chunk({"content": "Hi"}), chunk(finish="stop")),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "usage-null-in-every-chunk",
        stream(chunk({"content": "Hi"}, usage=None), chunk(finish="length", usage=None)),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "llama-cpp-usage-in-finish-chunk",
        stream(
            chunk({"content": "Hi"}),
            chunk(finish="stop", usage=USAGE, timings={"prompt_n": 12, "predicted_n": 3}),
        ),
        2,
        True,
        True,
        USAGE,
        None,
    ),
    (
        "cut-before-finish-reason",
        stream(chunk({"role": "assistant"}), chunk({"content": "par"}), done=False),
        2,
        False,
        False,
        None,
        None,
    ),
    (
        "finish-reason-null-is-not-a-finish",
        stream(chunk({"content": "a"}), chunk({"content": "b"}), done=False),
        2,
        False,
        False,
        None,
        None,
    ),
    (
        "done-without-finish-reason",
        stream(chunk({"content": "a"})),
        1,
        False,
        True,
        None,
        None,
    ),
    (
        "finish-without-done",
        stream(chunk({"content": "a"}), chunk(finish="stop"), done=False),
        2,
        True,
        False,
        None,
        None,
    ),
    (
        "finish-reason-text-inside-content",
        stream(chunk({"content": 'the JSON was {"finish_reason": "stop"}'}), done=False),
        1,
        False,
        False,
        None,
        None,
    ),
    (
        "error-event-object",
        stream(
            chunk({"content": "a"}),
            {"error": {"message": "model crashed", "type": "server_error", "code": None}},
            done=False,
        ),
        2,
        False,
        False,
        None,
        {"error": {"message": "model crashed", "type": "server_error", "code": None}},
    ),
    (
        "error-event-string",
        stream({"error": "Context length exceeded"}, done=False),
        1,
        False,
        False,
        None,
        {"error": "Context length exceeded"},
    ),
    (
        "error-event-with-event-field",
        stream(encode_event({"error": {"message": "boom"}}, "error"), done=False),
        1,
        False,
        False,
        None,
        {"error": {"message": "boom"}},
    ),
    (
        "error-word-in-content-is-not-an-error",
        stream(chunk({"content": "error"}), chunk(finish="stop")),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "error-null-is-not-an-error",
        stream(chunk({"content": "a"}, error=None), chunk(finish="stop")),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "not-json-with-usage-text",
        stream(b'data: {"usage": {broken\n\n', chunk(finish="stop")),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "comments-and-keepalives-are-not-events",
        stream(b": ping\n\n", chunk({"content": "a"}), b": ping\n\n", chunk(finish="stop")),
        2,
        True,
        True,
        None,
        None,
    ),
    (
        "llama-cpp-python-tool-call-deltas",
        stream(
            chunk({"role": "assistant", "content": None}),
            chunk(tool_delta(0, "")),
            chunk(tool_delta(0, '{"city": ')),
            chunk(tool_delta(0, '"Paris"}')),
            chunk(tool_delta(1, '{"city": "Rome"}', call_id="call_2")),
            chunk(finish="tool_calls"),
            USAGE_CHUNK,
        ),
        7,
        True,
        True,
        USAGE,
        None,
    ),
    (
        "crlf-line-endings",
        stream(chunk({"content": "a"}), chunk(finish="stop"), USAGE_CHUNK).replace(b"\n", b"\r\n"),
        3,
        True,
        True,
        USAGE,
        None,
    ),
    ("empty-stream", b"", 0, False, False, None, None),
    ("only-done", DONE_EVENT, 0, False, True, None, None),
]


def observe(pieces: list[bytes]) -> StreamObserver:
    observer = StreamObserver()
    for piece in pieces:
        observer.feed(piece)
    observer.finish()
    return observer


def outcome(observer: StreamObserver) -> tuple[int, bool, bool, Any, Any]:
    return (
        observer.data_events,
        observer.finished,
        observer.done,
        observer.usage,
        observer.upstream_error,
    )


@pytest.mark.parametrize(
    ("raw", "data_events", "finished", "done", "usage", "error"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_observed_in_one_piece(raw, data_events, finished, done, usage, error):
    """The observer notes data events, finish_reason, [DONE], usage and an error event."""
    assert outcome(observe([raw])) == (data_events, finished, done, usage, error)


@pytest.mark.parametrize(
    ("raw", "data_events", "finished", "done", "usage", "error"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_observed_in_small_pieces(raw, data_events, finished, done, usage, error):
    """Any chunking of the bytes (here 1, 7 and 64 bytes) is observed the same way."""
    for size in (1, 7, 64):
        pieces = [raw[i : i + size] for i in range(0, len(raw), size)]
        assert outcome(observe(pieces)) == (data_events, finished, done, usage, error), size


def test_initial_state():
    """A new observer has seen nothing."""
    assert outcome(StreamObserver()) == (0, False, False, None, None)


@pytest.mark.parametrize(
    ("pieces", "returns", "data_events"),
    [
        ([stream(chunk({"content": "a"}), done=False)], [1], 1),
        ([stream(chunk({"content": "a"}), chunk({"content": "b"}), done=False)], [2], 2),
        ([b"data: {}", b"\n", b"\n"], [0, 0, 1], 1),
        ([b": keep-alive\n\n", b"data: {}\n\n"], [0, 1], 1),
    ],
)
def test_feed_returns_events_completed(pieces, returns, data_events):
    """feed() returns how many events the chunk completed (0 while an event is partial)."""
    observer = StreamObserver()
    assert [observer.feed(piece) for piece in pieces] == returns
    assert observer.data_events == data_events


def test_finish_counts_a_last_event_without_blank_line():
    """finish() notes an event left pending when the stream ended without a blank line."""
    observer = StreamObserver()
    observer.feed(stream(chunk({"content": "a"}), done=False))
    observer.feed(b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}')
    assert (observer.data_events, observer.finished) == (1, False)
    observer.finish()
    assert (observer.data_events, observer.finished) == (2, True)


def test_last_usage_wins():
    """When several chunks carry usage, the last one is kept."""
    later = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    observer = observe([stream(chunk(finish="stop", usage=USAGE), USAGE_CHUNK | {"usage": later})])
    assert observer.usage == later


USAGE_EVENT = b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3}}\n\n'
TEXT_EVENTS = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"usage"}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
)


@pytest.mark.parametrize("cut", [1, 7, 50, 10_000])
def test_usage_filter_drops_the_usage_event_however_the_stream_is_cut(cut):
    """Only the usage-only event goes (a content that says "usage" stays), whatever the
    reads; [DONE] and the order of the rest are kept."""
    raw = TEXT_EVENTS + USAGE_EVENT + b"data: [DONE]\n\n"
    usage_filter = UsageFilter()
    out = b"".join(usage_filter.feed(raw[i : i + cut]) for i in range(0, len(raw), cut))
    assert out + usage_filter.finish() == TEXT_EVENTS + b"data: [DONE]\n\n"


def test_usage_filter_at_the_end_and_with_cr_lf():
    """A usage event cut off by the end of the stream is dropped too; a stream framed
    with CR LF passes as it is."""
    usage_filter = UsageFilter()
    assert usage_filter.feed(TEXT_EVENTS + USAGE_EVENT[:-2]) == TEXT_EVENTS
    assert usage_filter.finish() == b""
    crlf = TEXT_EVENTS.replace(b"\n", b"\r\n") + USAGE_EVENT.replace(b"\n", b"\r\n")
    assert UsageFilter().feed(crlf) == crlf


@pytest.mark.parametrize(
    "body,asked",
    [
        ({"stream": True}, {"include_usage": True}),
        ({"stream": True, "stream_options": {"x": 1}}, {"x": 1, "include_usage": True}),
        ({"stream": True, "stream_options": {"include_usage": False}}, {"include_usage": True}),
    ],
)
def test_usage_is_asked_for_a_stream_whose_client_did_not(body, asked):
    assert ask_for_usage(body) is True
    assert body["stream_options"] == asked


@pytest.mark.parametrize(
    "body", [{}, {"stream": False}, {"stream": True, "stream_options": {"include_usage": True}}]
)
def test_usage_is_not_asked_again_or_for_whole_answers(body):
    before = dict(body)
    assert ask_for_usage(body) is False
    assert body == before
