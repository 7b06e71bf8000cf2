"""What each write does, in SQL: the functions the group-commit writer
(storage/writer.py) applies inside its transaction.

``SQLiteStore`` (storage/sqlite.py) picks the function and builds its argument;
nothing here begins or commits a transaction. The functions run in the writer
process (storage/writer_process.py), so they are found by name and their arguments
must pickle.
``save_responses`` handles a whole batch of saves with one ``executemany`` per
statement; the other writes are rare and run one after the other (``each``).
"""

from __future__ import annotations

import json
import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from storage.records import ConversationRecord, ResponseRecord, StoredItem
from storage.writer_process import each


@dataclass(frozen=True, slots=True)
class Ref:
    """An object of one owner, as seen at ``now`` (an expired one is absent)."""

    id: str
    owner: str
    now: int


# A save travels to the writer process as plain tuples and strings (``save_arg``):
# pickling the record itself (a class lookup and a ``__reduce__`` per object) cost
# 3.6 us in the daemon and 3.7 us in the writer per stored response; these tuples
# cost 0.4 and 0.6. Layout: the ``responses`` row (UPSERT_RESPONSE's columns), the
# input items and the output items as (item id, JSON), the events, the items to
# append to the row's conversation as (item id, JSON), and the time of the save.
SaveArg = tuple[
    tuple[Any, ...],
    tuple[tuple[str, str], ...],
    tuple[tuple[str, str], ...],
    tuple[str, ...],
    tuple[tuple[str, str], ...],
    int,
]
# Positions in the responses row of a SaveArg.
_ID, _OWNER, _EXPIRES_AT, _CONVERSATION, _BACKGROUND = 0, 1, 3, 6, 7


def save_arg(r: ResponseRecord, now: int) -> SaveArg:
    row = (
        r.id,
        r.owner,
        r.created_at,
        r.expires_at,
        r.status,
        r.previous_response_id,
        r.conversation_id,
        int(r.background),
        r.body,
        r.turn_messages,
        r.turn_tokens,
        json.dumps(list(r.mcp_listed)) if r.mcp_listed else "[]",
    )
    return (
        row,
        tuple([(item.id, item.json) for item in r.input_items]),
        tuple([(item.id, item.json) for item in r.output_items]),
        r.events,
        tuple([(item.id, item.json) for item in r.conversation_items]),
        now,
    )


@dataclass(frozen=True, slots=True)
class AddItems:
    conversation: Ref
    items: tuple[StoredItem, ...]
    expires_at: int


@dataclass(frozen=True, slots=True)
class MetadataUpdate:
    conversation: Ref
    metadata: str
    expires_at: int


@dataclass(frozen=True, slots=True)
class ItemDelete:
    conversation: Ref
    item_id: str


@dataclass(frozen=True, slots=True)
class Claim:
    conversation: Ref
    holder: str
    until: int


@dataclass(frozen=True, slots=True)
class FailUnfinished:
    now: int
    message: str
    # Only these responses; None: every unfinished one.
    response_ids: tuple[str, ...] | None = None


# --- responses ---

UPSERT_RESPONSE = """
INSERT INTO responses (id, owner, created_at, expires_at, status, previous_response_id,
    conversation_id, background, body, turn_messages, turn_tokens, mcp_listed)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET
    owner = excluded.owner,
    expires_at = excluded.expires_at,
    status = excluded.status,
    body = excluded.body,
    turn_messages = excluded.turn_messages,
    turn_tokens = excluded.turn_tokens,
    mcp_listed = excluded.mcp_listed
"""
INSERT_INPUT_ITEM = """
INSERT OR IGNORE INTO response_items (response_id, kind, position, item_id, body)
VALUES (?, 'input', ?, ?, ?)
"""
DELETE_OUTPUT_ITEMS = "DELETE FROM response_items WHERE kind = 'output' AND response_id IN (?)"
INSERT_OUTPUT_ITEM = """
INSERT INTO response_items (response_id, kind, position, item_id, body)
VALUES (?, 'output', ?, ?, ?)
"""
DELETE_EVENTS = "DELETE FROM response_events WHERE response_id IN (?)"
INSERT_EVENT = "INSERT INTO response_events (response_id, seq, body) VALUES (?, ?, ?)"

