"""The slots of one model and the line of requests waiting for them: a pure state
machine, fed events (a request arrives, one leaves the line, a slot is released, the
limit changes) and returning who gets a slot. No clock and no I/O: ``proxy/queues.py``
drives it with asyncio and times it.

The line is ordered by priority (interactive before background), then by place: the
order of arrival, which a request keeps for each of its upstream calls (a tool loop
waits for its next round's slot ahead of requests that came after it). A request that
finds a free slot and nobody in line takes the slot at once; one that finds the line
full is refused. Invariant: nobody waits while a slot is free.
"""

from __future__ import annotations

import math
from bisect import insort
from dataclasses import dataclass, field
from itertools import count
from typing import Generic, TypeVar

T = TypeVar("T")

INTERACTIVE = 0
BACKGROUND = 1  # background responses, delegations, low-priority keys

# Bounds of the Retry-After of a refusal, in seconds.
RETRY_AFTER_MIN = 1.0
RETRY_AFTER_MAX = 60.0
# Weight of the newest hold time in the running average behind Retry-After.
_HOLD_WEIGHT = 0.2


@dataclass(eq=False, slots=True)
class Waiter(Generic[T]):
    """One request in line; ``payload`` is its waker, for the driver."""

    priority: int
    place: int
    payload: T
    granted: bool = False  # it was given a slot and left the line

    @property
    def rank(self) -> tuple[int, int]:
        return self.priority, self.place


@dataclass(slots=True)
class SlotQueue(Generic[T]):
    """``limit`` slots (None: as many as asked for) and a line of at most ``capacity``."""

    limit: int | None
    capacity: int
    running: int = 0
    line: list[Waiter[T]] = field(default_factory=list)
    # Running average of how long a slot is held (seconds), None before the first release.
    mean_hold: float | None = None
    _places: count[int] = field(default_factory=count)

    def next_place(self) -> int:
        """A place in line for a request that arrives now."""
        return next(self._places)

    @property
    def waiting(self) -> int:
        return len(self.line)

    def _free(self) -> bool:
        return self.limit is None or self.running < self.limit

    def enter(self) -> bool:
        """Take a slot at once if one is free and nobody waits for it."""
        if self.line or not self._free():
            return False
        self.running += 1
        return True

    def has_room(self) -> bool:
        """Whether a request that arrives now would get a slot or a place in line."""
        return (not self.line and self._free()) or len(self.line) < self.capacity

    def wait(self, priority: int, place: int, payload: T) -> Waiter[T]:
        """Join the line (after ``enter`` failed and ``has_room`` said yes)."""
        waiter = Waiter(priority, place, payload)
        insort(self.line, waiter, key=lambda w: w.rank)
        return waiter

    def leave(self, waiter: Waiter[T]) -> bool:
        """A waiter gone (its client left, its time ran out): out of the line. False when
        it was no longer in line (it had been given a slot)."""
        if waiter.granted:
            return False
        self.line.remove(waiter)
        return True

    def release(self, held: float | None = None) -> list[Waiter[T]]:
        """A slot given back after ``held`` seconds (None: never used, handed on);
        returns the waiters who get a slot now."""
        self.running -= 1
        if held is not None:
            mean = self.mean_hold
            self.mean_hold = held if mean is None else mean + _HOLD_WEIGHT * (held - mean)
        return self._grant()

    def set_limit(self, limit: int | None) -> list[Waiter[T]]:
        """A new limit (the upstream said another number); returns the waiters who get a
        slot now. A lower limit takes no slot away: it is felt as slots are released."""
        self.limit = limit
        return self._grant()

    def _grant(self) -> list[Waiter[T]]:
        granted: list[Waiter[T]] = []
        while self.line and self._free():
            waiter = self.line.pop(0)
            waiter.granted = True
            self.running += 1
            granted.append(waiter)
        return granted

    def retry_after(self) -> float:
        """Seconds a refused request should wait before it tries again: the slots turn
        over once per average hold time, and the line ahead of it needs that many
        turns; at least 1, at most 60."""
        if self.mean_hold is None or not self.limit:
            return RETRY_AFTER_MIN
        turns = math.ceil((len(self.line) + 1) / self.limit)
        return min(RETRY_AFTER_MAX, max(RETRY_AFTER_MIN, turns * self.mean_hold))
