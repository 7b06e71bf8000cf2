"""The ``ResponseStore`` on one SQLite file, through aiosqlite.

Data flow: the Responses service calls these methods; reads run here on a read
connection, writes are handed to the group-commit writer (storage/writer.py), whose
process of its own applies the SQL of storage/writes.py on the one connection that
writes. In WAL mode readers do not block the writer nor the writer them.

``synchronous=FULL`` makes a committed transaction survive a power cut or kill -9.
Every read filters by owner and treats a row with ``expires_at <= now`` as absent;
``now`` comes from the injected clock (unix seconds).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from storage import usage, writes
from storage.chain_cache import ChainCache
from storage.errors import DatabaseReplaced, StorageError
from storage.migrations import MIGRATIONS, Migration
from storage.records import (
    Chain,
    ConversationRecord,
    Order,
    Page,
    ResponseRecord,
    StoredItem,
    UsageGroup,
    UsageRecord,
)
from storage.writer import Writer, WriteStats
from storage.writer_process import file_identity
from storage.writes import Ref

__all__ = ["DatabaseReplaced", "SQLiteStore", "StorageError"]

Clock = Callable[[], float]

# Waiting this long for another process's lock beats failing at once.
BUSY_TIMEOUT = 5.0
# No real conversation is this long; only a cycle (a save naming a later response as
# its previous one) is, and the walk stops here rather than running for ever.
MAX_CHAIN = 100_000

_CHAIN = """
WITH RECURSIVE chain (depth, id, previous_response_id, turn_messages, turn_tokens,
                      expires_at, mcp_listed) AS (
    SELECT 0, id, previous_response_id, turn_messages, turn_tokens, expires_at, mcp_listed
    FROM responses
    WHERE id = :id AND owner = :owner AND expires_at > :now
    UNION ALL
    SELECT chain.depth + 1, r.id, r.previous_response_id, r.turn_messages, r.turn_tokens,
        r.expires_at, NULL
    FROM chain JOIN responses AS r ON r.id = chain.previous_response_id
    WHERE r.owner = :owner AND r.expires_at > :now AND chain.depth < :max_depth
)
SELECT id, previous_response_id, turn_messages, turn_tokens, expires_at, mcp_listed
FROM chain ORDER BY depth DESC
"""

# A page of children after the cursor item, in one statement: the LEFT JOIN yields
# one all-NULL row when the parent exists with nothing to list, and no row when the
# parent is absent. An unknown cursor compares with NULL, which matches nothing. No
# ORDER BY in the cursor's subquery: without it SQLite finds the id by its index.
_PAGE = """
SELECT i.item_id, i.body
FROM {parent} AS p
LEFT JOIN {children} AS i ON i.{link} = p.id {kind}
    AND i.position {cmp} CASE WHEN :after IS NULL THEN {start} ELSE (
        SELECT position FROM {children}
        WHERE {link} = p.id {kind} AND item_id = :after
        LIMIT 1) END
