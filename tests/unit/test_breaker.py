"""CircuitBreaker: closed -> open -> half-open -> closed/open, driven by a fake clock."""

from __future__ import annotations

import pytest

from proxy.breaker import CircuitBreaker, CircuitState
from tests.clock import FakeClock

CLOSED, HALF_OPEN, OPEN = CircuitState.CLOSED, CircuitState.HALF_OPEN, CircuitState.OPEN


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def changes() -> list[CircuitState]:
    return []


@pytest.fixture
def breaker(clock: FakeClock, changes: list[CircuitState]) -> CircuitBreaker:
    """Three failures open it for a 30 s cool-down."""
    return CircuitBreaker(3, 30.0, clock=clock, on_change=changes.append)


def trip(breaker: CircuitBreaker) -> None:
    for _ in range(breaker.failure_threshold):
        assert breaker.before_request()
        breaker.record_failure()
    assert breaker.state is OPEN


def test_starts_closed(breaker, changes):
    """A new breaker is closed, lets requests through and has reported nothing."""
    assert breaker.state is CLOSED
    assert all(breaker.before_request() for _ in range(10))
    assert breaker.retry_after() == 0.0
    assert changes == []


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 10])
def test_opens_after_n_consecutive_failures(clock, threshold):
    """The circuit stays closed for N-1 failures and opens on the Nth."""
    breaker = CircuitBreaker(threshold, 30.0, clock=clock)
    for _ in range(threshold - 1):
        assert breaker.before_request()
        breaker.record_failure()
        assert breaker.state is CLOSED
    assert breaker.before_request()
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_at == clock.now
    assert not breaker.before_request()


@pytest.mark.parametrize(
    ("outcomes", "state"),
    [
        ("FFF", OPEN),
        ("FFSFF", CLOSED),
        ("FSFSFSFS", CLOSED),
        ("SSSFFF", OPEN),
        ("FFSFFF", OPEN),
        ("FF", CLOSED),
    ],
)
def test_only_consecutive_failures_count(breaker, outcomes, state):
    """A success resets the failure count, so only failures in a row open the circuit."""
    for outcome in outcomes:
        assert breaker.before_request()
        if outcome == "F":
            breaker.record_failure()
        else:
            breaker.record_success()
    assert breaker.state is state


@pytest.mark.parametrize(
    ("elapsed", "allowed", "retry_after"),
    [
        (0.0, False, 30.0),
        (0.001, False, 29.999),
        (10.0, False, 20.0),
        (29.999, False, 0.001),
        (30.0, True, 0.0),
        (45.0, True, 0.0),
    ],
)
def test_cool_down(breaker, clock, elapsed, allowed, retry_after):
    """An open circuit fails fast until the cool-down has elapsed; retry_after counts down."""
    trip(breaker)
    clock.advance(elapsed)
    assert breaker.retry_after() == pytest.approx(retry_after)
    assert breaker.before_request() is allowed
    assert breaker.state is (HALF_OPEN if allowed else OPEN)


def test_fail_fast_does_not_extend_the_cool_down(breaker, clock):
    """Requests refused during the cool-down do not push the probe further out."""
    trip(breaker)
    for _ in range(29):
        clock.advance(1.0)
        assert not breaker.before_request()
    clock.advance(1.0)
    assert breaker.before_request()


def test_exactly_one_probe_in_half_open(breaker, clock):
    """After the cool-down exactly one request is let through; the others fail fast."""
    trip(breaker)
    clock.advance(30.0)
    results = [breaker.before_request() for _ in range(5)]
    assert results == [True, False, False, False, False]
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_probe_stays_exclusive_as_time_passes(breaker, clock):
    """While the probe is running, later requests fail fast however long it takes."""
    trip(breaker)
    clock.advance(30.0)
    assert breaker.before_request()
    clock.advance(3600.0)
    assert not breaker.before_request()


def test_probe_success_closes(breaker, clock, changes):
    """A successful probe closes the circuit and lets everything through again."""
    trip(breaker)
    clock.advance(30.0)
    assert breaker.before_request()
    breaker.record_success()
    assert breaker.state is CLOSED
    assert breaker.failures == 0
    assert all(breaker.before_request() for _ in range(5))
    assert changes == [OPEN, HALF_OPEN, CLOSED]


