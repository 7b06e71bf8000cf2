"""jsontext: orjson's speed with the standard library's values.

It writes what json.dumps(ensure_ascii=False, compact) writes and reads every integer
exactly; ``loads`` reads what Python's json reads, ``loads_request`` (client bodies)
refuses what is not JSON (NaN, Infinity, numbers beyond a double).
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.jsontext import (
    JSONDecodeError,
    TooManyItems,
    dumps,
    dumps_bytes,
    dumps_bytes_in_pieces,
    loads,
    loads_request,
    loads_request_in_pieces,
)

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
    assert loads_request(text.encode()) == expected


def test_integers_beyond_64_bits_stay_integers() -> None:
    """orjson alone would read them as floats and change the client's value."""
    text = b'{"seed": 123456789012345678901234567890, "x": [-99999999999999999999]}'
    for parsed in (loads(text), loads_request(text)):
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
    ],
)
def test_a_request_body_that_is_not_json_is_refused_with_a_position(text: bytes) -> None:
    with pytest.raises(JSONDecodeError) as caught:
        loads_request(text)
    assert caught.value.lineno >= 1 and caught.value.colno >= 1
    assert caught.value.msg


def test_a_request_body_must_be_utf8() -> None:
    with pytest.raises(UnicodeDecodeError):
        loads_request(b'{"a": "\xff"}')
    with pytest.raises(UnicodeDecodeError):
        loads_request('{"model": "x"}'.encode("utf-16"))


def test_a_lone_surrogate_escape_is_read_as_before() -> None:
    """orjson refuses it; clients that cut a string inside an emoji send it."""
    assert loads_request(b'{"text": "\\ud83d"}') == {"text": "\ud83d"}


def test_upstream_and_stored_json_is_read_as_python_reads_it() -> None:
    """An upstream written in Python may send NaN or -Infinity (a logprob), and versions
    before orjson stored non-finite floats that way: both stay readable."""
    parsed = loads('{"logprob":-Infinity,"schema":{"minimum":NaN},"n":1}')
    assert parsed["logprob"] == float("-inf") and parsed["n"] == 1
    assert loads(b'{"a": 1}') == {"a": 1}
    with pytest.raises(JSONDecodeError):
        loads(b'{"a": 1')


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


def test_nesting_too_deep_is_a_decode_error_not_a_crash() -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    for parse in (loads, loads_request):
        with pytest.raises(JSONDecodeError, match="nested too deeply"):
            parse(deep)


LONG = "9" * 4301


@pytest.mark.parametrize("parse", [loads, loads_request, loads_request_in_pieces])
@pytest.mark.parametrize(
    "text",
    [
        f'{{"n": {LONG}}}',
        f'{{"n": -{LONG}}}',
        f'{{"deep": [[{{"n": {LONG}}}]], "seed": 123456789012345678901234567890}}',
        f'{{"s": "1234567890123456789", "n": {LONG}}}',
    ],
)
def test_an_integer_longer_than_python_converts_is_a_decode_error(parse, text) -> None:
    """More than 4,300 digits is JSONDecodeError at the integer, not the stdlib's ValueError."""
    with pytest.raises(JSONDecodeError, match="more than 4300 digits") as caught:
        parse(text.encode())
    assert caught.value.pos == text.index(LONG)


def test_an_integer_at_the_digit_limit_is_read_exactly() -> None:
    """4,300 digits is still a number, read without change."""
    text = '{"n": ' + "9" * 4300 + "}"
    assert loads(text) == loads_request(text.encode()) == {"n": int("9" * 4300)}


def test_bytes_that_are_not_text_stay_a_unicode_error_for_loads() -> None:
    """Only the digit limit is turned into a decode error; undecodable bytes are not."""
    with pytest.raises(UnicodeDecodeError):
        loads(b'{"a": "\xff", "n": 1234567890123456789012}')


# --- large request bodies, read and written in pieces ------------------------------

BODIES: list[bytes] = [
    *(
        dumps_bytes(value)
        for value in VALUES
        if not isinstance(value, dict) or all(isinstance(key, str) for key in value)
    ),
    b' \n{ "model" : "m" , "input" : [ {"role": "user"} , 1 , [ ] , "x" ] , "n": {} } \n',
    b'{"a": [], "b": {}, "a": [1]}',  # a repeated key: the last one counts
    b'{"seed": [123456789012345678901234567890], "s": "\\ud83d \\u00e9"}',
    '{"é": ["✓", {"😀": null}]}'.encode(),
    b"[1, [2, [3]], {}]",
    b'"just a string"',
]


@pytest.mark.parametrize("text", BODIES)
def test_a_body_read_in_pieces_is_the_same_value(text: bytes) -> None:
    """What loads_request_in_pieces reads is what loads_request reads."""
    assert loads_request_in_pieces(text) == loads_request(text)


@pytest.mark.parametrize(
    "text",
    [
        b'{"a": NaN}',
        b'{"input": [1, -Infinity]}',
        b'{"a": 1e400}',
        b'{"a": 1',
        b'{"a": [1, 2}',
        b'{"a": [1,]}',
        b'{"a": 1,}',
        b'{"a" 1}',
        b"{'a': 1}",
        b'{"a": 1} trailing',
        b'{"a": "tab\tinside"}',
        b"",
        "\ufeff{}".encode(),
    ],
)
def test_a_body_read_in_pieces_refuses_what_loads_request_refuses(text: bytes) -> None:
    """The same texts are refused, each with a message and a position."""
    with pytest.raises(JSONDecodeError):
        loads_request(text)
    with pytest.raises(JSONDecodeError) as caught:
        loads_request_in_pieces(text)
    assert caught.value.msg and caught.value.lineno >= 1


def test_a_body_read_in_pieces_must_be_utf8_and_not_too_deep() -> None:
    with pytest.raises(UnicodeDecodeError):
        loads_request_in_pieces(b'{"a": "\xff"}')
    with pytest.raises(JSONDecodeError, match="nested too deeply"):
        loads_request_in_pieces(b'{"a": [' + b"[" * 100_000 + b"]" * 100_000 + b"]}")


def test_an_array_over_its_limit_stops_the_reading() -> None:
    """A top-level array longer than its limit raises TooManyItems naming it, before
    the rest of the body is read (a syntax error further on is never reached)."""
    text = b'{"input": [1, 2, 3, 4], "rest": [' + b"oops"
    with pytest.raises(TooManyItems) as caught:
        loads_request_in_pieces(text, {"input": 3})
    assert (caught.value.key, caught.value.limit) == ("input", 3)
    assert loads_request_in_pieces(b'{"input": [1, 2, 3]}', {"input": 3}) == {"input": [1, 2, 3]}


@pytest.mark.parametrize("value", [json.loads(text) for text in BODIES])
def test_a_body_written_in_pieces_is_the_same_bytes(value: Any) -> None:
    """dumps_bytes_in_pieces writes what dumps_bytes writes."""
    assert dumps_bytes_in_pieces(value) == dumps_bytes(value)
