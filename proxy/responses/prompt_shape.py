"""The chat request's messages shaped for what the model's template accepts, on the way
upstream (``upstream_turn.chat_body``): the leading system messages merged into one, and
for a template that cannot render tools, the tools described in the system message
(``proxy/tool_prompt.py``). Pure: no I/O; the same messages give the same text every time,
so that the upstream's prompt cache keeps matching from turn to turn."""

from __future__ import annotations

import json
from typing import Any

from proxy.jsontext import dumps, loads
from proxy.tool_prompt import describe_tools


def described(settings: dict[str, Any], messages_json: str) -> tuple[dict[str, Any], str]:
    """The settings without tools and the messages with them described as text, the
    calls and results of earlier turns written as text too (the whole array is parsed:
    only for models whose template cannot render tools, which have small contexts)."""
    body = {**settings, "messages": loads(messages_json)}
    if not describe_tools(body):
        return settings, messages_json
    messages = body.pop("messages")
    return body, dumps(messages)


def merge_leading_system(messages_json: str) -> str:
    """The message array text with its leading system messages (``instructions``, then
    developer messages such as Codex's two) merged into one: many templates accept one
    system message, first. Only that leading run is parsed; the same array gives the
    same text every time, so the upstream's prompt cache keeps matching."""
    decoder = _DECODER
    at = _skip_space(messages_json, 1)
    texts: list[str] = []
    end = at
    while at < len(messages_json) and messages_json[at] == "{":
        message, after = decoder.raw_decode(messages_json, at)
        text = message.get("content") if message.get("role") == "system" else None
        if not isinstance(text, str):
            text = _plain_parts(message.get("content")) if message.get("role") == "system" else None
        if text is None or set(message) - {"role", "content"}:
            break
        texts.append(text)
        end = after
        at = _skip_space(messages_json, after)
        if at < len(messages_json) and messages_json[at] == ",":
            at = _skip_space(messages_json, at + 1)
    if len(texts) < 2:
        return messages_json
    merged = dumps({"role": "system", "content": "\n\n".join(t for t in texts if t)})
    rest = messages_json[end:].lstrip()
    return "[" + merged + ("," + rest.lstrip(",").lstrip() if rest.startswith(",") else rest)


_DECODER = json.JSONDecoder()


def _skip_space(text: str, at: int) -> int:
    while at < len(text) and text[at] in " \t\r\n":
        at += 1
    return at


def _plain_parts(content: Any) -> str | None:
    """A list of text parts as one text; None when it holds anything else."""
    if not isinstance(content, list) or not all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        for p in content
    ):
        return None
    return "".join(p["text"] for p in content)
