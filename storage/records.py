"""What the Responses service stores and reads back, independent of the backend.

The service never writes SQL: it hands a ``ResponseRecord`` to ``save_response``
and asks for "the chain before response X" (``load_chain``) or a page of items.
Item and response bodies travel as JSON text so that what was stored is what is
returned, byte for byte, and so that a turn's chat messages are sent upstream
exactly as they were the first time (the upstream's prompt cache depends on it).

``owner`` scopes every read and write: the hash of the client API key that
created the object, or ``""`` when the daemon has no client keys. An object
owned by someone else is reported as absent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

Order = Literal["asc", "desc"]


@dataclass(frozen=True, slots=True)
class StoredItem:
    """One item (a message, function call, ...) with its id and JSON text."""

    id: str
    json: str


# Not frozen: a frozen dataclass sets each field through object.__setattr__, and
# one of these is built on every stored response (1.4 -> 0.4 µs). Nothing changes a
# record once built. It reaches the writer process as plain tuples (writes.save_arg).
@dataclass(slots=True)
class ResponseRecord:
    id: str
    owner: str
    created_at: int
    expires_at: int
    status: str
    # The Response object as returned to clients (JSON text).
    body: str
    previous_response_id: str | None = None
    conversation_id: str | None = None
    background: bool = False
    # This request's input items, in order. Written once; later saves of the same
    # response (status updates of a background response) may pass them again.
    input_items: tuple[StoredItem, ...] = ()
    # The output items (also inside ``body``), indexed for item_reference lookups.
    output_items: tuple[StoredItem, ...] = ()
    # The chat messages this turn adds to the conversation (rendered input, then the
    # assistant's output), as a JSON array text; instructions are not part of it.
    turn_messages: str = "[]"
    # Estimated tokens of ``turn_messages`` (for truncation).
    turn_tokens: int = 0
    # Streaming events of a background response, JSON text each, in order, for
    # ``GET /v1/responses/{id}?stream=true`` replay.
    events: tuple[str, ...] = ()
    # When set, the items to append to that conversation in the same transaction.
    conversation_items: tuple[StoredItem, ...] = ()
    # The MCP servers whose tools this chain has listed, this response included.
    mcp_listed: tuple[str, ...] = ()


# Not frozen, like ResponseRecord: the chain cache makes one for every stored response.
@dataclass(slots=True)
class Chain:
    """The turns before (and including) a response, oldest first."""

    response_ids: tuple[str, ...]
    turn_messages: tuple[str, ...]
    turn_tokens: tuple[int, ...]
    # Set when an ancestor is missing (deleted or expired): the chain cannot be
    # continued faithfully. The id is the missing one.
    broken_at: str | None = None
    # The MCP servers listed along the chain (mcp_list_tools comes once per server).
    mcp_listed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Page:
    items: tuple[StoredItem, ...]
    has_more: bool


@dataclass(frozen=True, slots=True)
class ConversationRecord:
    id: str
    owner: str
    created_at: int
    expires_at: int
    metadata: str = "{}"  # JSON object text
    items: tuple[StoredItem, ...] = field(default=())


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One metered request as it ended: who (``owner``, the key's hash), which model and
    upstream, through which API, how it ended, the tokens the upstream reported, and its
    timings (milliseconds; ``ttft_ms`` only for streams)."""

    ts: float
    owner: str
    model: str
    upstream: str
    api: str  # chat, completions, embeddings, responses, relay
    outcome: str  # ok, error, cancelled
    status: int
    error_code: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    duration_ms: float = 0.0
    ttft_ms: float | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class UsageGroup:
    """The requests of one group (a key, a model, an upstream or a day) in a window."""

    group: str
    requests: int
    errors: int
    cancelled: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    p50_ms: float | None
    p95_ms: float | None
    ttft_p50_ms: float | None


