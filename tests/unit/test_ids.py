"""Ids: OpenAI's shape, unique, and filed in creation order."""

from __future__ import annotations

import re
import time

from proxy.ids import new_id


def test_shape_is_a_prefix_and_48_hex_digits() -> None:
    assert re.fullmatch(r"resp_[0-9a-f]{48}", new_id("resp"))
    assert re.fullmatch(r"fc_[0-9a-f]{48}", new_id("fc"))


def test_ids_are_unique_across_blocks_of_randomness() -> None:
    ids = [new_id("msg") for _ in range(10_000)]
    assert len(set(ids)) == len(ids)


def test_ids_sort_in_creation_order() -> None:
    """What keeps SQLite's indexes appending (see proxy/ids.py)."""
    made = []
    for _ in range(20):
        made.append(new_id("resp"))
        time.sleep(0.001)
    assert made == sorted(made)
    now_us = time.time_ns() // 1000
    assert abs(int(made[-1][5:19], 16) - now_us) < 10_000_000
