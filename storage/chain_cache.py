"""Recently continued chains, kept in memory so that the next turn reads no SQL.

An agent continues the response it just received, turn after turn: when a response
is saved, its chain is its parent's chain (if cached) plus its own turn, and the
next ``load_chain`` finds it here. A turn never changes once written, so an entry
stays true until a response is deleted or expires: any delete or purge empties the
cache, and an entry is not served past the expiry of its oldest turn.

Entries share their turn strings with each other (a chain extends its parent's
tuple); the byte bound counts each entry's turns in full, so it errs on the safe
side.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from storage.records import Chain, ResponseRecord

MAX_ENTRIES = 256
MAX_BYTES = 64_000_000
FINAL_STATUSES = frozenset({"completed", "incomplete", "failed", "cancelled"})


@dataclass(slots=True)  # not frozen: one is made for every stored response
class _Entry:
    owner: str
    chain: Chain
    expires_at: int  # of the oldest turn: the chain breaks then
    size: int


class ChainCache:
    def __init__(self, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES) -> None:
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._bytes = 0
        # Bumped by clear(): a chain read from the database before a delete must not
        # be cached after it.
        self.generation = 0

    def get(self, response_id: str, owner: str, now: int) -> Chain | None:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner or entry.expires_at <= now:
            return None
        self._entries.move_to_end(response_id)
        return entry.chain

    def put(
        self,
        response_id: str,
        owner: str,
        chain: Chain,
        expires_at: int,
        generation: int | None = None,
    ) -> None:
        if generation is not None and generation != self.generation:
            return
        if chain.broken_at is not None:
            return  # a broken chain is an error to report, not worth keeping
        size = sum(len(turn) for turn in chain.turn_messages)
        if size > self._max_bytes:
            return
        self._drop(response_id)
        self._entries[response_id] = _Entry(owner, chain, expires_at, size)
        self._bytes += size
        while len(self._entries) > self._max_entries or self._bytes > self._max_bytes:
            _, oldest = self._entries.popitem(last=False)
            self._bytes -= oldest.size

    def saved(self, record: ResponseRecord) -> None:
        """A response was committed: cache its chain if its parent's is known."""
        if record.status not in FINAL_STATUSES:
            self._drop(record.id)  # it will change again
            return
        if record.previous_response_id is None:
            chain = Chain(
                (record.id,),
                (record.turn_messages,),
                (record.turn_tokens,),
                mcp_listed=record.mcp_listed,
            )
            self.put(record.id, record.owner, chain, record.expires_at)
            return
        parent = self._entries.get(record.previous_response_id)
        if parent is None or parent.owner != record.owner:
            return
        chain = Chain(
            (*parent.chain.response_ids, record.id),
            (*parent.chain.turn_messages, record.turn_messages),
            (*parent.chain.turn_tokens, record.turn_tokens),
            mcp_listed=record.mcp_listed,
        )
        self.put(record.id, record.owner, chain, min(parent.expires_at, record.expires_at))

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0
        self.generation += 1

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is not None:
            self._bytes -= entry.size
