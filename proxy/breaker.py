"""Circuit breaker for one upstream: a small state machine with an injectable clock.

closed --(N consecutive failures)--> open --(cool-down elapsed)--> half-open
half-open lets exactly one probe through: its success closes the circuit, its
failure opens it again for another cool-down. No I/O here; the upstream client
asks ``before_request()`` and reports ``record_success()`` / ``record_failure()``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum


class CircuitState(Enum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(
        self,
        failure_threshold: int,
        cooldown: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.failure_threshold = failure_threshold
        self.cooldown = cooldown
        self.clock = clock
        self._on_change = on_change
        self.state = CircuitState.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._probe_in_flight = False

    def before_request(self) -> bool:
        """True if a request may go upstream now; False means fail fast."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN:
            if self.clock() - self.opened_at < self.cooldown:
                return False
            self._set(CircuitState.HALF_OPEN)
        if self._probe_in_flight:
            return False
        self._probe_in_flight = True
        return True

    def record_success(self) -> None:
        self.failures = 0
        self._probe_in_flight = False
        if self.state is not CircuitState.CLOSED:
            self._set(CircuitState.CLOSED)

    def record_failure(self) -> None:
        self.failures += 1
        self._probe_in_flight = False
        if self.state is CircuitState.HALF_OPEN or self.failures >= self.failure_threshold:
            self.opened_at = self.clock()
            if self.state is not CircuitState.OPEN:
                self._set(CircuitState.OPEN)

    def release_probe(self) -> None:
        """The probe ended without a verdict (e.g. the client went away): let another try."""
        self._probe_in_flight = False

    def retry_after(self) -> float:
        """Seconds until an open circuit lets a probe through."""
        if self.state is not CircuitState.OPEN:
            return 0.0
        return max(0.0, self.cooldown - (self.clock() - self.opened_at))

    def _set(self, state: CircuitState) -> None:
        self.state = state
        if self._on_change is not None:
            self._on_change(state)
