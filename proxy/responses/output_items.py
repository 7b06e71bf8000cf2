"""The output items of a Response and the events that announce them. Pure: no I/O.

``OutputItems`` numbers the events (one ``sequence_number`` counter from 0),
keeps the items in output order, and hands out copies of what it shows, so that
an event already sent never changes. ``ResponseBuilder`` (builder.py) and the
MCP items (mcp_items.py) build on it.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from proxy.ids import new_id

Event = dict[str, Any]

# What _event returns when nobody will see the events (a non-streamed foreground
# response): one shared, empty placeholder instead of a dict per event.
_UNSEEN: Event = MappingProxyType({})  # type: ignore[assignment]


def _same(value: Any) -> Any:
    return value


@dataclass
class Item:
    index: int
    body: dict[str, Any]
    open: bool = True


@dataclass
class CallItem(Item):
    flat_name: str = ""
    arguments: list[str] = field(default_factory=list)
    kind: str = "function"  # "function" (the client's), "mcp" (lmbridge runs it), "approval"
    call_id: str = ""


class OutputItems:
    def __init__(
        self,
        response: dict[str, Any],
        *,
        ids: Callable[[str], str] = new_id,
        clock: Callable[[], float] = time.time,
        emit: bool = True,
        kept: bool = True,
    ) -> None:
        self.response = response
        self._ids = ids
        self._clock = clock
        self.sequence = 0
        self.items: list[Item] = []
        # Without a stream to feed, events are thrown away: skip building them.
        self._emit = emit
        self._copy: Callable[[Any], Any] = copy.deepcopy if emit else _same
        # The Response in an event changes only between calls, and a foreground stream's
        # sink serialises each call's events before the next: only events that are
        # ``kept`` (a background run's, replayed to later readers) need a copy of it.
        self._copy_response: Callable[[Any], Any] = copy.deepcopy if emit and kept else _same

    def _event(self, kind: str, **fields: Any) -> Event:
        if not self._emit:
            return _UNSEEN
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def snapshot(self) -> dict[str, Any]:
        snapshot: dict[str, Any] = self._copy_response(self.response)
        return snapshot

    def _add_item(self, body: dict[str, Any], item: Item | None = None) -> tuple[Item, Event]:
        item = item or Item(len(self.items), body)
        item.index = len(self.items)
        self.items.append(item)
        return item, self._event(
            "response.output_item.added", output_index=item.index, item=self._copy(body)
        )

    @property
    def output(self) -> list[dict[str, Any]]:
        return [item.body for item in self.items]

    def function_calls(self) -> list[dict[str, Any]]:
        return [item.body for item in self.items if item.body["type"] == "function_call"]

    def end_as(self, response: dict[str, Any]) -> list[Event]:
        """The terminal event for ``response``, a final state other than the one built
        (what storage holds when it could not take the built one)."""
        return [self._event(TERMINAL_EVENTS[response["status"]], response=response)]


# The event that ends a stream, by the Response's final status (OpenAI has no
# response.cancelled: a cancelled stream ends with response.incomplete).
TERMINAL_EVENTS = {
    "completed": "response.completed",
    "failed": "response.failed",
    "incomplete": "response.incomplete",
    "cancelled": "response.incomplete",
}

# The events that carry a model's first generated token (its time to first token).
FIRST_TOKEN_EVENTS = frozenset(
    {
        "response.output_text.delta",
        "response.reasoning_text.delta",
        "response.function_call_arguments.delta",
        "response.mcp_call_arguments.delta",
    }
)
