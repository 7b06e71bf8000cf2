"""Tool calls written as text: the recogniser's rules as tables (the real model outputs
of tests/fixtures/model_outputs run in test_model_outputs.py)."""

from __future__ import annotations

import json

import pytest

from proxy.model_output.lenient_json import loads, repair
from proxy.model_output.text_calls import DEFAULT_MAX_HELD, TextCall, TextCallRecogniser, split

# --- no added latency on plain text ---------------------------------------------------


def test_plain_text_passes_at_once():
    """Plain text is released delta by delta as it comes, nothing held, from the first."""
    recogniser = TextCallRecogniser({"get_weather"})
    for delta in ["Hello", "!", " The", " weather", " in Paris", " is", " mild", ".\n\n", "Bye"]:
        assert recogniser.feed(delta) == [delta]
    assert recogniser.finish() == []


def test_only_a_possible_tag_is_held():
    """Text before a possible tag passes; the tag's beginning waits for the next delta."""
    recogniser = TextCallRecogniser({"get_weather"})
    assert recogniser.feed("Let me check. <tool") == ["Let me check. "]
    assert recogniser.feed("box> is an HTML tag") == ["<toolbox> is an HTML tag"]
    assert recogniser.feed(" and [link](x) [T") == [" and [link](x) "]
    assert recogniser.feed("ODO]") == ["[TODO]"]
    assert recogniser.feed(" ends <") == [" ends "]
    assert recogniser.finish() == ["<"]


@pytest.mark.parametrize(
    ("deltas", "released_first"),
    [
        (['{"city": "Paris", "temp": 21}'], ['{"city": "Paris", "temp": 21}']),
        (['{"name": "Alice", "age": 3}'], ['{"name": "Alice", "age": 3}']),
        (["<tool_call> is the tag Qwen uses"], ["<tool_call> is the tag Qwen uses"]),
        (["<function=rm_rf>{}"], ["<function=rm_rf>{}"]),
        (["[TOOL_CALLS]rm_rf[ARGS]{}"], ["[TOOL_CALLS]rm_rf[ARGS]{}"]),
    ],
)
def test_what_cannot_be_a_call_is_released_before_the_end(deltas, released_first):
    """JSON whose first key is no call's, or naming a tool not offered, and a tag with no
    call after it are released as soon as that is known, not at the end of the
    message."""
    recogniser = TextCallRecogniser({"get_weather"})
    assert recogniser.feed(deltas[0]) == released_first


def test_a_call_is_returned_as_soon_as_it_is_complete():
    """Calls come out in order with the text around them, each once its tag closes."""
    recogniser = TextCallRecogniser({"get_weather"})
    assert recogniser.feed("Checking.\n<tool_call>\n") == ["Checking.\n"]
    assert recogniser.feed('{"name": "get_weather", "arguments": {"city": "Paris"}}') == []
    out = recogniser.feed("\n</tool_call>\n")
    assert out == [TextCall("get_weather", '{"city": "Paris"}')]
    assert recogniser.feed("Done.") == ["Done."]


# --- the rules, as tables -------------------------------------------------------------

OFFERED = {"calc__add", "get_weather"}


