"""jsontext: orjson's speed with the standard library's values.

It writes what json.dumps(ensure_ascii=False, compact) writes, reads every integer
exactly, and refuses what is not JSON (NaN, Infinity, numbers beyond a double).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.jsontext import JSONDecodeError, dumps, dumps_bytes, loads, loads_stored

BIG = 123456789012345678901234567890

VALUES: list[Any] = [
    {"text": 'é ✓ "quoted" \\ \n\t\u2028 😀', "n": [1, -2, 2.5, 1e300, None, True, False]},
    {"nested": {"list": [{}, [], [[{"a": ""}]]]}, "empty": ""},
    [],
    "a string\n",
    0,
    None,
    {1: "int keys become strings", 2.5: "so do floats"},
    {"seed": BIG, "negative": -BIG, "edges": [2**63 - 1, -(2**63), 2**64 - 1]},
]


@pytest.mark.parametrize("value", VALUES)
def test_same_text_as_the_standard_library(value: Any) -> None:
    expected = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert dumps(value) == expected
    assert dumps_bytes(value) == expected.encode()


@pytest.mark.parametrize("value", VALUES)
def test_reads_back_what_it_wrote(value: Any) -> None:
    text = dumps(value)
    expected = json.loads(text)
    assert loads(text) == expected
    assert loads(text.encode()) == expected


def test_integers_beyond_64_bits_stay_integers() -> None:
    """orjson alone would read them as floats and change the client's value."""
    parsed = loads(b'{"seed": 123456789012345678901234567890, "x": [-99999999999999999999]}')
    assert parsed == {"seed": BIG, "x": [-99999999999999999999]}
    assert isinstance(parsed["seed"], int)
    # Nineteen digits inside a string take the same exact path and read the same.
    assert loads('{"text": "call 1234567890123456789", "n": 1.5}') == {
        "text": "call 1234567890123456789",
        "n": 1.5,
    }


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": NaN}',
        b'{"a": -Infinity}',
        b'{"a": 1e400}',
        b'{"seed": 123456789012345678901234567890, "a": NaN}',
        b'{"seed": 123456789012345678901234567890, "a": 1e400}',
        b'{"a": 1',
        b'{"a": 1} trailing',
        b"\xff\xfe",
    ],
)
def test_what_is_not_json_is_refused_with_a_position(text: bytes) -> None:
    with pytest.raises(JSONDecodeError) as caught:
        loads(text)
    assert caught.value.lineno >= 1 and caught.value.colno >= 1
    assert caught.value.msg


def test_floats_read_back_the_same() -> None:
    """The spelling may differ from the stdlib's (1e-7 for 1e-07); the value does not."""
    values = [1e-7, 0.1, 1 / 3, 2.5e-310, 1.7976931348623157e308, -0.0, 123456.789]
    assert json.loads(dumps(values)) == values
    assert loads(dumps(values)) == values


def test_non_finite_floats_are_written_as_null() -> None:
    """They cannot be read in (above); one computed in the daemon is written as JSON's
    null rather than Python's NaN, which no JSON parser accepts."""
    assert dumps({"nan": float("nan"), "inf": float("inf")}) == '{"nan":null,"inf":null}'


def test_what_is_not_json_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not JSON serializable"):
        dumps({"x": object()})


def test_stored_json_of_older_versions_stays_readable() -> None:
    """Before orjson, a non-finite float was stored as Python wrote it."""
    stored = '{"tools":[{"parameters":{"maximum":Infinity,"minimum":NaN}}]}'
    parsed = loads_stored(stored)
    assert parsed["tools"][0]["parameters"]["maximum"] == float("inf")
    assert loads_stored('{"a": 1}') == {"a": 1}
