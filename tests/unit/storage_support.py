"""What the SQLiteStore tests share: a settable clock, record builders, and a write
that injects a fault into the writer process."""

from __future__ import annotations

import json
import os
import sqlite3
from typing import Any

from storage.records import ResponseRecord, StoredItem
from storage.writer_process import each

NOW = 1_700_000_000


def items(*ids: str) -> tuple[StoredItem, ...]:
    return tuple(StoredItem(i, json.dumps({"id": i, "type": "message"})) for i in ids)


def response(response_id: str = "resp_1", **fields: Any) -> ResponseRecord:
    """A completed response of alice's, an hour from expiry; ``fields`` override."""
    status = fields.pop("status", "completed")
    values: dict[str, Any] = {
        "owner": "alice",
        "created_at": NOW,
        "expires_at": NOW + 3600,
        "body": json.dumps({"id": response_id, "status": status, "completed_at": None}),
    }
    values.update(fields)
    return ResponseRecord(id=response_id, status=status, **values)


@each
def limit_pages(conn: sqlite3.Connection, extra: int) -> None:
    """Past ``max_page_count`` SQLite reports SQLITE_FULL, as on a full disk. Runs in the
    writer process, which finds it by name like the writes of storage/writes.py."""
    [pages] = conn.execute("PRAGMA page_count").fetchone()
    conn.execute(f"PRAGMA max_page_count={pages + extra}")


@each
def exit_writer(conn: sqlite3.Connection, status: int) -> None:
    """The writer process exits on the spot, as when it is killed: what it committed
    before stays, and nothing it had not answered is acknowledged. Submitted with
    ``submit_alone`` it runs after the transaction of the writes handed over before it."""
    os._exit(status)