@pytest.mark.parametrize(
    ("content", "calls", "rest"),
    [
        # repairs: trailing commas, single quotes, one missing closing brace
        (
            "<tool_call>{'name': 'get_weather', 'arguments': {'city': 'Paris',},}</tool_call>",
            [TextCall("get_weather", '{"city": "Paris"}')],
            "",
        ),
        (
            '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}</tool_call>',
            [TextCall("get_weather", '{"city": "Paris"}')],
            "",
        ),
        ('{"name": "calc__add", "arguments": {"a": 1}', [TextCall("calc__add", '{"a": 1}')], ""),
        # two missing braces are not repaired
        (
            '{"name": "calc__add", "arguments": {"a": 1',
            [],
            '{"name": "calc__add", "arguments": {"a": 1',
        ),
        # a closing tag is optional at the end of the message
        ('<tool_call>{"name": "calc__add", "arguments": {}}', [TextCall("calc__add", "{}")], ""),
        # arguments as JSON text, a list of calls in one block, OpenAI's shape
        (
            '<tool_call>{"name": "calc__add", "arguments": "{\\"a\\": 2}"}</tool_call>',
            [TextCall("calc__add", '{"a": 2}')],
            "",
        ),
        (
            '<tool_call>[{"name": "calc__add", "arguments": {}}, {"name": "get_weather", '
            '"arguments": {"city": "Oslo"}}]</tool_call>',
            [TextCall("calc__add", "{}"), TextCall("get_weather", '{"city": "Oslo"}')],
            "",
        ),
        (
            '{"type": "function", "function": {"name": "calc__add", "arguments": {"a": 3}}}',
            [TextCall("calc__add", '{"a": 3}')],
            "",
        ),
        # one bad call makes the whole block text
        (
            '<tool_call>[{"name": "calc__add", "arguments": {}}, {"name": "rm"}]</tool_call>',
            [],
            '<tool_call>[{"name": "calc__add", "arguments": {}}, {"name": "rm"}]</tool_call>',
        ),
        # arguments that are not an object, keys no call has
        (
            '{"name": "calc__add", "arguments": [1, 2]}',
            [],
            '{"name": "calc__add", "arguments": [1, 2]}',
        ),
        ('{"name": "calc__add", "extra": 1}', [], '{"name": "calc__add", "extra": 1}'),
        # inline code and fenced code are text
        (
            'Use `<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>` to call it.',
            [],
            'Use `<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>` to call it.',
        ),
        (
            '```json\n{"name": "calc__add", "arguments": {}}\n```',
            [TextCall("calc__add", "{}")],
            "",
        ),
        (
            '```python\n<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>\n```',
            [],
            '```python\n<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>\n```',
        ),
        # an inline span ends with its line: a call on the next line counts
        (
            'It\'s in `main.py\n<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>',
            [TextCall("calc__add", "{}")],
            "It's in `main.py\n",
        ),
        # Mistral's call id, and the name right before the arguments
        (
            '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Rome"}',
            [TextCall("get_weather", '{"city": "Rome"}')],
            "",
        ),
        ('[TOOL_CALLS]calc__add{"a": 1}', [TextCall("calc__add", '{"a": 1}')], ""),
        # DeepSeek's tokens with ASCII bars and underscores
        (
            "<|tool_calls_begin|><|tool_call_begin|>function<|tool_sep|>calc__add\n```json\n"
            '{"a": 1}\n```<|tool_call_end|><|tool_calls_end|>',
            [TextCall("calc__add", '{"a": 1}')],
            "",
        ),
        # whitespace and end-of-turn tokens after a call are dropped, text before is kept
        (
            'Sure.\n<tool_call>{"name": "calc__add", "arguments": {}}</tool_call>\n<|im_end|>',
            [TextCall("calc__add", "{}")],
            "Sure.\n",
        ),
        ("Plain answer.", [], "Plain answer."),
        ("", [], ""),
        ("   ", [], "   "),
    ],
)
def test_rules(content, calls, rest):
    """Only offered names and JSON objects (after light repairs) count; anything else
    stays text, unchanged."""
    assert split(content, OFFERED) == (calls, rest)


def test_a_candidate_longer_than_the_bound_is_text():
    """What began like a call but is not decided within max_held characters is
    released as text, and scanning goes on after its opening tag."""
    call = (
        '<tool_call>{"name": "calc__add", "arguments": {"text": "' + "x" * 100 + '"}}</tool_call>'
    )
    assert split(call, OFFERED, max_held=50) == ([], call)
    assert split(call, OFFERED)[0] == [TextCall("calc__add", json.dumps({"text": "x" * 100}))]
    recogniser = TextCallRecogniser(OFFERED, max_held=50)
    released = recogniser.feed(call[:60])
    assert "".join(p for p in released if isinstance(p, str)).startswith("<tool_call>")
    assert DEFAULT_MAX_HELD >= 65536


def test_leading_whitespace_is_held_within_the_bound():
    """Whitespace at the start waits for what follows (a call drops it), but no more
    than max_held characters of it."""
    recogniser = TextCallRecogniser(OFFERED, max_held=8)
    assert recogniser.feed("  \n") == []
    assert recogniser.feed("      ") == ["  \n      "]
    assert recogniser.feed('{"name": "calc__add", "arguments": {}}') == [
        '{"name": "calc__add", "arguments": {}}'
    ]
    assert recogniser.finish() == []
    assert split('\n\n{"name": "calc__add", "arguments": {}}', OFFERED)[1] == ""


# --- lenient JSON ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1,}', {"a": 1}),
        ("{'a': 'it's'}", {"a": "it's"}),  # an apostrophe not followed by , : } ] or the end
        ("{'a': \"it's\"}", {"a": "it's"}),
        ("{'path': 'C:\\\\tmp', 'n': 2}", {"path": "C:\\tmp", "n": 2}),
        ('{"a": [1, 2,], "b": {"c": 3,},}', {"a": [1, 2], "b": {"c": 3}}),
        ('{"a": {"b": 1}', {"a": {"b": 1}}),
        ('{"a": "line\nbreak"}', {"a": "line\nbreak"}),
        ('{"a": NaN}', None),
        ('{"a": 1e999}', None),
        ("not json", None),
    ],
)
def test_lenient_json(text, value):
    """The light repairs, and what stays unreadable."""
    assert loads(text) == value


def test_repair_leaves_strings_alone():
    """Commas, quotes and braces inside double-quoted strings are not touched."""
    text = '{"a": "x, }", "b": "it\'s"}'
    assert repair(text) == text
