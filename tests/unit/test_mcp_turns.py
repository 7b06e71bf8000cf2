"""TurnMemory: the MCP steps a chat-completions client never saw, put back."""

from __future__ import annotations

import json

from proxy.mcp.turns import TurnMemory
from tests.clock import FakeClock


def call(call_id: str, name: str, arguments: str = "{}") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


USER = {"role": "user", "content": "go"}
MCP_STEP = [
    {"role": "assistant", "content": None, "tool_calls": [call("m1", "calc__add")]},
    {"role": "tool", "tool_call_id": "m1", "content": "2"},
]
HANDED = {"role": "assistant", "content": "Asking.", "tool_calls": [call("u1", "ask", '{"q":1}')]}
RESULT = {"role": "tool", "tool_call_id": "u1", "content": "yes"}


def test_a_turn_ended_mid_round_gets_its_calls_and_results_back() -> None:
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], MCP_STEP, ended_mid_round=True, follows=USER)
    restored = memory.restore("", [USER, HANDED, RESULT])
    assert restored == [
        USER,
        {**HANDED, "tool_calls": [call("m1", "calc__add"), *HANDED["tool_calls"]]},
        MCP_STEP[1],
        RESULT,
    ]


def test_earlier_rounds_go_before_the_handed_message() -> None:
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], MCP_STEP, ended_mid_round=False, follows=USER)
    assert memory.restore("", [USER, HANDED, RESULT]) == [USER, *MCP_STEP, HANDED, RESULT]


def test_nothing_remembered_leaves_the_messages_alone() -> None:
    memory = TurnMemory()
    messages = [USER, HANDED, RESULT]
    assert memory.restore("", messages) is messages
    memory.remember("", [call("other", "ask")], MCP_STEP, ended_mid_round=True, follows=USER)
    assert memory.restore("", messages) is messages


def test_entries_belong_to_an_owner() -> None:
    memory = TurnMemory()
    memory.remember("alice", HANDED["tool_calls"], MCP_STEP, ended_mid_round=True, follows=USER)
    assert memory.restore("bob", [USER, HANDED]) == [USER, HANDED]
    assert len(memory.restore("alice", [USER, HANDED])) == 3


def test_arguments_match_however_the_client_serialised_them() -> None:
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], MCP_STEP, ended_mid_round=False, follows=USER)
    resent = {**HANDED, "tool_calls": [call("u1", "ask", '{ "q": 1 }')]}
    assert memory.restore("", [USER, resent]) == [USER, *MCP_STEP, resent]
    changed = {**HANDED, "tool_calls": [call("u1", "ask", '{"q": 2}')]}
    assert memory.restore("", [USER, changed]) == [USER, changed]


def test_entries_expire_and_the_oldest_go_first() -> None:
    clock = FakeClock(0.0)
    memory = TurnMemory(max_entries=2, ttl=10, clock=clock)
    for n in range(3):
        memory.remember("", [call(f"u{n}", "ask")], MCP_STEP, ended_mid_round=False, follows=USER)
    assert len(memory) == 2
    first = {"role": "assistant", "tool_calls": [call("u0", "ask")]}
    assert memory.restore("", [USER, first]) == [USER, first]
    last = {"role": "assistant", "tool_calls": [call("u2", "ask")]}
    assert len(memory.restore("", [USER, last])) == 4
    clock.now = 10
    assert memory.restore("", [USER, last]) == [USER, last]
    assert len(memory) == 1


def test_malformed_messages_are_passed_as_they_are() -> None:
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], MCP_STEP, ended_mid_round=True, follows=USER)
    odd = [
        "text",
        None,
        {"role": "assistant", "tool_calls": "x"},
        {"role": "assistant", "tool_calls": [None]},
        {"role": "assistant", "tool_calls": [{"id": 1, "function": {"name": "ask"}}]},
        {"role": "assistant", "tool_calls": [{"id": "u1", "function": "ask"}]},
    ]
    assert memory.restore("", odd) is odd


def test_a_turn_without_hidden_steps_is_not_kept() -> None:
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], [], ended_mid_round=False, follows=USER)
    memory.remember("", [], MCP_STEP, ended_mid_round=False, follows=USER)
    assert len(memory) == 0


def test_the_total_size_is_bounded() -> None:
    size = len(json.dumps(MCP_STEP, separators=(",", ":")))
    memory = TurnMemory(max_chars=2 * size + 1)
    for n in range(3):
        memory.remember("", [call(f"u{n}", "ask")], MCP_STEP, ended_mid_round=False, follows=USER)
    assert len(memory) == 2
    memory.remember("", [call("u1", "ask")], MCP_STEP, ended_mid_round=False, follows=USER)  # again
    assert len(memory) == 2
    huge = [{"role": "tool", "tool_call_id": "m1", "content": "x" * (3 * size)}]
    memory.remember("", [call("big", "ask")], huge, ended_mid_round=False, follows=USER)
    assert len(memory) == 2


def test_the_handed_message_must_follow_the_same_message() -> None:
    """Two conversations whose upstream numbers its calls alike do not swap results."""
    memory = TurnMemory()
    memory.remember("", HANDED["tool_calls"], MCP_STEP, ended_mid_round=False, follows=USER)
    other = {"role": "user", "content": "something else"}
    assert memory.restore("", [other, HANDED]) == [other, HANDED]
    reordered = {"content": "go", "role": "user"}
    assert memory.restore("", [reordered, HANDED]) == [reordered, *MCP_STEP, HANDED]
