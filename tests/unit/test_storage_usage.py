"""Usage records in SQLite: inserted in batches, summed per group with nearest-rank
percentiles, scoped to an owner, purged by age, and the day totals the quotas start from."""

from __future__ import annotations

from pathlib import Path

from storage.records import UsageRecord
from storage.sqlite import SQLiteStore
from tests.unit.storage_support import NOW

DAY = 86400


def record(**fields: object) -> UsageRecord:
    values: dict[str, object] = {
        "ts": float(NOW),
        "owner": "alice",
        "model": "m1",
        "upstream": "default",
        "api": "chat",
        "outcome": "ok",
        "status": 200,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "duration_ms": 100.0,
    }
    values.update(fields)
    return UsageRecord(**values)  # type: ignore[arg-type]


async def test_records_are_summed_per_model(store: SQLiteStore) -> None:
    """Tokens, requests, errors and cancellations add up per model."""
    await store.record_usage(
        [
            record(cached_tokens=4, reasoning_tokens=2),
            record(model="m2", prompt_tokens=7),
            record(outcome="error", status=502, error_code="upstream_error", prompt_tokens=0),
            record(outcome="cancelled", status=499),
        ]
    )
    groups = await store.usage_report("model", NOW - 1, NOW + 1, None)
    assert [g.group for g in groups] == ["m1", "m2"]
    m1 = groups[0]
    assert (m1.requests, m1.errors, m1.cancelled) == (3, 1, 1)
    assert (m1.prompt_tokens, m1.cached_tokens, m1.completion_tokens, m1.reasoning_tokens) == (
        20,
        4,
        15,
        2,
    )


async def test_percentiles_are_nearest_rank(store: SQLiteStore) -> None:
    """p50 and p95 are values of the group (nearest rank), ttft over the rows with one."""
    await store.record_usage(
        [
            record(duration_ms=float(ms), ttft_ms=float(ms) / 10 if ms <= 30 else None)
            for ms in range(1, 101)
        ]
    )
    [group] = await store.usage_report("key", NOW - 1, NOW + 1, None)
    assert (group.p50_ms, group.p95_ms) == (50.0, 95.0)
    assert group.ttft_p50_ms == 1.5  # ranks 1..30: the 15th
    await store.record_usage([record(owner="bob", duration_ms=7.0)])
    bob = [g for g in await store.usage_report("key", NOW - 1, NOW + 1, None) if g.group == "bob"]
    assert (bob[0].p50_ms, bob[0].p95_ms, bob[0].ttft_p50_ms) == (7.0, 7.0, None)


async def test_window_owner_and_day_grouping(store: SQLiteStore) -> None:
    """``since`` is inclusive, ``until`` exclusive; an owner sees only its own; days are UTC."""
    await store.record_usage(
        [
            record(ts=NOW - DAY),
            record(ts=NOW),
            record(ts=NOW + 10, owner="bob"),
        ]
    )
    days = await store.usage_report("day", 0, NOW + DAY, None)
    assert [(g.group, g.requests) for g in days] == [("2023-11-13", 1), ("2023-11-14", 2)]
    mine = await store.usage_report("upstream", NOW, NOW + 10, "alice")
    assert [(g.group, g.requests) for g in mine] == [("default", 1)]
    assert await store.usage_report("model", NOW + 11, NOW + 20, None) == []


async def test_purge_and_day_totals(store: SQLiteStore) -> None:
    """Records older than the cut are deleted; tokens since a time are summed per owner."""
    await store.record_usage([record(ts=NOW - 2 * DAY), record(ts=NOW), record(ts=NOW + 1)])
    assert await store.tokens_since(NOW) == {"alice": 30}
    assert await store.purge_usage(NOW - DAY) == 1
    assert await store.tokens_since(0) == {"alice": 30}


async def test_records_survive_a_reopen(tmp_path: Path) -> None:
    """What was acknowledged is in the file for the next daemon."""
    path = tmp_path / "usage.db"
    store = await SQLiteStore.open(path)
    await store.record_usage([record()])
    await store.close()
    again = await SQLiteStore.open(path)
    try:
        assert await again.tokens_since(0) == {"alice": 15}
    finally:
        await again.close()