WHERE p.id = :id AND p.owner = :owner AND p.expires_at > :now
ORDER BY i.position {direction}
LIMIT :limit
"""


def _page_queries(parent: str, children: str, link: str, kind: str) -> dict[str, str]:
    return {
        order: _PAGE.format(
            parent=parent,
            children=children,
            link=link,
            kind=kind,
            cmp=cmp,
            start=start,
            direction=order.upper(),
        )
        for order, cmp, start in (("asc", ">", -1), ("desc", "<", 2**63 - 1))
    }


_INPUT_ITEMS_PAGE = _page_queries(
    "responses", "response_items", "response_id", "AND kind = 'input'"
)
_CONVERSATION_ITEMS_PAGE = _page_queries(
    "conversations", "conversation_items", "conversation_id", ""
)

# Response items first (the newest response wins), then conversation items.
_FIND_ITEM = """
SELECT item_id, body FROM (
    SELECT i.item_id, i.body, 0 AS source, r.created_at, r.rowid AS seq,
        i.kind = 'output' AS is_output, i.position
    FROM response_items AS i JOIN responses AS r ON r.id = i.response_id
    WHERE i.item_id = :item_id AND r.owner = :owner AND r.expires_at > :now
    UNION ALL
    SELECT i.item_id, i.body, 1, i.created_at, i.rowid, 0, i.position
    FROM conversation_items AS i JOIN conversations AS c ON c.id = i.conversation_id
    WHERE i.item_id = :item_id AND c.owner = :owner AND c.expires_at > :now
)
ORDER BY source, created_at DESC, seq DESC, is_output DESC, position DESC
LIMIT 1
"""


class SQLiteStore:
    """A ``ResponseStore`` (storage/records.py) on one SQLite file."""

    def __init__(
        self,
        path: Path,
        writer: Writer,
        reader: aiosqlite.Connection,
        clock: Clock,
        identity: tuple[int, int] | None = None,
    ) -> None:
        self.path = path
        self._identity = identity
        self._writer = writer
        self._reader = reader
        self._clock = clock
        self.chains = ChainCache()

    @classmethod
    async def open(
        cls,
        path: Path | str,
        migrations: tuple[Migration, ...] = MIGRATIONS,
        *,
        clock: Clock = time.time,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> SQLiteStore:
        """Open (creating it if missing) and migrate the database. ``clock`` gives the
        unix time that decides expiry; ``busy_timeout`` (seconds) is how long to wait
        for a lock held by another process before failing."""
        path = Path(path)
        busy_ms = int(busy_timeout * 1000)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            # Meet the usual causes of failure (a directory, no permission) here, with
            # a plain message, before a process is started for the file.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise StorageError(f"cannot open the database {path}: {exc}") from exc
        # The file this daemon works on: the writer stops writing once the path holds
        # another file or none (storage/writer_process.py).
        identity = file_identity(path)
        # The writer process creates the schema; the reader opens after it.
        writer = Writer(path, busy_ms=busy_ms, migrations=migrations, identity=identity)
        await writer.start()
        reader: aiosqlite.Connection | None = None
        try:
            reader = await aiosqlite.connect(path, isolation_level=None)
            await _prepare_reader(reader, busy_ms)
        except BaseException as exc:
            if reader is not None:
                await reader.close()
            await writer.close()
            if isinstance(exc, sqlite3.Error):
                raise StorageError(f"cannot open the database {path}: {exc}") from exc
            raise
        return cls(path, writer, reader, clock, identity)

    async def close(self) -> None:
        try:
            await self._writer.close()
        finally:
            await self._reader.close()

    async def schema_version(self) -> int:
        rows = await self._read("SELECT MAX(version) FROM schema_migrations", ())
        return int(rows[0][0]) if rows and rows[0][0] is not None else 0

    async def ping(self) -> None:
        """Raise StorageError unless the database answers a query and its writer
        process runs (a dead one is started again here); DatabaseReplaced when the file
        at the path is no longer the one opened."""
        if self._identity is not None and file_identity(self.path) != self._identity:
            raise DatabaseReplaced(self.path)
        await self._writer.ensure_running()
        await self._read("SELECT 1 FROM schema_migrations LIMIT 1", ())

    @property
    def write_stats(self) -> WriteStats:
        """Writes committed so far and in how many transactions (group commits)."""
        return self._writer.stats

    async def set_read_trace(self, callback: Callable[[str], object] | None) -> None:
        """Pass every SQL statement the read connection runs to ``callback`` (tests,
        debugging); None turns it off."""
        # sqlite3 accepts None; the hint of aiosqlite omits it.
        await self._reader.set_trace_callback(callback)  # type: ignore[arg-type]

    # --- responses ---

    async def save_response(self, record: ResponseRecord) -> None:
        if record.conversation_items and not record.conversation_id:
            raise ValueError(f"{record.id}: conversation_items without a conversation_id")
        await self._writer.submit(writes.save_responses, writes.save_arg(record, self._now()))
        self.chains.saved(record)

    async def get_response(self, response_id: str, owner: str) -> str | None:
        rows = await self._read(
            "SELECT body FROM responses WHERE id = ? AND owner = ? AND expires_at > ?",
            (response_id, owner, self._now()),
        )
        return str(rows[0][0]) if rows else None

    async def delete_response(self, response_id: str, owner: str) -> bool:
        # Chains through the deleted response are broken now, wherever they are cached;
        # cleared again once committed, for reads that ran meanwhile.
        self.chains.clear()
        try:
            return await self._writer.submit(writes.delete_response, self._ref(response_id, owner))
        finally:
            self.chains.clear()

    async def load_chain(self, response_id: str, owner: str) -> Chain | None:
        now = self._now()
        cached = self.chains.get(response_id, owner, now)
        if cached is not None:
            return cached
        generation = self.chains.generation
        rows = await self._read(
            _CHAIN,
            {"id": response_id, "owner": owner, "now": now, "max_depth": MAX_CHAIN},
        )
        if not rows:
            return None
        chain = Chain(
            response_ids=tuple(row[0] for row in rows),
            turn_messages=tuple(row[2] for row in rows),
            turn_tokens=tuple(row[3] for row in rows),
            # The oldest turn reached names a previous response the walk could not
            # reach (deleted, expired, someone else's).
            broken_at=rows[0][1],
            mcp_listed=tuple(json.loads(rows[-1][5] or "[]")),  # the tip's, cumulative
        )
        self.chains.put(response_id, owner, chain, min(row[4] for row in rows), generation)
        return chain

    async def list_input_items(
        self, response_id: str, owner: str, *, after: str | None, limit: int, order: Order
    ) -> Page | None:
        return await self._page(_INPUT_ITEMS_PAGE[order], response_id, owner, after, limit)

    async def find_item(self, item_id: str, owner: str) -> StoredItem | None:
        rows = await self._read(
            _FIND_ITEM, {"item_id": item_id, "owner": owner, "now": self._now()}
        )
        return StoredItem(rows[0][0], rows[0][1]) if rows else None

    async def get_events(
        self, response_id: str, owner: str, *, starting_after: int | None
    ) -> list[str] | None:
        rows = await self._read(
            """
            SELECT e.body FROM responses AS r
            LEFT JOIN response_events AS e ON e.response_id = r.id AND e.seq > :after
            WHERE r.id = :id AND r.owner = :owner AND r.expires_at > :now
            ORDER BY e.seq
            """,
            {
                "id": response_id,
                "owner": owner,
                "now": self._now(),
                "after": -1 if starting_after is None else starting_after,
            },
        )
        if not rows:
            return None
        return [row[0] for row in rows if row[0] is not None]

    async def fail_unfinished(
        self, now: int, message: str, *, response_ids: tuple[str, ...] | None = None
    ) -> int:
        return await self._writer.submit(
            writes.fail_unfinished, writes.FailUnfinished(now, message, response_ids)
        )

    async def purge_expired(self, now: int, *, retention: int | None = None) -> int:
        deleted = await self._writer.submit(writes.purge_expired, writes.Purge(now, retention))
        await self._writer.submit_alone(writes.give_back_free_pages, None)
        return deleted

    # --- usage ---

    async def record_usage(self, records: Sequence[UsageRecord]) -> int:
        return await self._writer.submit(usage.insert_usage, [usage.row(r) for r in records])

    async def purge_usage(self, before: float) -> int:
        return await self._writer.submit(usage.purge_usage, before)

    async def usage_report(
        self, group_by: str, since: float, until: float, owner: str | None
    ) -> list[UsageGroup]:
        rows = await self._read(
            usage.REPORTS[group_by], {"since": since, "until": until, "owner": owner}
        )
        return [UsageGroup(str(row[0]), *row[1:8], *row[8:11]) for row in rows]

    async def tokens_since(self, since: float) -> dict[str, int]:
        rows = await self._read(usage.TOKENS_SINCE, (since,))
        return {str(owner): int(tokens or 0) for owner, tokens in rows}

    # --- conversations ---

    async def create_conversation(self, record: ConversationRecord) -> None:
        await self._writer.submit(writes.create_conversation, record)

    async def get_conversation(self, conversation_id: str, owner: str) -> ConversationRecord | None:
        rows = await self._read(
            "SELECT id, owner, created_at, expires_at, metadata FROM conversations"
            " WHERE id = ? AND owner = ? AND expires_at > ?",
            (conversation_id, owner, self._now()),
        )
        if not rows:
            return None
        found_id, found_owner, created_at, expires_at, metadata = rows[0]
        return ConversationRecord(found_id, found_owner, created_at, expires_at, metadata)

    async def update_conversation(
        self, conversation_id: str, owner: str, *, metadata: str, expires_at: int
    ) -> ConversationRecord | None:
        update = writes.MetadataUpdate(self._ref(conversation_id, owner), metadata, expires_at)
        return await self._writer.submit(writes.update_conversation, update)

    async def delete_conversation(self, conversation_id: str, owner: str) -> bool:
        return await self._writer.submit(
            writes.delete_conversation, self._ref(conversation_id, owner)
        )

    async def add_conversation_items(
        self, conversation_id: str, owner: str, items: tuple[StoredItem, ...], expires_at: int
    ) -> bool:
        add = writes.AddItems(self._ref(conversation_id, owner), items, expires_at)
        return await self._writer.submit(writes.add_conversation_items, add)

    async def claim_conversation(
        self, conversation_id: str, owner: str, holder: str, until: int
    ) -> bool | None:
        claim = writes.Claim(self._ref(conversation_id, owner), holder, until)
        return await self._writer.submit(writes.claim_conversation, claim)

    async def release_conversation(self, conversation_id: str, holder: str) -> None:
        claim = writes.Claim(self._ref(conversation_id, ""), holder, 0)
        await self._writer.submit(writes.release_conversation, claim)

    async def release_all_conversations(self) -> int:
        return await self._writer.submit(writes.release_all_conversations, None)

    async def list_conversation_items(
        self, conversation_id: str, owner: str, *, after: str | None, limit: int, order: Order
    ) -> Page | None:
        query = _CONVERSATION_ITEMS_PAGE[order]
        return await self._page(query, conversation_id, owner, after, limit)

    async def all_conversation_items(
        self, conversation_id: str, owner: str
    ) -> tuple[StoredItem, ...] | None:
        rows = await self._read(
            """
            SELECT i.item_id, i.body FROM conversations AS c
            LEFT JOIN conversation_items AS i ON i.conversation_id = c.id
            WHERE c.id = ? AND c.owner = ? AND c.expires_at > ?
            ORDER BY i.position
            """,
            (conversation_id, owner, self._now()),
        )
        if not rows:
            return None
        return tuple(StoredItem(row[0], row[1]) for row in rows if row[0] is not None)

    async def get_conversation_item(
        self, conversation_id: str, owner: str, item_id: str
    ) -> StoredItem | None:
        rows = await self._read(
            """
            SELECT i.item_id, i.body
            FROM conversation_items AS i JOIN conversations AS c ON c.id = i.conversation_id
            WHERE i.item_id = ? AND c.id = ? AND c.owner = ? AND c.expires_at > ?
            ORDER BY i.position DESC LIMIT 1
            """,
            (item_id, conversation_id, owner, self._now()),
        )
        return StoredItem(rows[0][0], rows[0][1]) if rows else None

    async def delete_conversation_item(
        self, conversation_id: str, owner: str, item_id: str
    ) -> bool:
        delete = writes.ItemDelete(self._ref(conversation_id, owner), item_id)
        return await self._writer.submit(writes.delete_conversation_item, delete)

    # --- helpers ---

    def _now(self) -> int:
        return int(self._clock())

    def _ref(self, object_id: str, owner: str) -> Ref:
        return Ref(object_id, owner, self._now())

    async def _read(
        self, sql: str, params: Iterable[Any] | Mapping[str, Any]
    ) -> list[tuple[Any, ...]]:
        try:
            # execute_fetchall runs the statement to its end in one hop, so the read
            # transaction ends with it and never holds back a WAL checkpoint.
            rows = await self._reader.execute_fetchall(sql, params)
        except UnicodeEncodeError:
            # A parameter with a lone surrogate (a client's "\ud83d" escape in an id)
            # has no UTF-8 form, so no stored text can equal it: no rows.
            return []
        except (sqlite3.Error, ValueError) as exc:  # ValueError: the connection is closed
            raise StorageError(f"cannot read the database {self.path}: {exc}") from exc
        return [tuple(row) for row in rows]

    async def _page(
        self, query: str, parent_id: str, owner: str, after: str | None, limit: int
    ) -> Page | None:
        rows = await self._read(
            query,
            {
                "id": parent_id,
                "owner": owner,
                "now": self._now(),
                "after": after,
                "limit": limit + 1,
            },
        )
        if not rows:
            return None
        items = [StoredItem(row[0], row[1]) for row in rows if row[0] is not None]
        return Page(items=tuple(items[:limit]), has_more=len(items) > limit)


async def _prepare_reader(conn: aiosqlite.Connection, busy_ms: int) -> None:
    await conn.execute(f"PRAGMA busy_timeout={busy_ms}")
    # A read path that writes by mistake fails loudly instead of racing the writer.
    await conn.execute("PRAGMA query_only=ON")
