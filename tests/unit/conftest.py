"""Fixtures of the storage unit tests (a module's own fixture of the same name wins)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from storage.sqlite import SQLiteStore
from tests.clock import FakeClock
from tests.unit.storage_support import NOW


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(NOW)


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[SQLiteStore]:
    store = await SQLiteStore.open(tmp_path / "lmbridge.db", clock=clock)
    yield store
    await store.close()
