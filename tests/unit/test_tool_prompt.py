"""Tools described in the system message for templates that cannot render them
(proxy/tool_prompt)."""

from __future__ import annotations

import json

from proxy.model_output.text_calls import split
from proxy.tool_prompt import describe_tools

FUNCTION = {"name": "get_weather", "parameters": {"type": "object"}}
TOOLS = [{"type": "function", "function": FUNCTION}]


def test_a_system_message_is_added_when_there_is_none():
    """Without a system message, one is put first; the tool fields are removed."""
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": TOOLS, "tool_choice": "auto"}
    assert describe_tools(body)
    assert set(body) == {"messages"}
    system = body["messages"][0]
    assert system["role"] == "system" and json.dumps(FUNCTION) in system["content"]
    assert body["messages"][1] == {"role": "user", "content": "hi"}


def test_the_example_in_the_description_is_not_a_call():
    """The form shown to the model is not read back as a call (its arguments are a
    placeholder, not JSON)."""
    body = {"messages": [], "tools": TOOLS}
    describe_tools(body)
    calls, _ = split(body["messages"][0]["content"], {"get_weather"})
    assert calls == []


def test_nothing_to_describe():
    """No function tools, or tool_choice none: the body is left as it is."""
    for body in (
        {"messages": [], "tools": []},
        {"messages": [], "tools": TOOLS, "tool_choice": "none"},
        {"messages": []},
    ):
        before = json.dumps(body)
        assert not describe_tools(body)
        assert json.dumps(body) == before


def test_calls_and_results_of_earlier_rounds_become_text():
    """An assistant's calls (with its text) and a result in list parts become text."""
    call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    result = {"role": "tool", "tool_call_id": "c", "content": [{"type": "text", "text": "ok"}]}
    body = {
        "messages": [
            {"role": "developer", "content": [{"type": "text", "text": "Rules."}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [call]},
            result,
        ],
        "tools": TOOLS,
    }
    describe_tools(body)
    developer, assistant, tool = body["messages"]
    assert developer["role"] == "developer" and developer["content"].startswith("Rules.\n\n")
    assert assistant == {
        "role": "assistant",
        "content": 'Checking.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>',
    }
    assert tool == {"role": "user", "content": "<tool_response>\nok\n</tool_response>"}
