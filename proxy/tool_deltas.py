"""Streamed tool calls put back together: which call a delta belongs to, and how its
name and arguments add up. Pure; shared by the chat-completions tool loop
(``proxy.mcp.rounds``) and the Responses builder (``proxy.responses.builder``).

Upstream quirks absorbed here: deltas without ``index``; ``id`` and the whole ``name``
repeated in every delta (llama-cpp-python); a name streamed in pieces; arguments sent
as a parsed object instead of JSON text.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from typing import Any


def delta_index(
    delta: Mapping[str, Any], position: int, ids: Mapping[int, str], taken: Collection[int]
) -> int:
    """The call a delta belongs to. Without ``index``: a known ``id`` continues its call,
    a new ``id`` starts a new one, and a delta with neither continues the latest call
    (or, when there is none yet, takes its position in the delta's list).

    ``ids`` are the ids of the calls seen so far by index; ``taken`` every index seen,
    those of calls left out (over a limit) included."""
    index = delta.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    given = delta.get("id")
    if isinstance(given, str) and given:
        for known, call_id in ids.items():
            if call_id == given:
                return known
        return max([*taken, -1]) + 1
    return max(taken) if taken else position


def merge_name(current: str, piece: str) -> str:
    """The name so far with a delta's ``name``: a repeat of the whole name changes
    nothing, anything else is the next piece."""
    if not piece or piece == current:
        return current
    return current + piece


def arguments_piece(value: Any) -> str | None:
    """A delta's ``arguments`` as JSON text (some servers send the parsed object)."""
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return value if isinstance(value, str) and value else None
