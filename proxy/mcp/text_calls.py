"""Tool calls that small models write as text instead of using the tool-call format.

Recognised only when ``mcp.text_tool_calls`` is on, and only for tool names that
were offered: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
(Hermes, Qwen), or a reply that is nothing but one such JSON object. Pure.
"""

from __future__ import annotations

import json
import re
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass(frozen=True, slots=True)
class TextCall:
    name: str
    arguments: str  # JSON text


def find_text_calls(content: str, offered: Container[str]) -> tuple[list[TextCall], str]:
    """The calls written in ``content`` and the text left around them."""
    calls: list[TextCall] = []
    for match in _BLOCK.finditer(content):
        call = _parse(match.group(1), offered)
        if call is not None:
            calls.append(call)
    if calls:
        return calls, _BLOCK.sub("", content).strip()
    stripped = content.strip()
    if stripped.startswith("```"):
        stripped = stripped.strip("`").removeprefix("json").strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        call = _parse(stripped, offered)
        if call is not None:
            return [call], ""
    return [], content


def _parse(text: str, offered: Container[str]) -> TextCall | None:
    try:
        data: Any = json.loads(text)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    if data["name"] not in offered:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):
        return TextCall(data["name"], arguments)
    return TextCall(data["name"], json.dumps(arguments, ensure_ascii=False))
