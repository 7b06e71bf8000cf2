"""JSON in and out, the one serialisation lmbridge reads and writes (bodies, events,
rows).

orjson does the work: on /v1/responses, JSON was the largest share of lmbridge's own
CPU (a Response serialises in 0.6 µs instead of 6, a request body parses three times
faster). The standard library stays for the two things orjson does differently:

- integers beyond 64 bits: orjson reads them as floats, which would change a client's
  value; a text with a run of 19 digits is parsed by the stdlib instead (exact), and
  a value holding such an integer is written by it;
- keys that are not strings, which orjson refuses to write.

Both parsers accept strict JSON only (RFC 8259): ``NaN``, ``Infinity`` and numbers too
large for a double are errors, not values that a later serialisation would have to
invent a spelling for.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import orjson

JSONDecodeError = json.JSONDecodeError  # orjson's is a subclass

_LONG_DIGITS = re.compile(rb"\d{19}")
_LONG_DIGITS_TEXT = re.compile(r"\d{19}")
_STDLIB_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)


def loads(data: bytes | str) -> Any:
    """Parse JSON text; raises ``JSONDecodeError`` (``msg``, ``lineno``, ``colno``)."""
    if isinstance(data, str):
        exact = _LONG_DIGITS_TEXT.search(data) is None
    else:
        exact = _LONG_DIGITS.search(data) is None
    if exact:
        return orjson.loads(data)
    try:
        return json.loads(data, parse_constant=_not_json, parse_float=_finite_float)
    except _NotJson as exc:
        text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
        raise JSONDecodeError(str(exc), text, max(text.find(exc.literal), 0)) from None


def loads_stored(text: str | bytes) -> Any:
    """Parse JSON that lmbridge stored itself. Versions before orjson wrote Python's
    ``NaN`` and ``Infinity`` for non-finite floats (a tool schema could carry one);
    what was acknowledged then must stay readable."""
    try:
        return loads(text)
    except JSONDecodeError:
        return json.loads(text)


def dumps_bytes(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson's JSONEncodeError: an integer beyond 64 bits, a non-str key
        return _STDLIB_ENCODER.encode(value).encode()


def dumps(value: Any) -> str:
    """Compact JSON as text."""
    return dumps_bytes(value).decode()


class _NotJson(ValueError):
    def __init__(self, message: str, literal: str) -> None:
        super().__init__(message)
        self.literal = literal


def _not_json(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON value", name)


def _finite_float(text: str) -> float:
    number = float(text)
    if math.isinf(number):
        raise _NotJson("number is too large for a double", text)
    return number