# --- conversation items, appended by a save or by add_conversation_items ---

# Appends after the last position; a conversation that is absent, expired or someone
# else's selects no row, so nothing is appended.
APPEND_CONVERSATION_ITEM = """
INSERT INTO conversation_items (conversation_id, position, item_id, body, created_at)
SELECT c.id,
    1 + COALESCE((SELECT MAX(position) FROM conversation_items WHERE conversation_id = c.id), -1),
    :item_id, :body, :now
FROM conversations AS c
WHERE c.id = :conversation_id AND c.owner = :owner AND c.expires_at > :now
"""
# The expiry only moves forward: adding items never shortens a conversation's life.
TOUCH_CONVERSATION = """
UPDATE conversations SET updated_at = :now, expires_at = MAX(expires_at, :expires_at)
WHERE id = :conversation_id AND owner = :owner AND expires_at > :now
"""


def save_responses(conn: sqlite3.Connection, saves: Sequence[SaveArg]) -> list[None]:
    """Upsert a batch of responses with their items, events and conversation items.

    Rows go in as multi-row statements: a few statements per batch, not a few per
    response."""
    _insert_rows(conn, UPSERT_RESPONSE, [row for row, *_ in saves])
    inputs = [
        (row[_ID], position, item_id, body)
        for row, items, *_ in saves
        for position, (item_id, body) in enumerate(items)
    ]
    _insert_rows(conn, INSERT_INPUT_ITEM, inputs)

    # The last save of a response in the batch decides its outputs and events, exactly
    # as if the saves had been committed one after the other.
    latest = {save[0][_ID]: save for save in saves}
    _delete_for(conn, DELETE_OUTPUT_ITEMS, list(latest))
    outputs = [
        (response_id, position, item_id, body)
        for response_id, (_, _, items, *_) in latest.items()
        for position, (item_id, body) in enumerate(items)
    ]
    _insert_rows(conn, INSERT_OUTPUT_ITEM, outputs)
    # Only background responses keep events; others never had any to replace.
    with_events = [
        response_id
        for response_id, (row, _, _, events, *_) in latest.items()
        if row[_BACKGROUND] or events
    ]
    _delete_for(conn, DELETE_EVENTS, with_events)
    events = [
        (response_id, seq, body)
        for response_id, (_, _, _, kept, *_) in latest.items()
        for seq, body in enumerate(kept)
    ]
    _insert_rows(conn, INSERT_EVENT, events)

    appending = [
        (row, items, now) for row, _, _, _, items, now in saves if row[_CONVERSATION] and items
    ]
    if appending:
        conn.executemany(
            APPEND_CONVERSATION_ITEM,
            [
                _append_row(row[_CONVERSATION], row[_OWNER], item_id, body, now)
                for row, items, now in appending
                for item_id, body in items
            ],
        )
        conn.executemany(
            TOUCH_CONVERSATION,
            [
                _touch_row(row[_CONVERSATION], row[_OWNER], row[_EXPIRES_AT], now)
                for row, _, now in appending
            ],
        )
    return [None] * len(saves)


# SQLite accepts 32766 parameters per statement (since 3.32); stay well below.
_MAX_PARAMETERS = 30000
_VALUES = re.compile(r"VALUES\s*(\([^)]*\))")
_statements: dict[tuple[str, int], str] = {}


