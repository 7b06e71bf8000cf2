"""The soak script users run (tests/soak.py) works: a few seconds of mixed load with the
writer process and then the daemon killed, nothing acknowledged lost."""

from __future__ import annotations

import pytest

from tests import soak
from tests.e2e.conftest import lmbridge

pytestmark = pytest.mark.e2e


async def test_a_short_soak_with_faults_loses_nothing():
    """Mixed requests at concurrency 16 for 3 s, the writer killed every second and the
    daemon killed at the end: every acknowledged id is readable and continuable."""
    args = soak.build_parser().parse_args(
        [
            "--duration",
            "3",
            "--concurrency",
            "16",
            "--kill-writer-every",
            "1",
            "--kill-daemon",
            "--sample",
            "50",
            "--lmbridge",
            lmbridge(),
        ]
    )
    report = await soak.soak(args)
    assert report["failures"] == []
    assert report["writer_kills"] >= 1
    verified = report["verify"]
    assert verified["acknowledged"] > 100
    assert verified["missing"] == 0
    assert verified["continuations_ok"] == verified["continuations_tried"] == 50
