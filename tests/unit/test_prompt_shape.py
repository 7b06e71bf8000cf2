"""What goes upstream on the Responses API, shaped for the model's template: reasoning
sent back only when the profile keeps it, leading system messages merged, tools
described for templates that cannot render them; the same history, the same text."""

from __future__ import annotations

import json

import pytest

from proxy.jsontext import dumps
from proxy.responses.prompt_shape import described, merge_leading_system
from proxy.responses.render import ToolNames, reasoning_text, render_items

REASONING = {
    "type": "reasoning",
    "id": "rs_1",
    "summary": [],
    "content": [{"type": "reasoning_text", "text": "The user greets."}],
}
ANSWER = {
    "type": "message",
    "role": "assistant",
    "content": [{"type": "output_text", "text": "Hello!"}],
}
USER = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}
CALL = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}


def test_reasoning_dropped_by_default():
    """Without keep, reasoning items stay in state: the assistant message is its text."""
    messages = render_items([USER, REASONING, ANSWER], ToolNames())
    assert messages[1] == {"role": "assistant", "content": "Hello!"}


def test_reasoning_kept_on_the_message_it_precedes():
    """With keep, the reasoning becomes reasoning_content of the next assistant message,
    a tool call's included; none goes before a user message."""
    names = ToolNames()
    messages = render_items([USER, REASONING, ANSWER], names, reasoning=True)
    assert messages[1] == {
        "role": "assistant",
        "content": "Hello!",
        "reasoning_content": "The user greets.",
    }
    call_turn = render_items([REASONING, CALL], names, reasoning=True)
    assert call_turn[0]["reasoning_content"] == "The user greets."
    assert call_turn[0]["tool_calls"][0]["id"] == "c1"
    assert render_items([REASONING, USER], names, reasoning=True) == [
        {"role": "user", "content": "Hi"}
    ]


def test_reasoning_text_from_content_or_summary():
    """A client's reasoning item may carry only a summary."""
    summary = {"type": "reasoning", "summary": [{"type": "summary_text", "text": "S"}]}
    assert reasoning_text(summary) == "S"
    assert reasoning_text({"type": "reasoning", "encrypted_content": "x"}) == ""


def test_rendering_is_the_same_every_time():
    """The same items render to the same text, turn after turn."""
    items = [USER, REASONING, CALL, ANSWER]
    first = dumps(render_items(items, ToolNames(), reasoning=True))
    assert all(dumps(render_items(items, ToolNames(), reasoning=True)) == first for _ in range(3))


def sys(text: str) -> dict[str, str]:
    return {"role": "system", "content": text}


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        (
            [sys("instructions"), sys("developer 1"), sys("developer 2"), {"role": "user"}],
            [sys("instructions\n\ndeveloper 1\n\ndeveloper 2"), {"role": "user"}],
        ),
        (
            [sys("a"), {"role": "system", "content": [{"type": "text", "text": "b"}]}],
            [sys("a\n\nb")],
        ),
        ([sys("only one"), {"role": "user"}], [sys("only one"), {"role": "user"}]),
        (
            [{"role": "user"}, sys("late"), sys("later")],
            [{"role": "user"}, sys("late"), sys("later")],
        ),
        ([], []),
        # a system message with an image or a name is left where it is
        (
            [sys("a"), {"role": "system", "content": "b", "name": "x"}],
            [sys("a"), {"role": "system", "content": "b", "name": "x"}],
        ),
    ],
)
def test_leading_system_messages_merged(messages, expected):
    """Codex's instructions and developer messages become one system message, first;
    nothing else changes."""
    assert json.loads(merge_leading_system(dumps(messages))) == expected


def test_merge_keeps_the_rest_byte_for_byte():
    """Only the leading run is rewritten: the rest of the text is kept as it was."""
    rest = '{"role":"user","content":"x"}, {"role":"assistant","content":"y"}'
    text = '[{"role":"system","content":"a"} , {"role":"system","content":"b"},' + rest + "]"
    assert merge_leading_system(text) == '[{"role":"system","content":"a\\n\\nb"},' + rest + "]"
    assert merge_leading_system("[]") == "[]"


def test_tools_described_for_a_template_without_tools():
    """The settings lose the tools; the system message describes them; earlier calls
    and results become text."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {}}}
    settings = {"model": "m", "tools": [tool], "tool_choice": "auto"}
    history = [
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": None, "tool_calls": [_chat_call()]},
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    new_settings, text = described(settings, dumps(history))
    assert new_settings == {"model": "m"}
    messages = json.loads(text)
    assert messages[0]["content"].startswith("Be brief.\n\n# Tools")
    assert '"name": "f"' in messages[0]["content"]
    assert "<tool_call>" in messages[1]["content"]
    assert messages[2] == {"role": "user", "content": "<tool_response>\n42\n</tool_response>"}
    assert described({"model": "m", "tools": [tool], "tool_choice": "none"}, "[]")[1] == "[]"


def _chat_call() -> dict[str, object]:
    return {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
