"""The WebSocket session's rules, without a socket: messages, memory, the age limit."""

from __future__ import annotations

import json

import pytest

from proxy.errors import BadRequest, PreviousResponseNotFound
from proxy.responses.socket_session import KEPT_RESPONSES, SocketSession, continued, read_create
from tests.clock import FakeClock


def message(**fields) -> str:
    return json.dumps({"type": "response.create", **fields})


def test_a_create_message_becomes_a_streamed_create_body():
    body = read_create(message(model="m", input="hi", store=False))
    assert body == {"model": "m", "input": "hi", "store": False, "stream": True}


def test_http_fields_that_say_what_the_socket_does_anyway_are_tolerated():
    """Codex CLI sends "stream": true over its socket."""
    body = read_create(message(model="m", stream=True, background=False))
    assert body == {"model": "m", "stream": True}


@pytest.mark.parametrize(
    ("text", "param", "code"),
    [
        ("{", None, "invalid_request"),
        ('"text"', "type", "invalid_request"),
        ("{}", "type", "unknown_message_type"),
        ('{"type": 5}', "type", "unknown_message_type"),
        ('{"type": "response.cancel"}', "type", "unknown_message_type"),
        ('{"type": "response.create", "stream": false}', "stream", "invalid_request"),
        (
            '{"type": "response.create", "stream_options": null}',
            "stream_options",
            "invalid_request",
        ),
        ('{"type": "response.create", "background": true}', "background", "invalid_request"),
        ('{"type": "response.create", "n": NaN}', None, "invalid_request"),
    ],
)
def test_bad_messages_name_what_is_wrong(text, param, code):
    with pytest.raises(BadRequest) as caught:
        read_create(text)
    assert caught.value.param == param
    assert caught.value.code == code


def test_a_long_unknown_type_is_cut_short_in_the_message():
    with pytest.raises(BadRequest) as caught:
        read_create(json.dumps({"type": "x" * 10_000}))
    assert len(caught.value.message) < 300


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        ({}, None),
        ({"previous_response_id": "resp_1"}, "resp_1"),
        ({"previous_response_id": 5}, None),
    ],
)
def test_continued(body, expected):
    assert continued(body) == expected


def test_memory_keeps_the_latest_responses():
    session: SocketSession[str] = SocketSession(0.0, 60.0)
    for n in range(KEPT_RESPONSES + 2):
        session.remember(f"resp_{n}", f"chain {n}")
    assert "resp_0" not in session and "resp_1" not in session
    assert session.recall(f"resp_{KEPT_RESPONSES + 1}") == f"chain {KEPT_RESPONSES + 1}"


def test_recalling_keeps_a_response_longer():
    session: SocketSession[str] = SocketSession(0.0, 60.0, kept=2)
    session.remember("a", "A")
    session.remember("b", "B")
    assert session.recall("a") == "A"  # now the latest used
    session.remember("c", "C")
    assert "a" in session and "b" not in session


def test_forget():
    session: SocketSession[str] = SocketSession(0.0, 60.0)
    session.remember("a", "A")
    session.forget("a")
    session.forget("never there")
    assert session.recall("a") is None


def test_a_continuation_reads_memory_first():
    session: SocketSession[str] = SocketSession(0.0, 60.0)
    session.remember("resp_1", "chain")
    assert session.continuation({"previous_response_id": "resp_1", "store": False}) == "chain"
    assert session.continuation({"input": "new chain"}) is None


def test_an_unknown_id_reads_storage_unless_store_is_false():
    session: SocketSession[str] = SocketSession(0.0, 60.0)
    assert session.continuation({"previous_response_id": "resp_x"}) is None
    assert session.continuation({"previous_response_id": "resp_x", "store": True}) is None
    with pytest.raises(PreviousResponseNotFound) as caught:
        session.continuation({"previous_response_id": "resp_x", "store": False})
    assert caught.value.param == "previous_response_id"
    assert "resp_x" in caught.value.message


def test_the_age_limit_with_an_injected_clock():
    clock = FakeClock()
    session: SocketSession[str] = SocketSession(clock(), 3600.0)
    clock.advance(3599.5)
    assert not session.expired(clock())
    assert session.remaining(clock()) == pytest.approx(0.5)
    clock.advance(0.5)
    assert session.expired(clock())
