"""JSON in and out, the one serialisation lmbridge reads and writes (bodies, events,
rows).

orjson does the work: on /v1/responses, JSON was the largest share of lmbridge's own
CPU (a Response serialises in 0.6 µs instead of 6, a request body parses three times
faster). The standard library takes over where orjson would read or write something
else than it does:

- integers beyond 64 bits: orjson reads them as floats, which would change a value;
  a text with a run of 19 digits is parsed by the stdlib (exactly), and a value
  holding such an integer is written by it, as are keys that are not strings;
- what orjson refuses to read but Python's json reads (``NaN``, ``Infinity``, a lone
  surrogate escape): an upstream may send it, and older versions of lmbridge stored
  it, so ``loads`` reads it as before.

A client's request body is stricter (``loads_request``): ``NaN``, ``Infinity`` and
numbers beyond a double are not JSON (RFC 8259) and get a 400, rather than a value
that a later serialisation would have to invent a spelling for.

Both refuse an integer longer than Python converts (``sys.get_int_max_str_digits()``,
4300 digits by default, a guard against quadratic conversion) with ``JSONDecodeError``,
not the stdlib's bare ``ValueError``: for a client that is a 400, for an upstream or a
model's tool arguments the same "not JSON" as any other unreadable text.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Mapping
from json.decoder import scanstring  # type: ignore[attr-defined]
from typing import Any

import orjson

JSONDecodeError = json.JSONDecodeError  # orjson's is a subclass

# Digits to "9", every other byte to ".": a run of 19 digits becomes a run of 19 "9"s,
# found by a plain substring search (0.5 ns a byte; a regex took 8).
_DIGITS_ONLY = bytes(0x39 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_NINETEEN_DIGITS = b"9" * 19
_STDLIB_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_STDLIB_ASCII_ENCODER = json.JSONEncoder(separators=(",", ":"), check_circular=False)


def loads(data: bytes | str) -> Any:
    """Parse JSON from an upstream or from lmbridge's own storage: what Python's json
    module reads, read the same. Raises ``JSONDecodeError``."""
    if _orjson_reads_exactly(data):
        try:
            return orjson.loads(data)
        except JSONDecodeError:
            pass  # not JSON at all, or something only the stdlib reads: it decides
    try:
        return json.loads(data)
    except (JSONDecodeError, UnicodeDecodeError):
        raise
    except ValueError:
        raise _too_many_digits(data) from None
    except RecursionError:
        raise _too_deep() from None


def loads_request(raw: bytes) -> Any:
    """Parse a client's request body: UTF-8, strict JSON. Raises ``UnicodeDecodeError``
    or ``JSONDecodeError`` (``msg``, ``lineno``, ``colno``)."""
    if _orjson_reads_exactly(raw):
        try:
            return orjson.loads(raw)
        except JSONDecodeError:
            pass  # the stdlib says what is wrong, in the words clients already see
    text = raw.decode("utf-8")
    try:
        return json.loads(text, parse_constant=_not_json, parse_float=_finite_float)
    except _NotJson as exc:
        raise JSONDecodeError(str(exc), text, max(text.find(exc.literal), 0)) from None
    except JSONDecodeError:
        raise
    except ValueError:
        raise _too_many_digits(text) from None
    except RecursionError:
        raise _too_deep() from None


def dumps_bytes(value: Any) -> bytes:
    """Compact JSON as UTF-8 bytes."""
    try:
        return orjson.dumps(value)
    except TypeError:  # orjson's JSONEncodeError: an integer beyond 64 bits, a non-str key
        text = _STDLIB_ENCODER.encode(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (read from a "\ud83d" escape) has no UTF-8 form: written as
        # the same escape, the value reads back unchanged.
        return _STDLIB_ASCII_ENCODER.encode(value).encode()


def dumps(value: Any) -> str:
    """Compact JSON as text."""
    return dumps_bytes(value).decode()


def _orjson_reads_exactly(data: bytes | str) -> bool:
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    return _NINETEEN_DIGITS not in raw.translate(_DIGITS_ONLY)


def _too_deep() -> JSONDecodeError:
    return JSONDecodeError("arrays and objects are nested too deeply", "", 0)


def _too_many_digits(data: bytes | str) -> JSONDecodeError:
    """The error for the one ValueError json.loads raises that is not a JSONDecodeError:
    int() refusing a long integer. Found after the fact, so that parsing pays nothing
    (a parse_int hook made integer-heavy bodies three times slower to read)."""
    text = data if isinstance(data, str) else data.decode("utf-8", "replace")
    limit = sys.get_int_max_str_digits()
    run = re.search(rf"\d{{{limit + 1},}}", text) if limit else None
    return JSONDecodeError(f"integer has more than {limit} digits", text, run.start() if run else 0)


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


# --- large request bodies ----------------------------------------------------


class TooManyItems(ValueError):
    """An array of the request body's top-level object is longer than its limit."""

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"'{key}' holds more than {limit} items")
        self.key = key
        self.limit = limit


