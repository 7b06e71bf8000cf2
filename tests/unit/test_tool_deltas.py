"""Streamed tool calls put back together, as both APIs' translators do it."""

from __future__ import annotations

import pytest

from proxy.tool_deltas import arguments_piece, delta_index, merge_name


@pytest.mark.parametrize(
    ("delta", "position", "ids", "taken", "index"),
    [
        ({"index": 3}, 0, {}, [], 3),
        ({"index": True, "id": "a"}, 0, {}, [], 0),  # a boolean is not an index
        ({"id": "b"}, 0, {0: "a", 1: "b"}, [0, 1], 1),  # a known id continues its call
        ({"id": "c"}, 0, {0: "a", 1: "b"}, [0, 1], 2),  # a new id starts the next call
        ({"id": "c"}, 0, {0: "a"}, [0, 1], 2),  # past a call left out over the limit
        ({"function": {"arguments": "1}"}}, 0, {0: "a", 1: "b"}, [0, 1], 1),  # the latest
        ({"function": {"name": "f"}}, 2, {}, [], 2),  # nothing yet: its position
        ({"id": ""}, 1, {}, [], 1),
    ],
)
def test_delta_index(delta, position, ids, taken, index):
    """Which call a delta belongs to, with or without ``index``."""
    assert delta_index(delta, position, ids, taken) == index


@pytest.mark.parametrize(
    ("current", "piece", "name"),
    [
        ("", "get_weather", "get_weather"),
        ("get_weather", "get_weather", "get_weather"),  # llama-cpp-python repeats it
        ("get_", "weather", "get_weather"),  # streamed in pieces
        ("get_weather", "", "get_weather"),
    ],
)
def test_merge_name(current, piece, name):
    """A repeated whole name changes nothing; anything else is the next piece."""
    assert merge_name(current, piece) == name


@pytest.mark.parametrize(
    ("value", "text"),
    [
        ('{"a": 1', '{"a": 1'),
        ({"city": "Zürich"}, '{"city": "Zürich"}'),
        ("", None),
        (None, None),
        (3, None),
    ],
)
def test_arguments_piece(value, text):
    """Arguments as JSON text; a parsed object is written back as JSON."""
    assert arguments_piece(value) == text
