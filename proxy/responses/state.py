"""What a turn continues from, read from storage: the chain of a previous response or
the items of a conversation (rendered as chat messages), the items its input refers
to, and the MCP calls it approves."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from proxy.errors import BadRequest, NotFound, PreviousResponseNotFound
from proxy.jsontext import dumps, loads
from proxy.responses import render
from proxy.responses.mcp_items import McpTarget
from proxy.responses.mcp_tools import McpSetup
from proxy.responses.recorder import LARGE_INPUT
from proxy.responses.render import ToolNames
from proxy.responses.request import CreateRequest
from proxy.tasks import WorkerThread
from storage.records import ResponseStore, StoredItem


@dataclass(frozen=True)
class History:
    """The turns a new turn continues: chat message array texts, oldest first, their
    token estimates, and the MCP servers whose tools they listed already."""

    turns: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    listed: set[str] = field(default_factory=set)


async def load_history(
    store: ResponseStore,
    worker: WorkerThread,
    request: CreateRequest,
    owner: str,
    names: ToolNames,
    *,
    images: bool,
    max_items: int,
    reasoning: bool = False,
) -> History:
    """The chain of ``previous_response_id`` (stored rendered, turn by turn), or the
    items of ``conversation`` rendered now, or nothing."""
    if request.previous_response_id is not None:
        chain = await store.load_chain(request.previous_response_id, owner)
        if chain is None:
            raise PreviousResponseNotFound(
                f"Previous response with id '{request.previous_response_id}' not found.",
                param="previous_response_id",
            )
        if chain.broken_at is not None:
            raise PreviousResponseNotFound(
                f"Previous response '{request.previous_response_id}' cannot be continued: "
                f"an earlier response of its chain ('{chain.broken_at}') was deleted or "
                "has expired.",
                param="previous_response_id",
            )
        return History(list(chain.turn_messages), list(chain.turn_tokens), set(chain.mcp_listed))
    if request.conversation_id is None:
        return History()
    items = await store.all_conversation_items(request.conversation_id, owner)
    if items is None:
        raise NotFound(
            f"Conversation with id '{request.conversation_id}' not found.",
            param="conversation",
            code="conversation_not_found",
        )
    if len(items) > max_items:
        raise BadRequest(
            f"Conversation '{request.conversation_id}' holds {len(items)} items, more "
            f"than the {max_items} one turn carries as history "
            "(responses.max_history_items): start a new conversation, or delete old items.",
            param="conversation",
            code="too_many_items",
        )
    if not items:
        return History()
    rendered, listed = await worker.run_if(
        len(items) > LARGE_INPUT,
        partial(_render_stored, items, names, images=images, reasoning=reasoning),
    )
    return History([rendered], [render.estimate_tokens(rendered)], listed)


async def approvals(
    store: ResponseStore, items: list[dict[str, Any]], owner: str, setup: McpSetup | None
) -> list[tuple[dict[str, Any], McpTarget]]:
    """The calls approved by mcp_approval_response items, with what they call."""
    approved: list[tuple[dict[str, Any], McpTarget]] = []
    for index, item in enumerate(items):
        if item["type"] != "mcp_approval_response":
            continue
        stored = await store.find_item(item["approval_request_id"], owner)
        request_item = loads(stored.json) if stored is not None else None
        if request_item is None or request_item.get("type") != "mcp_approval_request":
            raise NotFound(
                f"Approval request '{item['approval_request_id']}' not found.",
                param=f"input[{index}].approval_request_id",
                code="item_not_found",
            )
        if not item["approve"]:
            continue
        target = None
        if setup is not None:
            target = next(
                (
                    t
                    for t in setup.targets.values()
                    if t.label == request_item["server_label"] and t.tool == request_item["name"]
                ),
                None,
            )
        if target is None:
            raise BadRequest(
                f"The approved call to {request_item['name']!r} of the MCP server "
                f"{request_item['server_label']!r} needs that server's mcp tool in 'tools'.",
                param=f"input[{index}]",
            )
        approved.append((request_item, target))
    return approved


async def resolve_references(
    store: ResponseStore, items: list[dict[str, Any]], owner: str
) -> list[dict[str, Any]]:
    resolved = []
    for index, item in enumerate(items):
        if item["type"] != "item_reference":
            resolved.append(item)
            continue
        stored = await store.find_item(item["id"], owner)
        if stored is None:
            raise NotFound(
                f"Item with id '{item['id']}' not found.",
                param=f"input[{index}].id",
                code="item_not_found",
            )
        resolved.append(loads(stored.json))
    return resolved


def _render_stored(
    items: Sequence[StoredItem], names: ToolNames, *, images: bool, reasoning: bool
) -> tuple[str, set[str]]:
    """A conversation's stored items as one chat message array text, and the MCP servers
    they listed."""
    parsed = [loads(i.json) for i in items]
    rendered = dumps(render.render_items(parsed, names, images=images, reasoning=reasoning))
    listed = {i["server_label"] for i in parsed if i.get("type") == "mcp_list_tools"}
    return rendered, listed
