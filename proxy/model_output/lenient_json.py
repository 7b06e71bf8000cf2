"""JSON as small models write it: where a value ends in a stream, and the light repairs
that make a nearly-JSON tool call readable. Pure.

The repairs are the ones seen in models' tool calls and nothing more, so that text that
is not meant as JSON stays unreadable (and so stays text):

- a trailing comma before ``}`` or ``]``;
- single quotes around keys and strings (a Python ``dict`` written out), where the
  closing quote is unambiguous: followed by ``:``, ``,``, ``}``, ``]`` or the end;
- one missing closing brace at the end (the model stopped one token early);
- raw control characters (a newline) inside strings, which ``json`` rejects by default.

``NaN``, ``Infinity`` and numbers beyond a double are refused: they could not be written
back as JSON arguments.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# --- where a value ends -----------------------------------------------------------------

NEED_MORE = -1


class ValueExtent:
    """Finds, fed a growing text, where the JSON object or array starting at ``start``
    ends. Incremental: each call scans only what was added since the last one.

    Quotes of both kinds open strings (the repairs read single-quoted ones), brackets of
    both kinds nest. ``closer``, when given, is a tag that may cut an unclosed value
    short (``</tool_call>`` right after ``{"a": 1``): ``closer_at`` is then where it
    starts."""

    __slots__ = ("_pattern", "closer", "closer_at", "depth", "end", "pos", "quote")

    def __init__(self, start: int, closer: str = "") -> None:
        self.pos = start
        self.depth = 0
        self.quote = ""
        self.closer = closer
        self.closer_at = NEED_MORE
        self.end = NEED_MORE
        self._pattern = _outside_pattern(closer[:1])

    def scan(self, text: str) -> bool:
        """True once decided: ``end`` (the index after the value) or ``closer_at`` set."""
        if self.end >= 0 or self.closer_at >= 0:
            return True
        pos, length = self.pos, len(text)
        while pos < length:
            if self.quote:
                match = (_IN_DOUBLE if self.quote == '"' else _IN_SINGLE).search(text, pos)
                if match is None:
                    pos = length
                    break
                if match.group() == "\\":
                    if match.end() >= length:  # the escaped character has not come yet
                        pos = match.start()
                        break
                    pos = match.end() + 1
                    continue
                self.quote = ""
                pos = match.end()
                continue
            match = self._pattern.search(text, pos)
            if match is None:
                pos = length
                break
            char, at = match.group(), match.start()
            if self.closer and char == self.closer[0] and self.depth > 0:
                if text.startswith(self.closer, at):
                    self.pos, self.closer_at = at, at
                    return True
                if self.closer.startswith(text[at:]):  # maybe the closer, cut by the delta
                    pos = at
                    break
            if char in "\"'":
                self.quote = char
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    self.pos = self.end = at + 1
                    return True
            pos = at + 1
        self.pos = pos
        return False


_IN_DOUBLE = re.compile(r'["\\]')
_IN_SINGLE = re.compile(r"['\\]")
_OUTSIDE: dict[str, re.Pattern[str]] = {}


def _outside_pattern(extra: str) -> re.Pattern[str]:
    if extra not in _OUTSIDE:
        chars = "{}\\[\\]\"'" + re.escape(extra) if extra else "{}\\[\\]\"'"
        _OUTSIDE[extra] = re.compile(f"[{chars}]")
    return _OUTSIDE[extra]


# --- reading, with repairs --------------------------------------------------------------


def loads(text: str) -> Any | None:
    """The value ``text`` holds, as written or after the repairs; None when neither
    reads."""
    value = _strict(text)
    if value is not None:
        return value
    repaired = repair(text)
    return None if repaired == text else _strict(repaired)


def _strict(text: str) -> Any | None:
    try:
        return json.loads(text, strict=False, parse_constant=_refuse, parse_float=_finite)
    except ValueError:  # JSONDecodeError, and ints over the digit limit
        return None


def _refuse(name: str) -> Any:
    raise ValueError(name)


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


_CLOSES_SINGLE = re.compile(r"'\s*(?:[:,}\]]|$)")
_TRAILING_COMMA = re.compile(r",\s*[}\]]")


def repair(text: str) -> str:
    """``text`` with the repairs applied (unchanged where none applies)."""
    out: list[str] = []
    stack: list[str] = []
    i, length = 0, len(text)
    while i < length:
        char = text[i]
        if char == '"':
            end = _string_end(text, i)
            out.append(text[i:end])
            i = end
            continue
        if char == "'":
            end = _single_quoted_end(text, i)
            if end < 0:
                out.append(char)
                i += 1
                continue
            out.append(json.dumps(_unescape_single(text[i + 1 : end]), ensure_ascii=False))
            i = end + 1
            continue
        if char == "," and _TRAILING_COMMA.match(text, i):
            i += 1
            continue
        if char in "{[":
            stack.append(char)
        elif char in "}]" and stack:
            stack.pop()
        out.append(char)
        i += 1
    if stack == ["{"]:
        out.append("}")
    return "".join(out)


def _string_end(text: str, start: int) -> int:
    """The index after the double-quoted string opening at ``start`` (or the end)."""
    i = start + 1
    while True:
        match = _IN_DOUBLE.search(text, i)
        if match is None:
            return len(text)
        if match.group() == '"':
            return match.end()
        i = match.end() + 1


def _single_quoted_end(text: str, start: int) -> int:
    """The closing quote of a single-quoted string at ``start``: the first unescaped
    ``'`` followed by a character that ends a JSON string's place; -1 for none."""
    i = start + 1
    while True:
        match = _IN_SINGLE.search(text, i)
        if match is None:
            return -1
        if match.group() == "\\":
            i = match.end() + 1
            continue
        if _CLOSES_SINGLE.match(text, match.start()):
            return match.start()
        i = match.end()


_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)", re.DOTALL)
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f"}


def _unescape_single(body: str) -> str:
    def one(match: re.Match[str]) -> str:
        escaped = match.group(1)
        if len(escaped) == 5:
            return chr(int(escaped[1:], 16))
        return _ESCAPES.get(escaped, escaped)

    return _ESCAPE.sub(one, body)
