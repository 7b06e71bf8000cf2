"""Input items of a Responses request, checked and normalised. Pure: no I/O.

Every item comes out the way the API lists it back: it has an ``id`` and a
``type``, and message content is a list of parts. Used for a create body's
``input``, for items added to a conversation, and for stored history.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from proxy.errors import BadRequest, ItemLimit
from proxy.ids import new_id
from proxy.jsontext import dumps

MESSAGE_ROLES = ("user", "assistant", "system", "developer")
INPUT_PART_TYPES = ("input_text", "input_image", "input_file", "output_text", "refusal")
ITEM_TYPES = (
    "message",
    "function_call",
    "function_call_output",
    "reasoning",
    "item_reference",
    "compaction",
    "mcp_approval_response",
    "mcp_list_tools",
    "mcp_call",
    "mcp_approval_request",
)
ITEM_PREFIX = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "reasoning": "rs",
    "compaction": "cmp",
    "mcp_approval_response": "mcpr",
    "mcp_list_tools": "mcpl",
    "mcp_call": "mcp",
    "mcp_approval_request": "mcpr",
}


def normalize_input(
    value: Any, ids: Callable[[str], str] = new_id, *, max_items: int | None = None
) -> list[dict[str, Any]]:
    """The request's ``input`` as a list of complete items (ids assigned, content as parts)."""
    if value is None:
        return []
    if isinstance(value, str):
        return [_message({"role": "user", "content": value}, "input[0]", ids)]
    if not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of items.", param="input")
    if max_items is not None and len(value) > max_items:
        raise input_limit(max_items).refuse("input")
    return [normalize_item(item, f"input[{i}]", ids) for i, item in enumerate(value)]


def input_limit(count: int) -> ItemLimit:
    """responses.max_input_items, as the limit of 'input'."""
    return ItemLimit(
        count,
        "responses.max_input_items",
        "continue with 'previous_response_id' or 'conversation' rather than sending the "
        "whole history again",
    )


def normalize_item(item: Any, where: str, ids: Callable[[str], str] = new_id) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise BadRequest("Each input item must be an object.", param=where)
    item_id = item.get("id")
    if isinstance(item_id, str) and not _encodable(item_id):
        # Stored as a key, it must be text SQLite can hold; a lone surrogate is not.
        raise BadRequest("An item id must be valid Unicode text.", param=f"{where}.id")
    kind = item.get("type")
    if kind is None and "role" in item:
        kind = "message"
    elif kind is None and isinstance(item.get("id"), str) and set(item) <= {"id", "type"}:
        kind = "item_reference"  # the API takes a bare {"id": ...} as a reference
    if kind not in ITEM_TYPES:
        raise BadRequest(
            f"Unknown input item type {kind!r}; lmbridge accepts {', '.join(ITEM_TYPES)}.",
            param=f"{where}.type",
        )
    if kind == "message":
        return _message(item, where, ids)
    out = dict(item)
    out["type"] = kind
    if kind == "item_reference":
        if not isinstance(item.get("id"), str):
            raise BadRequest(
                "An item_reference needs the 'id' of a stored item.", param=f"{where}.id"
            )
        return out
    if kind == "function_call":
        for name in ("call_id", "name", "arguments"):
            if not isinstance(item.get(name), str):
                raise BadRequest(
                    f"A function_call item needs a string '{name}'.", param=f"{where}.{name}"
                )
        out.setdefault("status", "completed")
    elif kind == "function_call_output":
        if not isinstance(item.get("call_id"), str):
            raise BadRequest(
                "A function_call_output item needs the 'call_id' it answers.",
                param=f"{where}.call_id",
            )
        output = item.get("output")
        if not isinstance(output, str | list):
            raise BadRequest(
                "'output' must be a string or an array of content parts.", param=f"{where}.output"
            )
        out.setdefault("status", "completed")
    elif kind == "compaction":
        if not isinstance(item.get("encrypted_content"), str):
            raise BadRequest(
                "A compaction item needs its 'encrypted_content'.",
                param=f"{where}.encrypted_content",
            )
    elif kind == "mcp_approval_response":
        if not isinstance(item.get("approval_request_id"), str):
            raise BadRequest(
                "An mcp_approval_response needs the 'approval_request_id' it answers.",
                param=f"{where}.approval_request_id",
            )
        if not isinstance(item.get("approve"), bool):
            raise BadRequest("'approve' must be true or false.", param=f"{where}.approve")
    elif kind == "reasoning":
        summary = item.get("summary")
        if summary is not None and not isinstance(summary, list):
            raise BadRequest("'summary' must be an array.", param=f"{where}.summary")
        out.setdefault("summary", [])
    if not isinstance(out.get("id"), str) or not out["id"]:
        out["id"] = ids(ITEM_PREFIX.get(kind, "item"))
    return out


