"""Tool calls as JSON: the call object a model writes (``{"name", "arguments"}``, Llama's
``"parameters"``, OpenAI's ``{"type": "function", "function": {...}}``) read into a
``TextCall``, and its first key read early, before the object is complete. Pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from proxy.model_output.lenient_json import loads


@dataclass(frozen=True, slots=True)
class TextCall:
    """A tool call found in the text: the tool's name and its arguments as JSON text."""

    name: str
    arguments: str


# --- calls out of JSON values -----------------------------------------------------------

_CALL_KEYS = frozenset({"name", "arguments", "parameters", "type", "id"})


def call_from_object(value: Any, offered: Container[str]) -> TextCall | None:
    """``{"name", "arguments"|"parameters"}`` (or OpenAI's ``{"type": "function",
    "function": {...}}``) naming an offered tool, with an object for arguments."""
    if not isinstance(value, dict):
        return None
    if isinstance(value.get("function"), dict) and set(value) <= {"type", "function", "id"}:
        if value.get("type", "function") != "function":
            return None
        value = value["function"]
    if not set(value) <= _CALL_KEYS or value.get("type", "function") != "function":
        return None
    name = value.get("name")
    if not isinstance(name, str) or name not in offered:
        return None
    arguments = value["arguments"] if "arguments" in value else value.get("parameters", {})
    return make_call(name, arguments)


def make_call(name: str, arguments: Any) -> TextCall | None:
    """A call with ``arguments`` (an object, or JSON text of one) written back as JSON."""
    if isinstance(arguments, str):
        arguments = loads(arguments) if arguments.strip() else {}
    if not isinstance(arguments, dict):
        return None
    return TextCall(name, json.dumps(arguments, ensure_ascii=False))


def calls_from_text(text: str, offered: Container[str]) -> list[TextCall] | None:
    """The calls a JSON text holds: one call object, or a non-empty list of them."""
    value = loads(text)
    values = value if isinstance(value, list) else [value]
    calls = [call_from_object(item, offered) for item in values]
    if not calls or None in calls:
        return None
    return [call for call in calls if call is not None]


# --- the first key, read early ----------------------------------------------------------

OK, NO = True, False
_WS = re.compile(r"\s*")


def skip_space(text: str, i: int) -> int:
    """The index of the first character at or after ``i`` that is not whitespace."""
    match = _WS.match(text, i)
    return match.end() if match else i


def head(text: str, start: int, offered: Container[str]) -> bool | None:
    """Whether the object (or list of objects) opening at ``start`` can still be a call,
    from its first key alone: a key no call has, or a ``name`` that was not offered, ends
    the hold-back at once (a JSON answer the user asked for streams on). None: not yet
    known."""
    i = start
    if text[i] == "[":
        i = skip_space(text, i + 1)
        if i >= len(text):
            return None
        if text[i] != "{":
            return NO
    i = skip_space(text, i + 1)
    key, i = _string_at(text, i)
    if key is None:
        return None if i >= len(text) else NO
    if key not in _CALL_KEYS and key != "function":
        return NO
    if key != "name":
        return OK
    i = skip_space(text, i)
    if i >= len(text):
        return None
    if text[i] != ":":
        return NO
    i = skip_space(text, i + 1)
    name, i = _string_at(text, i)
    if name is None:
        return None if i >= len(text) else NO
    return name in offered


def _string_at(text: str, i: int) -> tuple[str | None, int]:
    """The string (either quote) starting at ``i`` and the index after it; ``(None, i)``
    with ``i == len(text)`` when it is not complete yet, ``(None, i)`` short of the end
    when there is no string."""
    if i >= len(text):
        return None, i
    quote = text[i]
    if quote not in "\"'":
        return None, i
    j = i + 1
    while True:
        k = text.find(quote, j)
        if k < 0:
            return None, len(text)
        backslashes = len(text[j:k]) - len(text[j:k].rstrip("\\"))
        if backslashes % 2 == 0:
            break
        j = k + 1
    body = text[i + 1 : k]
    try:
        value = json.loads(f'"{body}"') if quote == '"' else body
    except ValueError:
        return None, i
    return value, k + 1