def test_after_closing_it_takes_n_failures_again(breaker, clock):
    """Once closed after a probe, the full threshold of failures is needed to reopen."""
    trip(breaker)
    clock.advance(30.0)
    breaker.before_request()
    breaker.record_success()
    breaker.record_failure()
    breaker.record_failure()
    assert breaker.state is CLOSED
    breaker.record_failure()
    assert breaker.state is OPEN


def test_probe_failure_reopens_for_a_new_cool_down(breaker, clock, changes):
    """A failed probe opens the circuit again, counted from the probe's failure."""
    trip(breaker)
    clock.advance(30.0)
    assert breaker.before_request()
    clock.advance(2.0)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.opened_at == clock.now
    assert breaker.retry_after() == 30.0
    clock.advance(29.0)
    assert not breaker.before_request()
    clock.advance(1.0)
    assert breaker.before_request()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN]


def test_release_probe_lets_another_probe_through(breaker, clock, changes):
    """A probe that ends without a verdict frees the slot for the next request."""
    trip(breaker)
    clock.advance(30.0)
    assert breaker.before_request()
    assert not breaker.before_request()
    breaker.release_probe()
    assert breaker.state is HALF_OPEN
    assert breaker.before_request()
    assert not breaker.before_request()
    assert changes == [OPEN, HALF_OPEN]


def test_release_probe_when_closed_changes_nothing(breaker, changes):
    """release_probe() on a closed circuit is harmless."""
    breaker.release_probe()
    assert breaker.state is CLOSED
    assert breaker.before_request()
    assert changes == []


@pytest.mark.parametrize(
    ("script", "expected_changes"),
    [
        ("FFF", [OPEN]),
        ("FFFFFF", [OPEN]),
        ("FFF w P S", [OPEN, HALF_OPEN, CLOSED]),
        ("FFF w P F", [OPEN, HALF_OPEN, OPEN]),
        ("FFF w P F w P S", [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]),
        ("FFF w P R P S", [OPEN, HALF_OPEN, CLOSED]),
        ("S S F S", []),
    ],
)
def test_on_change_reports_each_transition_once(breaker, clock, changes, script, expected_changes):
    """on_change is called once per state change, never for a repeated state.

    Script: F failure, S success, w wait out the cool-down, P probe, R release probe.
    """
    for step in script.replace(" ", ""):
        if step == "F":
            breaker.record_failure()
        elif step == "S":
            breaker.record_success()
        elif step == "w":
            clock.advance(breaker.cooldown)
        elif step == "P":
            assert breaker.before_request()
        elif step == "R":
            breaker.release_probe()
    assert changes == expected_changes


def test_without_on_change(clock):
    """A breaker without a callback goes through all states."""
    breaker = CircuitBreaker(1, 5.0, clock=clock)
    breaker.record_failure()
    clock.advance(5.0)
    assert breaker.before_request()
    breaker.record_success()
    assert breaker.state is CLOSED


def test_zero_cool_down_probes_at_once(clock):
    """With no cool-down the next request after opening is the probe."""
    breaker = CircuitBreaker(1, 0.0, clock=clock)
    breaker.record_failure()
    assert breaker.state is OPEN
    assert breaker.retry_after() == 0.0
    assert breaker.before_request()
    assert breaker.state is HALF_OPEN
    assert not breaker.before_request()


def test_retry_after_is_zero_unless_open(breaker, clock):
    """retry_after() is 0 when closed or half-open, the remaining cool-down when open."""
    assert breaker.retry_after() == 0.0
    trip(breaker)
    clock.advance(12.5)
    assert breaker.retry_after() == 17.5
    clock.advance(100.0)
    assert breaker.retry_after() == 0.0  # still OPEN until a request asks
    assert breaker.state is OPEN
    breaker.before_request()
    assert breaker.state is HALF_OPEN
    assert breaker.retry_after() == 0.0


def test_default_clock_is_monotonic():
    """Without an injected clock the breaker uses time.monotonic and works the same."""
    breaker = CircuitBreaker(1, 3600.0)
    breaker.record_failure()
    assert not breaker.before_request()
    assert 3599.0 < breaker.retry_after() <= 3600.0
