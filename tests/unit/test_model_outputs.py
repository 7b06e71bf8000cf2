"""Real outputs of real models (tests/fixtures/model_outputs), read whole and cut into
deltas every way: thinking off the front, then calls out of the answer."""

from __future__ import annotations

import itertools
import random

import pytest

from tests.model_outputs import expected, load, run

FIXTURES = load()
IDS = [f["id"] for f in FIXTURES]


def test_the_fixtures_cover_every_format():
    """At least 30 real outputs, each with its source, across the formats and false
    positives."""
    assert len(FIXTURES) >= 30
    assert len(set(IDS)) == len(IDS)
    formats = {f["format"] for f in FIXTURES}
    needed = {"hermes", "lmstudio", "llama-json", "llama-function-tag", "mistral-args"}
    needed |= {"mistral-list", "deepseek", "deepseek-v3.1", "bare-json", "false-positive"}
    needed |= {"think", "think-unclosed", "think-opened"}
    assert needed <= formats
    assert all(f["source"] and f["model"] and isinstance(f["offered"], list) for f in FIXTURES)


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_whole_outputs(fixture):
    """Read whole, each output gives its expected calls, reasoning and text."""
    assert run(fixture, [fixture["content"]]) == expected(fixture)


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_cut_at_every_boundary(fixture):
    """Cut in two at every character boundary, and into single characters, a stream
    gives exactly what the whole message gives."""
    content, wanted = fixture["content"], expected(fixture)
    for at in range(1, len(content)):
        assert run(fixture, [content[:at], content[at:]]) == wanted, at
    assert run(fixture, list(content)) == wanted


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_random_chunkings(fixture):
    """Random chunkings (seeded) give what the whole message gives."""
    content, wanted = fixture["content"], expected(fixture)
    rng = random.Random(fixture["id"])
    for _ in range(40):
        count = rng.randint(1, min(12, max(1, len(content) - 1)))
        cuts = sorted(rng.sample(range(1, len(content)), count)) if len(content) > 1 else []
        edges = [0, *cuts, len(content)]
        assert run(fixture, [content[a:b] for a, b in itertools.pairwise(edges)]) == wanted


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_a_small_bound_is_the_same_for_every_cut(fixture):
    """With a hold-back bound of 40 characters, where the deltas were cut does not
    change what is given up as text."""
    content = fixture["content"]
    whole = run(fixture, [content], max_held=40)
    for at in range(1, len(content), 3):
        assert run(fixture, [content[:at], content[at:]], max_held=40) == whole, at
