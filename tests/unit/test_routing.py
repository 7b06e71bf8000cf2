"""Choosing among several upstreams (proxy/routing.py): the merged catalogue, the order in
which upstreams are tried, the fallback models and which failures may go elsewhere."""

from __future__ import annotations

import pytest

from proxy.errors import (
    BadRequest,
    CircuitOpen,
    ModelNotFound,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.model_records import ModelInfo
from proxy.routing import Placement, may_fall_back, merge, model_chain, rank


def test_merge_lists_each_model_once_with_its_upstreams_in_order():
    studio = [ModelInfo("qwen3-8b", "llm", "not-loaded", 32768), ModelInfo("embed", "embeddings")]
    box = [ModelInfo("qwen3-8b", "llm", "loaded", 8192), ModelInfo("qwen3-32b", "llm", "loaded")]
    merged = merge([("studio", studio), ("box", box)])
    assert [(m.id, m.upstreams) for m in merged] == [
        ("qwen3-8b", ("studio", "box")),
        ("embed", ("studio",)),
        ("qwen3-32b", ("box",)),
    ]
    first = merged[0]
    # The first upstream's record, loaded because one upstream has it loaded.
    assert (first.context_length, first.state) == (32768, "loaded")


def test_merge_of_nothing_and_of_a_repeated_upstream():
    assert merge([]) == []
    assert merge([("a", [])]) == []
    twice = merge([("a", [ModelInfo("m")]), ("a", [ModelInfo("m")])])
    assert [m.upstreams for m in twice] == [("a",)]


def test_rank_prefers_a_closed_circuit_then_loaded_then_least_busy_then_order():
    a = Placement("a", 0, loaded=False)
    b = Placement("b", 1, loaded=True, running=3, limit=4)
    c = Placement("c", 2, loaded=True, running=1, limit=4)
    d = Placement("d", 3, loaded=True, circuit_open=True)
    assert [p.upstream for p in rank([a, b, c, d])] == ["c", "b", "a", "d"]


def test_rank_judges_busy_per_slot_and_keeps_the_configured_order_on_ties():
    small = Placement("small", 0, loaded=True, running=2, limit=2)  # full
    big = Placement("big", 1, loaded=True, running=4, queued=0, limit=8)  # half
    assert [p.upstream for p in rank([small, big])] == ["big", "small"]
    same = [Placement(name, n, loaded=True) for n, name in enumerate("xyz")]
    assert [p.upstream for p in rank(reversed(same))] == ["x", "y", "z"]
    # Without a limit, requests are counted as they are.
    assert Placement("u", 0, loaded=True, running=3, queued=2).busy == 5


def test_model_chain_is_breadth_first_and_ends_cycles():
    fallbacks = {"32b": ["14b", "8b"], "14b": ["4b", "8b"], "4b": ["32b"]}
    assert model_chain("32b", fallbacks) == ["32b", "14b", "8b", "4b"]
    assert model_chain("8b", fallbacks) == ["8b"]
    assert model_chain("x", {}) == ["x"]


@pytest.mark.parametrize(
    "error,expected",
    [
        (UpstreamUnavailable("refused"), True),
        (UpstreamTimeout("no first byte"), True),
        (CircuitOpen("open"), True),
        (UpstreamStatus(503, b"busy", "text/plain"), True),
        (UpstreamStatus(500, b"", None), True),
        (UpstreamStatus(429, b"", None), True),
        (UpstreamStatus(400, b'{"error": {"message": "bad"}}', "application/json"), False),
        (UpstreamStatus(404, b"", None), False),
        (BadRequest("bad"), False),
        (ModelNotFound("none"), False),
    ],
)
def test_which_failures_may_go_elsewhere(error, expected):
    assert may_fall_back(error) is expected
