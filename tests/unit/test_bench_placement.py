"""The bench's CPU placement, on real processes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from proxy.bench.placement import Placement

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux and two CPUs",
)


@pytest.fixture
def processes():
    started = [
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) for _ in range(3)
    ]
    yield started
    for process in started:
        process.kill()
        process.wait()


def test_proxied_rounds_give_lmbridge_a_cpu_of_its_own(processes):
    daemon, upstream, writer = processes
    cpus = sorted(os.sched_getaffinity(0))
    placement = Placement.create(daemon.pid, [upstream.pid], lambda pid: [writer.pid])
    assert placement is not None
    placement.proxied()
    assert os.sched_getaffinity(daemon.pid) == {cpus[0]}
    assert os.sched_getaffinity(upstream.pid) == set(cpus[1:])
    assert os.sched_getaffinity(writer.pid) == set(cpus[1:])
    placement.direct()
    assert os.sched_getaffinity(upstream.pid) == set(cpus)
    placement.free()
    assert os.sched_getaffinity(daemon.pid) == set(cpus)
    assert os.sched_getaffinity(writer.pid) == set(cpus)
    assert "CPU" in placement.describe()


def test_no_placement_without_a_daemon_process():
    assert Placement.create(None, [], lambda pid: []) is None
    assert Placement.create(2**22 + 12345, [], lambda pid: []) is None  # no such process
