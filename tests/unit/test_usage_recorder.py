"""The usage recorder on a real SQLite file: records wait in a bounded buffer, a full
buffer or a failed database drops them and counts it, and flush waits for the writes."""

from __future__ import annotations

from pathlib import Path

from proxy.accounting import Metered
from proxy.metrics import Metrics
from proxy.quotas import Quota, QuotaBook
from proxy.usage_recorder import UsageRecorder
from storage.sqlite import SQLiteStore
from tests.clock import FakeClock
from tests.unit.storage_support import NOW


def metered(prompt: int = 3, completion: int = 2) -> Metered:
    note = Metered("chat")
    note.add({"prompt_tokens": prompt, "completion_tokens": completion})
    return note


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_a_full_buffer_drops_and_counts(tmp_path: Path) -> None:
    """Beyond max_pending, records are dropped (counted), never waited for; the quota
    still counts their tokens."""
    store = await SQLiteStore.open(tmp_path / "u.db")
    metrics = Metrics()
    book = QuotaBook({"alice": Quota(tokens_per_day=1000)})
    recorder = UsageRecorder(store, metrics, book, max_pending=2, clock=FakeClock(NOW))
    try:
        for _ in range(3):
            recorder.ended(
                metered(), owner="alice", model="m", status=200, error_code=None, seconds=0.1
            )
        assert recorder.pending == 2
        await recorder.flush()
        assert recorder.pending == 0
        assert await store.tokens_since(0) == {"alice": 10}
        assert book.spent_today("alice", NOW) == 15
        assert sample(metrics, "lmbridge_usage_records_dropped_total", reason="buffer_full") == 1
        assert sample(metrics, "lmbridge_usage_records_written_total") == 2
    finally:
        await store.close()


async def test_a_failed_database_drops_the_batch(tmp_path: Path) -> None:
    """A batch the database refuses is counted as dropped; flush still returns."""
    store = await SQLiteStore.open(tmp_path / "u.db")
    metrics = Metrics()
    recorder = UsageRecorder(store, metrics, QuotaBook({}), clock=FakeClock(NOW))
    await store.close()
    recorder.ended(metered(), owner="", model="m", status=499, error_code=None, seconds=1.0)
    await recorder.flush()
    assert sample(metrics, "lmbridge_usage_records_dropped_total", reason="storage_error") == 1


async def test_disabled_records_nothing(tmp_path: Path) -> None:
    """usage.enabled = false: nothing pending, nothing written."""
    store = await SQLiteStore.open(tmp_path / "u.db")
    try:
        recorder = UsageRecorder(store, Metrics(), QuotaBook({}), enabled=False)
        recorder.ended(metered(), owner="", model="m", status=200, error_code=None, seconds=1)
        await recorder.flush()
        assert recorder.pending == 0 and await store.tokens_since(0) == {}
    finally:
        await store.close()
