"""Usage records in SQL: the batch insert and the purge the writer process applies
(like storage/writes.py), and the reads ``SQLiteStore`` runs for the usage report and
for the quotas' day totals.

A record travels to the writer process as a plain tuple (``row``), in the column order
of ``INSERT``: cheaper to pickle than the dataclass, and the writer needs nothing else.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any, Literal

from storage.records import UsageRecord

GroupBy = Literal["key", "model", "upstream", "day"]

# What each grouping means in SQL: chosen from this table, never from client text.
GROUP_COLUMNS: dict[str, str] = {
    "key": "owner",
    "model": "model",
    "upstream": "upstream",
    "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",  # UTC days
}

INSERT = """
INSERT INTO usage_records (ts, owner, model, upstream, api, outcome, error_code, status,
    prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, duration_ms, ttft_ms)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

Row = tuple[Any, ...]


def row(r: UsageRecord) -> Row:
    return (
        r.ts,
        r.owner,
        r.model,
        r.upstream,
        r.api,
        r.outcome,
        r.error_code,
        r.status,
        r.prompt_tokens,
        r.cached_tokens,
        r.completion_tokens,
        r.reasoning_tokens,
        r.duration_ms,
        r.ttft_ms,
    )


def insert_usage(conn: sqlite3.Connection, batches: Sequence[Sequence[Row]]) -> list[int]:
    """Every batch of the group commit in one executemany; how many rows each held."""
    conn.executemany(INSERT, [r for batch in batches for r in batch])
    return [len(batch) for batch in batches]


def purge_usage(conn: sqlite3.Connection, befores: Sequence[float]) -> list[int]:
    return [conn.execute("DELETE FROM usage_records WHERE ts < ?", (b,)).rowcount for b in befores]


# Percentiles by nearest rank (the smallest value with at least p% of the values at or
# below it): rank ceil(p * n), written with integers since SQLite's ceil() is optional.
# One pass: each row is ranked within its group by duration (and, apart, by time to
# first token, for the rows that have one), and the rows at those ranks are picked.
_REPORT = """
WITH picked AS (
    SELECT {group} AS grp, outcome, prompt_tokens, cached_tokens, completion_tokens,
        reasoning_tokens, duration_ms, ttft_ms
    FROM usage_records
    WHERE ts >= :since AND ts < :until AND (:owner IS NULL OR owner = :owner)
), ranked AS (
    SELECT *,
        ROW_NUMBER() OVER (PARTITION BY grp ORDER BY duration_ms) AS d_rank,
        COUNT(*) OVER (PARTITION BY grp) AS d_count,
        ROW_NUMBER() OVER (PARTITION BY grp, ttft_ms IS NULL ORDER BY ttft_ms) AS t_rank,
        COUNT(*) OVER (PARTITION BY grp, ttft_ms IS NULL) AS t_count
    FROM picked
)
SELECT grp, COUNT(*), SUM(outcome = 'error'), SUM(outcome = 'cancelled'),
    SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), SUM(reasoning_tokens),
    MAX(CASE WHEN d_rank = (d_count + 1) / 2 THEN duration_ms END),
    MAX(CASE WHEN d_rank = (95 * d_count + 99) / 100 THEN duration_ms END),
    MAX(CASE WHEN ttft_ms IS NOT NULL AND t_rank = (t_count + 1) / 2 THEN ttft_ms END)
FROM ranked
GROUP BY grp
ORDER BY grp
"""

REPORTS = {name: _REPORT.format(group=column) for name, column in GROUP_COLUMNS.items()}

# Tokens (prompt + completion) per owner since a time: what the quotas start the day with.
TOKENS_SINCE = """
SELECT owner, SUM(prompt_tokens + completion_tokens) FROM usage_records
WHERE ts >= ? GROUP BY owner
"""
