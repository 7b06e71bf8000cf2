"""The MCP items of a Response: tool listings, calls lmbridge runs, approval requests.

Pure: no I/O. The rounds of a response (tool_rounds.py) run the calls and feed
their results back here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from proxy.responses.output_items import CallItem, Event, OutputItems


@dataclass(frozen=True, slots=True)
class McpTarget:
    """What a flat tool name means when it is an MCP tool of this response."""

    label: str  # the server_label
    tool: str
    approval: bool = False  # a call becomes an mcp_approval_request instead
    offered: bool = True  # False: a name the model made up under the server's prefix


@dataclass
class PendingMcpCall:
    """An MCP call of the model, to be run (or, for an approval request, asked)."""

    item: dict[str, Any]
    flat_name: str
    arguments: str
    call: CallItem


class McpItems(OutputItems):
    def list_tools(
        self, label: str, tools: list[dict[str, Any]], error: str | None = None
    ) -> list[Event]:
        """An mcp_list_tools item: the tools of one server, once per conversation."""
        body: dict[str, Any] = {
            "id": self._ids("mcpl"),
            "type": "mcp_list_tools",
            "server_label": label,
            "tools": [],
            "error": None,
        }
        item, added = self._add_item(body)
        item.open = False
        events = [
            added,
            self._event(
                "response.mcp_list_tools.in_progress", item_id=body["id"], output_index=item.index
            ),
        ]
        body["tools"] = tools
        body["error"] = error
        kind = "failed" if error else "completed"
        events.append(
            self._event(
                f"response.mcp_list_tools.{kind}", item_id=body["id"], output_index=item.index
            )
        )
        events.append(
            self._event("response.output_item.done", output_index=item.index, item=self._copy(body))
        )
        return events

    def complete_mcp(
        self, pending: PendingMcpCall, output: str | None, error: dict[str, Any] | None
    ) -> list[Event]:
        call = pending.call
        call.open = False
        body = call.body
        body["output"] = output
        body["error"] = error
        body["status"] = "failed" if error else "completed"
        kind = "failed" if error else "completed"
        return [
            self._event(f"response.mcp_call.{kind}", item_id=body["id"], output_index=call.index),
            self._event(
                "response.output_item.done", output_index=call.index, item=self._copy(body)
            ),
        ]

    def add_mcp_call(
        self, label: str, tool: str, arguments: str, approval_request_id: str
    ) -> PendingMcpCall:
        """An approved call, run at the start of the next response (no model reply made it)."""
        body: dict[str, Any] = {
            "id": self._ids("mcp"),
            "type": "mcp_call",
            "server_label": label,
            "name": tool,
            "arguments": arguments,
            "status": "in_progress",
            "output": None,
            "error": None,
            "approval_request_id": approval_request_id,
        }
        call = CallItem(0, body, kind="mcp", call_id=approval_request_id)
        self._add_item(body, call)
        return PendingMcpCall(body, "", arguments, call)

    def added_events(self, pending: PendingMcpCall) -> list[Event]:
        """The opening events of a call made by ``add_mcp_call``."""
        body = pending.call.body
        return [
            self._event(
                "response.output_item.added",
                output_index=pending.call.index,
                item=self._copy({**body, "status": "in_progress"}),
            ),
            self._event(
                "response.mcp_call_arguments.done",
                item_id=body["id"],
                output_index=pending.call.index,
                arguments=body["arguments"],
            ),
            self._event(
                "response.mcp_call.in_progress", item_id=body["id"], output_index=pending.call.index
            ),
        ]

    def _close_mcp(self, call: CallItem, status: str) -> list[Event]:
        """An MCP item left open when the response ends (a forced final round)."""
        call.open = False
        body = call.body
        body["arguments"] = "".join(call.arguments)
        if call.kind == "mcp":
            body["status"] = "incomplete" if status == "completed" else status
        return [
            self._event("response.output_item.done", output_index=call.index, item=self._copy(body))
        ]