def loads_request_in_pieces(raw: bytes, limits: Mapping[str, int] | None = None) -> Any:
    """``loads_request`` for a large body: the same value and errors, but read in many
    short C calls (one per member of the top-level object, one per element of its arrays)
    instead of one long one. Run in a worker thread, it leaves the event loop's thread the
    GIL between them: orjson holds it for its whole parse (0.5 s for 34 MB of small
    objects). An array named in ``limits`` with more elements than its limit raises
    ``TooManyItems`` without the rest being read."""
    text = raw.decode("utf-8")
    try:
        return _Pieces(text, limits or {}).document()
    except _NotJson as exc:
        raise JSONDecodeError(str(exc), text, max(text.find(exc.literal), 0)) from None
    except (JSONDecodeError, TooManyItems):
        raise
    except ValueError:
        raise _too_many_digits(text) from None
    except RecursionError:
        raise _too_deep() from None


_WHITESPACE = re.compile(r"[ \t\n\r]*")
_STRICT = json.JSONDecoder(parse_constant=_not_json, parse_float=_finite_float)


class _Pieces:
    """The top two levels of a JSON text read here, every deeper value by the standard
    library's C scanner (the same strictness as ``loads_request``'s fallback)."""

    def __init__(self, text: str, limits: Mapping[str, int]) -> None:
        self.text = text
        self.limits = limits

    def document(self) -> Any:
        text = self.text
        if text.startswith("\ufeff"):
            raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        at = self._skip(0)
        value: Any
        if text.startswith("{", at):
            value, at = self._object(at)
        elif text.startswith("[", at):
            value, at = self._array(at, None, "")
        else:
            value, at = self._value(at)
        at = self._skip(at)
        if at != len(text):
            raise JSONDecodeError("Extra data", text, at)
        return value

    def _skip(self, at: int) -> int:
        return _WHITESPACE.match(self.text, at).end()  # type: ignore[union-attr]

    def _value(self, at: int) -> tuple[Any, int]:
        try:
            return _STRICT.scan_once(self.text, at)  # type: ignore[attr-defined,no-any-return]
        except StopIteration as exc:
            raise JSONDecodeError("Expecting value", self.text, exc.value) from None

    def _object(self, at: int) -> tuple[dict[str, Any], int]:
        text = self.text
        result: dict[str, Any] = {}
        at = self._skip(at + 1)
        if text.startswith("}", at):
            return result, at + 1
        while True:
            if not text.startswith('"', at):
                raise JSONDecodeError("Expecting property name enclosed in double quotes", text, at)
            key, at = scanstring(text, at + 1)
            at = self._skip(at)
            if not text.startswith(":", at):
                raise JSONDecodeError("Expecting ':' delimiter", text, at)
            at = self._skip(at + 1)
            if text.startswith("[", at):
                result[key], at = self._array(at, self.limits.get(key), key)
            else:
                result[key], at = self._value(at)
            at = self._skip(at)
            if text.startswith("}", at):
                return result, at + 1
            if not text.startswith(",", at):
                raise JSONDecodeError("Expecting ',' delimiter", text, at)
            at = self._skip(at + 1)

    def _array(self, at: int, limit: int | None, key: str) -> tuple[list[Any], int]:
        text = self.text
        items: list[Any] = []
        at = self._skip(at + 1)
        if text.startswith("]", at):
            return items, at + 1
        while True:
            if limit is not None and len(items) >= limit:
                raise TooManyItems(key, limit)
            value, at = self._value(at)
            items.append(value)
            at = self._skip(at)
            if text.startswith("]", at):
                return items, at + 1
            if not text.startswith(",", at):
                raise JSONDecodeError("Expecting ',' delimiter", text, at)
            at = self._skip(at + 1)


def dumps_bytes_in_pieces(value: Any) -> bytes:
    """``dumps_bytes`` of a large request body, the same bytes, written a member and an
    array element at a time (short C calls, like ``loads_request_in_pieces``)."""
    if isinstance(value, dict) and all(isinstance(key, str) for key in value):
        return (
            b"{"
            + b",".join(
                dumps_bytes(key) + b":" + dumps_bytes_in_pieces(member)
                for key, member in value.items()
            )
            + b"}"
        )
    if isinstance(value, list):
        return b"[" + b",".join(dumps_bytes(element) for element in value) + b"]"
    return dumps_bytes(value)


def free_in_pieces(value: dict[str, Any]) -> None:
    """Empty the arrays of a large request body a slice at a time: freed at once, a
    million objects hold the GIL for 0.1 s; in slices, the event loop gets it between."""
    for member in value.values():
        if isinstance(member, list):
            while member:
                del member[-_FREE_SLICE:]


_FREE_SLICE = 4096


def json_type(value: Any) -> str:
    """A value's JSON type as an error message names it ("a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
