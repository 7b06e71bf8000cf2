"""The event sequence of a finished response, rebuilt from the stored object, for
``GET /v1/responses/{id}?stream=true`` of a response whose events were not kept (one
that was not run in the background). Pure."""

from __future__ import annotations

import copy
from typing import Any

from proxy.responses.output_items import TERMINAL_EVENTS, Event


def replay_events(response: dict[str, Any]) -> list[Event]:
    """The event sequence of a finished response, rebuilt from the stored object (for
    ``GET /v1/responses/{id}?stream=true`` of a response whose events were not kept)."""
    sequence = 0

    def event(kind: str, **fields: Any) -> Event:
        nonlocal sequence
        out = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return out

    start = copy.deepcopy(response)
    start.update(
        status="in_progress",
        output=[],
        usage=None,
        error=None,
        incomplete_details=None,
        completed_at=None,
    )
    events = [
        event("response.created", response=start),
        event("response.in_progress", response=copy.deepcopy(start)),
    ]
    for index, item in enumerate(response.get("output") or []):
        added = copy.deepcopy(item)
        kind = item.get("type")
        if kind in ("message", "reasoning"):
            added["content"] = []
        if kind == "function_call":
            added["arguments"] = ""
        if "status" in added:
            added["status"] = "in_progress"
        events.append(event("response.output_item.added", output_index=index, item=added))
        if kind in ("message", "reasoning"):
            for part_index, part in enumerate(item.get("content") or []):
                where = {"item_id": item["id"], "output_index": index, "content_index": part_index}
                empty = {**part, "text": ""} if "text" in part else part
                events.append(event("response.content_part.added", **where, part=empty))
                extra: dict[str, Any] = {}
                if kind == "reasoning":
                    text_events: str | None = "response.reasoning_text"
                elif part.get("type") == "output_text":
                    text_events, extra = "response.output_text", {"logprobs": []}
                else:
                    text_events = None
                if text_events is not None:
                    text = part.get("text", "")
                    events.append(event(f"{text_events}.delta", **where, delta=text, **extra))
                    events.append(event(f"{text_events}.done", **where, text=text, **extra))
                events.append(event("response.content_part.done", **where, part=part))
        elif kind == "function_call":
            events.append(
                event(
                    "response.function_call_arguments.delta",
                    item_id=item["id"],
                    output_index=index,
                    delta=item["arguments"],
                )
            )
            events.append(
                event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=index,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        events.append(event("response.output_item.done", output_index=index, item=item))
    final = TERMINAL_EVENTS.get(response.get("status", ""), "response.incomplete")
    events.append(event(final, response=response))
    return events
