"""Which CPUs the bench's processes run on.

A proxied round keeps three processes busy: the load generator, lmbridge and the fake
upstream. On a machine with two cores the kernel decides which two of them share a
core, and that decided the result: sampled every 5 ms during identical rounds,
lmbridge had a core to itself 32% of the time in a round at 5,132 requests/s and 88%
of the time in one at 6,521; whole runs of the same code gave 29% to 42% of direct.

So, on Linux with at least two CPUs, each side of a throughput round gets every CPU
in the layout that suits it: a direct round lets the load generator and the upstream
use all CPUs; a proxied round gives lmbridge the first CPU alone and the load
generator, the upstream and lmbridge's writer process the others. That is the layout
the kernel finds by itself when it has cores to spare. Latency at concurrency 1 keeps
no core busy: every process may use every CPU then (moving processes between single
requests would time the move). ``--no-pin`` leaves placement to the kernel.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable
from pathlib import Path


def _threads(pid: int) -> list[int]:
    try:
        return [int(tid) for tid in os.listdir(f"/proc/{pid}/task")]
    except OSError:
        return []


def _pin(pids: Iterable[int], cpus: Collection[int]) -> None:
    for pid in pids:
        for tid in _threads(pid):
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError:  # the thread has just ended
                continue


class Placement:
    def __init__(
        self,
        cpus: list[int],
        daemon_pid: int,
        others: list[int],
        daemon_children: Callable[[int], list[int]],
    ) -> None:
        self.cpus = cpus
        self.daemon_pid = daemon_pid
        self.others = others  # the load generator and the upstream
        self._daemon_children = daemon_children

    @classmethod
    def create(
        cls,
        daemon_pid: int | None,
        others: list[int],
        daemon_children: Callable[[int], list[int]],
    ) -> Placement | None:
        """A placement, or None where CPUs cannot be chosen (not Linux, one CPU)."""
        if daemon_pid is None or not hasattr(os, "sched_setaffinity"):
            return None
        if not Path(f"/proc/{daemon_pid}/task").is_dir():
            return None
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            return None
        return cls(cpus, daemon_pid, others, daemon_children)

    def describe(self) -> str:
        return (
            f"proxied throughput rounds: lmbridge on CPU {self.cpus[0]}, the load generator, "
            f"the upstream and the writer process on CPU {_listed(self.cpus[1:])}; direct "
            f"rounds and latencies: every CPU (--no-pin: the kernel decides)"
        )

    def direct(self) -> None:
        _pin(self.others, self.cpus)

    def free(self) -> None:
        """Every process on every CPU."""
        _pin([self.daemon_pid, *self.others, *self._daemon_children(self.daemon_pid)], self.cpus)

    def proxied(self) -> None:
        _pin([self.daemon_pid], self.cpus[:1])
        _pin([*self.others, *self._daemon_children(self.daemon_pid)], self.cpus[1:])


def _listed(cpus: list[int]) -> str:
    return ", ".join(str(cpu) for cpu in cpus)