def _insert_rows(conn: sqlite3.Connection, sql: str, rows: Sequence[tuple[Any, ...]]) -> None:
    """Run an ``INSERT ... VALUES (?, ...)`` for many rows in as few statements as fit."""
    if not rows:
        return
    width = len(rows[0])
    per_statement = max(1, _MAX_PARAMETERS // width)
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        key = (sql, len(chunk))
        statement = _statements.get(key)
        if statement is None:
            match = _VALUES.search(sql)
            assert match is not None, sql
            values = ", ".join([match.group(1)] * len(chunk))
            statement = sql[: match.start(1)] + values + sql[match.end(1) :]
            if len(_statements) < 4096:
                _statements[key] = statement
        conn.execute(statement, [value for row in chunk for value in row])


def _delete_for(conn: sqlite3.Connection, sql: str, response_ids: list[str]) -> None:
    """Run a ``... WHERE response_id IN (?)`` statement for many responses at once."""
    for start in range(0, len(response_ids), _MAX_PARAMETERS):
        chunk = response_ids[start : start + _MAX_PARAMETERS]
        conn.execute(sql.replace("IN (?)", "IN (" + ", ".join("?" * len(chunk)) + ")"), chunk)


@each
def delete_response(conn: sqlite3.Connection, ref: Ref) -> bool:
    cursor = conn.execute(
        "DELETE FROM responses WHERE id = ? AND owner = ? AND expires_at > ?",
        (ref.id, ref.owner, ref.now),
    )
    return bool(cursor.rowcount)


@each
def fail_unfinished(conn: sqlite3.Connection, fail: FailUnfinished) -> int:
    # json_valid: a body that is not JSON still gets its status column fixed rather
    # than failing the whole statement.
    failed = _fetchall(
        conn,
        """
        UPDATE responses SET
            status = 'failed',
            body = CASE WHEN json_valid(body) THEN json_set(body,
                '$.status', 'failed',
                '$.error', json_object('code', 'server_error', 'message', :message))
                ELSE body END
        WHERE status IN ('queued', 'in_progress') AND expires_at > :now
            AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
        RETURNING id
        """,
        {
            "message": fail.message,
            "now": fail.now,
            "ids": None if fail.response_ids is None else json.dumps(fail.response_ids),
        },
    )
    # Their stored events (a background response's, for replays) stopped before the
    # end: a replay must still end with the terminal event, as a live stream would.
    conn.executemany(
        """
        INSERT INTO response_events (response_id, seq, body)
        SELECT r.id, e.seq + 1, json_object('type', 'response.failed',
            'sequence_number', e.seq + 1,
            'response', CASE WHEN json_valid(r.body) THEN json(r.body) ELSE NULL END)
        FROM responses AS r
        JOIN (SELECT MAX(seq) AS seq FROM response_events WHERE response_id = :id) AS e
            ON e.seq IS NOT NULL
        WHERE r.id = :id
        """,
        [{"id": row[0]} for row in failed],
    )
    return len(failed)


@dataclass(frozen=True, slots=True)
class Purge:
    now: int
    # Seconds everything is kept (from its creation, a conversation from its last
    # change); None keeps each object's own expiry.
    retention: int | None


@each
def purge_expired(conn: sqlite3.Connection, purge: Purge) -> int:
    now, retention = purge.now, purge.retention
    if retention is not None:
        # A retention policy applies to everything stored, whatever the setting was
        # when it was written: lowering it purges what is now too old, raising it
        # keeps what is now young enough.
        conn.execute(
            "UPDATE responses SET expires_at = created_at + :r WHERE expires_at <> created_at + :r",
            {"r": retention},
        )
        conn.execute(
            "UPDATE conversations SET expires_at = updated_at + :r"
            " WHERE expires_at <> updated_at + :r",
            {"r": retention},
        )
    # Items and events go with their parent (ON DELETE CASCADE).
    deleted = 0
    for table in ("responses", "conversations"):
        cursor = conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))
        deleted += cursor.rowcount
    return deleted


@each
def give_back_free_pages(conn: sqlite3.Connection, _: None) -> None:
    # incremental_vacuum frees one page per step, and Python's execute() steps a
    # statement that returns no columns only once; executescript() steps each to the
    # end. It commits any open transaction first, hence ``Writer.submit_alone``.
    # The vacuum moves the free pages to the end and cuts them off in the WAL; the
    # checkpoint then shrinks the database file itself. PASSIVE never waits for a
    # reader: if one is busy, the next automatic checkpoint finishes the work.
    conn.executescript("PRAGMA incremental_vacuum; PRAGMA wal_checkpoint(PASSIVE);")


# --- conversations ---


@each
def create_conversation(conn: sqlite3.Connection, record: ConversationRecord) -> None:
    conn.execute(
        "INSERT INTO conversations (id, owner, created_at, updated_at, expires_at, metadata)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (
            record.id,
            record.owner,
            record.created_at,
            record.created_at,
            record.expires_at,
            record.metadata,
        ),
    )
    if record.items:
        conn.executemany(
            "INSERT INTO conversation_items (conversation_id, position, item_id, body, created_at)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (record.id, position, item.id, item.json, record.created_at)
                for position, item in enumerate(record.items)
            ],
        )


