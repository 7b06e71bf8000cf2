"""What the model reads back from a tool: an MCP tool result turned into chat content.

Pure: the result arrives as the plain JSON form of the SDK's ``CallToolResult``
(``content`` blocks, ``structuredContent``, ``isError``). Text stays text;
structured content is JSON when there is no text; images become image parts for a
model that reads images (in a user message after the tool message, since chat tool
messages carry text only) and a short note otherwise; resources and links become a
one-line summary plus any text; long results are cut with a marker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ToolOutput:
    """The text of the tool message, and images to show the model separately."""

    text: str
    is_error: bool = False
    images: list[dict[str, Any]] = field(default_factory=list)
    # "tool": the server said the tool failed; "protocol": lmbridge could not run it.
    kind: str = "tool"

    def image_message(self, label: str) -> dict[str, Any] | None:
        if not self.images:
            return None
        return {
            "role": "user",
            "content": [{"type": "text", "text": f"Image(s) returned by {label}:"}, *self.images],
        }


def render_result(result: dict[str, Any], *, images: bool, max_chars: int) -> ToolOutput:
    pieces: list[str] = []
    image_parts: list[dict[str, Any]] = []
    for block in result.get("content") or []:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text":
            pieces.append(str(block.get("text", "")))
        elif kind == "image":
            mime = block.get("mimeType") or block.get("mime_type") or "image/png"
            data = str(block.get("data") or "")
            if images and data:
                image_parts.append(
                    {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{data}"}}
                )
                pieces.append(f"[image {mime}: shown below]")
            else:
                pieces.append(
                    f"[image {mime}, {len(data) * 3 // 4} bytes: not shown, the "
                    "model does not read images]"
                )
        elif kind == "audio":
            mime = block.get("mimeType") or block.get("mime_type") or "audio"
            pieces.append(f"[audio {mime}: not shown]")
        elif kind == "resource":
            pieces.append(_resource(block.get("resource") or {}))
        elif kind == "resource_link":
            name = block.get("name") or block.get("title") or ""
            description = f" - {block['description']}" if block.get("description") else ""
            pieces.append(
                f"[resource link: {name} {block.get('uri', '')}{description}]".replace("  ", " ")
            )
    if not pieces:
        structured = result.get("structuredContent", result.get("structured_content"))
        if structured is not None:
            pieces.append(json.dumps(structured, ensure_ascii=False))
    text = "\n".join(pieces) if pieces else "(the tool returned nothing)"
    is_error = bool(result.get("isError", result.get("is_error")))
    if is_error:
        text = f"The tool reported an error: {text}"
    return ToolOutput(cut(text, max_chars), is_error, image_parts)


def _resource(resource: dict[str, Any]) -> str:
    uri = resource.get("uri", "")
    mime = resource.get("mimeType") or resource.get("mime_type") or ""
    if isinstance(resource.get("text"), str):
        head = f"[resource {uri}{' ' + mime if mime else ''}]"
        return f"{head}\n{resource['text']}"
    size = len(str(resource.get("blob") or "")) * 3 // 4
    return f"[resource {uri}{' ' + mime if mime else ''}, {size} bytes of binary data]"


def cut(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    rest = len(text) - max_chars
    return f"{text[:max_chars]}\n[... {rest} more characters cut by lmbridge]"


def error_output(message: str) -> ToolOutput:
    """A failure lmbridge met running the call (timeout, bad arguments, server down):
    told to the model as the tool's result, so that it can recover."""
    return ToolOutput(f"The tool call failed: {message}", is_error=True, kind="protocol")
