"""The tool loop's rules, as both APIs' loops apply them: budget, repeats, bad
arguments, the forced final round."""

from __future__ import annotations

import pytest

from proxy.mcp.policy import OVER_BUDGET, Answered, LoopPolicy, Run
from proxy.mcp.results import ToolOutput


@pytest.mark.parametrize(
    ("arguments", "fragment"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('"text"', "must be a JSON object"),
        ('{"a": ' + "1" * 5000 + "}", "more than 4300 digits"),
    ],
)
def test_bad_arguments_are_answered_without_running(arguments, fragment):
    """Arguments that are not a JSON object are the model's to fix: answered, not run."""
    decision = LoopPolicy(max_rounds=3, max_tool_calls=3).decide("calc__add", arguments)
    assert isinstance(decision, Answered)
    assert decision.output.is_error and fragment in decision.output.text


@pytest.mark.parametrize("empty", ["", "{}", " { } "])
def test_no_arguments_are_an_empty_object(empty):
    """A call without arguments runs with {}."""
    decision = LoopPolicy(max_rounds=3, max_tool_calls=3).decide("calc__pid", empty)
    assert isinstance(decision, Run) and decision.arguments == {}


def test_a_repeat_is_answered_from_the_first_result():
    """The same tool with the same arguments (whatever their key order or spacing) gets
    the earlier result and a note; other arguments or another tool run."""
    policy = LoopPolicy(max_rounds=5, max_tool_calls=5)
    first = policy.decide("calc__add", '{"a": 1, "b": 2}')
    assert isinstance(first, Run)
    policy.remember(first, ToolOutput("3", images=[{"type": "image_url"}]))
    again = policy.decide("calc__add", '{ "b": 2,  "a": 1 }')
    assert isinstance(again, Answered) and again.repeated
    assert again.output.text.startswith("3\n") and "not run again" in again.output.text
    assert again.output.images == [{"type": "image_url"}]
    assert isinstance(policy.decide("calc__add", '{"a": 1, "b": 3}'), Run)
    assert isinstance(policy.decide("other__add", '{"a": 1, "b": 2}'), Run)


def test_the_budget_stops_inside_a_round():
    """With two calls left, a round of three admits the first two only; then the next
    reply must be the answer."""
    policy = LoopPolicy(max_rounds=10, max_tool_calls=3)
    policy.next_round()
    assert policy.admit()
    assert not policy.must_finish()
    policy.next_round()
    assert [policy.admit() for _ in range(3)] == [True, True, False]
    assert policy.calls == 3
    assert policy.must_finish()
    assert OVER_BUDGET in policy.over_budget().text and policy.over_budget().is_error


@pytest.mark.parametrize(("max_rounds", "rounds", "finish"), [(2, 1, False), (2, 2, True)])
def test_the_round_limit(max_rounds, rounds, finish):
    """After max_rounds rounds that ran tools, the next reply must be the answer."""
    policy = LoopPolicy(max_rounds=max_rounds, max_tool_calls=100)
    for _ in range(rounds):
        policy.next_round()
        policy.admit()
    assert policy.must_finish() is finish