class ResponseStore(Protocol):
    # --- responses ---
    async def save_response(self, record: ResponseRecord) -> None:
        """Insert or update (by id) a response, its items, events, and conversation items,
        in one transaction that is durable when this returns."""
        ...

    async def get_response(self, response_id: str, owner: str) -> str | None:
        """The stored Response JSON text, or None (absent, expired, another owner's)."""
        ...

    async def delete_response(self, response_id: str, owner: str) -> bool: ...

    async def load_chain(self, response_id: str, owner: str) -> Chain | None:
        """The chain ending at ``response_id`` in a bounded number of queries; None when
        ``response_id`` itself is absent."""
        ...

    async def list_input_items(
        self, response_id: str, owner: str, *, after: str | None, limit: int, order: Order
    ) -> Page | None:
        """A page of a response's input items; None when the response is absent.
        ``after`` is an item id (exclusive cursor) in the given order."""
        ...

    async def find_item(self, item_id: str, owner: str) -> StoredItem | None:
        """An input or output item of any stored response, or a conversation item."""
        ...

    async def get_events(
        self, response_id: str, owner: str, *, starting_after: int | None
    ) -> list[str] | None:
        """Stored streaming events with sequence_number > starting_after; None when absent."""
        ...

    async def fail_unfinished(
        self, now: int, message: str, *, response_ids: tuple[str, ...] | None = None
    ) -> int:
        """Mark responses left queued or in_progress (by a daemon that stopped, or, with
        ``response_ids``, just those) failed, with an error carrying ``message``, and
        end their stored events with ``response.failed``; returns how many."""
        ...

    async def purge_expired(self, now: int, *, retention: int | None = None) -> int:
        """Delete expired responses and conversations with their items; returns how many
        objects were deleted, and gives the freed pages back to the file system. With
        ``retention`` (seconds), every object's expiry is first set by that policy: a
        response's from its creation, a conversation's from its last change."""
        ...

    # --- conversations ---
    async def create_conversation(self, record: ConversationRecord) -> None: ...

    async def get_conversation(self, conversation_id: str, owner: str) -> ConversationRecord | None:
        """Without its items."""
        ...

    async def update_conversation(
        self, conversation_id: str, owner: str, *, metadata: str, expires_at: int
    ) -> ConversationRecord | None: ...

    async def delete_conversation(self, conversation_id: str, owner: str) -> bool: ...

    async def add_conversation_items(
        self, conversation_id: str, owner: str, items: tuple[StoredItem, ...], expires_at: int
    ) -> bool:
        """Append items (and push the conversation's expiry); False when it is absent."""
        ...

    async def claim_conversation(
        self, conversation_id: str, owner: str, holder: str, until: int
    ) -> bool | None:
        """Take the conversation for the turn ``holder`` (a response id) until ``until``
        (unix seconds), or renew the holder's claim. True: taken; False: another turn
        holds it; None: the conversation is absent."""
        ...

    async def release_conversation(self, conversation_id: str, holder: str) -> None:
        """End the claim of ``holder``, if it still holds the conversation."""
        ...

    async def release_all_conversations(self) -> int:
        """End every claim (after a restart nothing runs); returns how many."""
        ...

    async def list_conversation_items(
        self, conversation_id: str, owner: str, *, after: str | None, limit: int, order: Order
    ) -> Page | None: ...

    async def all_conversation_items(
        self, conversation_id: str, owner: str
    ) -> tuple[StoredItem, ...] | None:
        """Every item, oldest first (what a response in this conversation sees)."""
        ...

    async def get_conversation_item(
        self, conversation_id: str, owner: str, item_id: str
    ) -> StoredItem | None: ...

    async def delete_conversation_item(
        self, conversation_id: str, owner: str, item_id: str
    ) -> bool: ...


class UsageStore(Protocol):
    async def record_usage(self, records: Sequence[UsageRecord]) -> int:
        """Insert records in the next group commit; how many, once durable."""
        ...

    async def purge_usage(self, before: float) -> int:
        """Delete the records older than ``before`` (unix seconds); how many."""
        ...

    async def usage_report(
        self, group_by: str, since: float, until: float, owner: str | None
    ) -> list[UsageGroup]:
        """The records with ``since <= ts < until`` (only ``owner``'s unless None) summed
        per group (key, model, upstream or day), with latency percentiles."""
        ...

    async def tokens_since(self, since: float) -> dict[str, int]:
        """Prompt plus completion tokens per owner in the records since ``since``."""
        ...