def _message(item: dict[str, Any], where: str, ids: Callable[[str], str]) -> dict[str, Any]:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise BadRequest(
            f"A message's 'role' must be one of {', '.join(MESSAGE_ROLES)}.",
            param=f"{where}.role",
        )
    content = item.get("content")
    text_type = "output_text" if role == "assistant" else "input_text"
    parts: list[dict[str, Any]]
    if isinstance(content, str):
        parts = [{"type": text_type, "text": content}]
        if role == "assistant":
            parts[0]["annotations"] = []
    elif isinstance(content, list):
        parts = [_part(p, f"{where}.content[{i}]") for i, p in enumerate(content)]
    else:
        raise BadRequest(
            "A message's 'content' must be a string or an array of parts.", param=f"{where}.content"
        )
    out: dict[str, Any] = {
        "type": "message",
        "id": item["id"] if isinstance(item.get("id"), str) and item["id"] else ids("msg"),
        "role": role,
        "content": parts,
        "status": item.get("status") or "completed",
    }
    if role == "assistant" and item.get("phase") is not None:
        if item["phase"] not in ("commentary", "final_answer"):
            raise BadRequest(
                "'phase' must be 'commentary' or 'final_answer'.", param=f"{where}.phase"
            )
        out["phase"] = item["phase"]
    return out


def _part(part: Any, where: str) -> dict[str, Any]:
    if isinstance(part, str):
        return {"type": "input_text", "text": part}
    if not isinstance(part, dict) or part.get("type") not in INPUT_PART_TYPES:
        raise BadRequest(
            f"A content part's 'type' must be one of {', '.join(INPUT_PART_TYPES)}.",
            param=f"{where}.type",
        )
    kind = part["type"]
    if kind in ("input_text", "output_text") and not isinstance(part.get("text"), str):
        raise BadRequest(f"An {kind} part needs a string 'text'.", param=f"{where}.text")
    if kind == "refusal" and not isinstance(part.get("refusal"), str):
        raise BadRequest("A refusal part needs a string 'refusal'.", param=f"{where}.refusal")
    if kind == "input_image":
        if part.get("file_id"):
            raise BadRequest(
                "lmbridge has no file store: send images as 'image_url' (a data: URL or an "
                "http(s) URL the upstream can read).",
                param=f"{where}.file_id",
            )
        if not isinstance(part.get("image_url"), str):
            raise BadRequest(
                "An input_image part needs an 'image_url'.", param=f"{where}.image_url"
            )
    if kind == "input_file":
        if part.get("file_id") or part.get("file_url"):
            raise BadRequest(
                "lmbridge has no file store and does not fetch URLs: send the file inline as "
                "'file_data' (base64) with a 'filename'.",
                param=f"{where}.file_id" if part.get("file_id") else f"{where}.file_url",
            )
        if not isinstance(part.get("file_data"), str):
            raise BadRequest("An input_file part needs 'file_data'.", param=f"{where}.file_data")
    out = dict(part)
    if kind == "output_text":
        out.setdefault("annotations", [])
    return out


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def check_call_outputs(items: list[dict[str, Any]], history: Sequence[str]) -> None:
    """Every function_call_output answers a function call: of this input, or of the turns
    it continues (rendered, where a call is ``"id":"<call_id>"`` of a ``tool_calls``
    entry). An output for no call is the client's mistake; a model shown one
    answers a question nobody asked."""
    called = {item["call_id"] for item in items if item.get("type") == "function_call"}
    for index, item in enumerate(items):
        if item.get("type") != "function_call_output":
            continue
        call_id = item["call_id"]
        if call_id in called:
            continue
        quoted = dumps(call_id)
        # Turns stored by versions before orjson have a space after the colon.
        needles = ('"id":' + quoted, '"id": ' + quoted)
        if any(needle in turn for turn in history for needle in needles):
            called.add(call_id)
            continue
        raise BadRequest(
            f"No function call with call_id {dumps(call_id)} precedes this "
            "function_call_output, in this input or in the response it continues.",
            param=f"input[{index}].call_id",
        )