@each
def update_conversation(
    conn: sqlite3.Connection, update: MetadataUpdate
) -> ConversationRecord | None:
    ref = update.conversation
    rows = list(
        _fetchall(
            conn,
            "UPDATE conversations SET metadata = ?, expires_at = ?, updated_at = ?"
            " WHERE id = ? AND owner = ? AND expires_at > ?"
            " RETURNING id, owner, created_at, expires_at, metadata",
            (update.metadata, update.expires_at, ref.now, ref.id, ref.owner, ref.now),
        )
    )
    if not rows:
        return None
    conversation_id, owner, created_at, expires_at, metadata = rows[0]
    return ConversationRecord(conversation_id, owner, created_at, expires_at, metadata)


@each
def delete_conversation(conn: sqlite3.Connection, ref: Ref) -> bool:
    cursor = conn.execute(
        "DELETE FROM conversations WHERE id = ? AND owner = ? AND expires_at > ?",
        (ref.id, ref.owner, ref.now),
    )
    return bool(cursor.rowcount)


@each
def add_conversation_items(conn: sqlite3.Connection, add: AddItems) -> bool:
    ref = add.conversation
    cursor = conn.execute(
        TOUCH_CONVERSATION, _touch_row(ref.id, ref.owner, add.expires_at, ref.now)
    )
    if not cursor.rowcount:
        return False
    if add.items:
        conn.executemany(
            APPEND_CONVERSATION_ITEM,
            [_append_row(ref.id, ref.owner, item.id, item.json, ref.now) for item in add.items],
        )
    return True


@each
def delete_conversation_item(conn: sqlite3.Connection, delete: ItemDelete) -> bool:
    ref = delete.conversation
    cursor = conn.execute(
        """
        DELETE FROM conversation_items
        WHERE item_id = ? AND conversation_id = (
            SELECT id FROM conversations WHERE id = ? AND owner = ? AND expires_at > ?)
        """,
        (delete.item_id, ref.id, ref.owner, ref.now),
    )
    return bool(cursor.rowcount)


@each
def claim_conversation(conn: sqlite3.Connection, claim: Claim) -> bool | None:
    ref = claim.conversation
    try:
        cursor = conn.execute(
            "UPDATE conversations SET busy_by = ?, busy_until = ?"
            " WHERE id = ? AND owner = ? AND expires_at > ?"
            " AND (busy_by IS NULL OR busy_by = ? OR busy_until <= ?)",
            (claim.holder, claim.until, ref.id, ref.owner, ref.now, claim.holder, ref.now),
        )
    except UnicodeEncodeError:
        # An id with a lone surrogate (a client's "\ud83d" escape) has no UTF-8 form:
        # no stored conversation has it.
        return None
    if cursor.rowcount:
        return True
    found = conn.execute(
        "SELECT 1 FROM conversations WHERE id = ? AND owner = ? AND expires_at > ?",
        (ref.id, ref.owner, ref.now),
    ).fetchone()
    return False if found else None


@each
def release_conversation(conn: sqlite3.Connection, claim: Claim) -> None:
    # Only the holder's: a claim that lapsed and was taken by another turn stays.
    conn.execute(
        "UPDATE conversations SET busy_by = NULL, busy_until = 0 WHERE id = ? AND busy_by = ?",
        (claim.conversation.id, claim.holder),
    )


@each
def release_all_conversations(conn: sqlite3.Connection, _: None) -> int:
    return conn.execute(
        "UPDATE conversations SET busy_by = NULL, busy_until = 0 WHERE busy_by IS NOT NULL"
    ).rowcount


def _append_row(
    conversation_id: str, owner: str, item_id: str, body: str, now: int
) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "owner": owner,
        "item_id": item_id,
        "body": body,
        "now": now,
    }


def _touch_row(conversation_id: str, owner: str, expires_at: int, now: int) -> dict[str, Any]:
    return {
        "conversation_id": conversation_id,
        "owner": owner,
        "expires_at": expires_at,
        "now": now,
    }


def _fetchall(conn: sqlite3.Connection, sql: str, params: Any = ()) -> list[Any]:
    return conn.execute(sql, params).fetchall()
