"""The slots of a model and their line (proxy/slots.py): a pure state machine, fed
events and tested without a clock or a loop."""

from __future__ import annotations

import pytest

from proxy.slots import BACKGROUND, INTERACTIVE, SlotQueue, Waiter


def line(queue: SlotQueue[str]) -> list[str]:
    return [w.payload for w in queue.line]


def queue_with(limit: int | None, capacity: int = 10) -> SlotQueue[str]:
    return SlotQueue(limit, capacity)


def test_requests_take_free_slots_up_to_the_limit():
    """The first ``limit`` requests enter at once; the next one does not."""
    queue = queue_with(2)
    assert queue.enter() and queue.enter()
    assert not queue.enter()
    assert queue.running == 2


def test_without_a_limit_every_request_enters():
    """limit None: as many slots as asked for."""
    queue = queue_with(None, capacity=0)
    assert all(queue.enter() for _ in range(1000))


def test_a_released_slot_goes_to_the_first_in_line():
    """FIFO within a priority: the earliest place gets the slot released."""
    queue = queue_with(1)
    queue.enter()
    first = queue.wait(INTERACTIVE, queue.next_place(), "first")
    queue.wait(INTERACTIVE, queue.next_place(), "second")
    assert queue.release(1.0) == [first]
    assert first.granted and queue.running == 1
    assert line(queue) == ["second"]


def test_interactive_requests_go_before_background_work():
    """A background request waits behind every interactive one, whenever it came."""
    queue = queue_with(1)
    queue.enter()
    queue.wait(BACKGROUND, queue.next_place(), "background")
    queue.wait(INTERACTIVE, queue.next_place(), "interactive 1")
    queue.wait(INTERACTIVE, queue.next_place(), "interactive 2")
    assert line(queue) == ["interactive 1", "interactive 2", "background"]
    assert [w.payload for w in queue.release()] == ["interactive 1"]


def test_a_request_keeps_its_first_place_for_its_next_call():
    """A tool loop's next round waits at the place of its first call: ahead of requests
    that came after it."""
    queue = queue_with(1)
    loop_place = queue.next_place()
    queue.enter()  # the loop's first round runs
    queue.wait(INTERACTIVE, queue.next_place(), "later request")
    queue.release(1.0)  # round 1 done; the later request runs now
    queue.wait(INTERACTIVE, queue.next_place(), "even later")
    queue.wait(INTERACTIVE, loop_place, "loop, round 2")
    assert line(queue) == ["loop, round 2", "even later"]


def test_nobody_jumps_the_line():
    """A newcomer does not take a slot while others wait for one."""
    queue = queue_with(1)
    queue.enter()
    queue.wait(INTERACTIVE, queue.next_place(), "waiting")
    assert not queue.enter()


@pytest.mark.parametrize(
    ("capacity", "waiting", "room"), [(2, 1, True), (2, 2, False), (0, 0, False)]
)
def test_the_line_holds_capacity_requests(capacity, waiting, room):
    """Beyond ``capacity`` waiting requests, there is no room (the caller refuses)."""
    queue = queue_with(1, capacity)
    queue.enter()
    for _ in range(waiting):
        queue.wait(INTERACTIVE, queue.next_place(), "w")
    assert queue.has_room() is room


def test_a_free_slot_is_room_even_without_a_line():
    """queue_size 0: no line, but a free slot still takes a request."""
    queue = queue_with(1, capacity=0)
    assert queue.has_room()
    queue.enter()
    assert not queue.has_room()


def test_a_waiter_that_leaves_frees_its_place():
    """A waiter gone (client left, timeout) is out of the line; the next gets the slot."""
    queue = queue_with(1)
    queue.enter()
    gone = queue.wait(INTERACTIVE, queue.next_place(), "gone")
    queue.wait(INTERACTIVE, queue.next_place(), "next")
    assert queue.leave(gone)
    assert [w.payload for w in queue.release()] == ["next"]


def test_a_waiter_already_given_a_slot_cannot_leave_the_line():
    """leave() says False for a waiter that got a slot: it holds one and must release it."""
    queue = queue_with(1)
    queue.enter()
    waiter = queue.wait(INTERACTIVE, queue.next_place(), "w")
    queue.release()
    assert not queue.leave(waiter)
    assert queue.running == 1


def test_a_higher_limit_lets_waiters_in_and_a_lower_one_takes_nothing_away():
    """The upstream reports another parallelism: more slots wake waiters at once; fewer
    are felt as slots are released."""
    queue = queue_with(1)
    queue.enter()
    waiters = [queue.wait(INTERACTIVE, queue.next_place(), str(i)) for i in range(3)]
    assert queue.set_limit(3) == waiters[:2]
    assert queue.running == 3
    assert queue.set_limit(1) == []
    assert queue.running == 3
    assert queue.release() == [] and queue.release() == []
    assert queue.release() == [waiters[2]]
    assert queue.set_limit(None) == [] and queue.running == 1


def test_retry_after_follows_how_long_slots_are_held():
    """Retry-After: the turns of the slots the line ahead needs, each an average hold
    time; 1 s before anything was measured, never above 60 s."""
    queue = queue_with(2)
    assert queue.retry_after() == 1.0
    queue.enter()
    queue.enter()
    queue.release(4.0)
    queue.enter()
    assert queue.retry_after() == 4.0  # one turn
    for i in range(3):
        queue.wait(INTERACTIVE, queue.next_place(), str(i))
    assert queue.retry_after() == 8.0  # 4 ahead of a newcomer: two turns of 2 slots
    queue.mean_hold = 100.0
    assert queue.retry_after() == 60.0
    queue.mean_hold = 0.01
    assert queue.retry_after() == 1.0


def test_the_mean_hold_time_weighs_recent_releases():
    """The average moves a fifth of the way to each new hold time."""
    queue = queue_with(1)
    queue.enter()
    queue.release(10.0)
    queue.enter()
    queue.release(0.0)
    assert queue.mean_hold == pytest.approx(8.0)
    queue.enter()
    queue.release(None)  # handed on, never used: not measured
    assert queue.mean_hold == pytest.approx(8.0)


def test_waiters_are_compared_by_identity():
    """Two waiters with the same rank are still two (leave removes the right one)."""
    queue = queue_with(1)
    queue.enter()
    a = queue.wait(INTERACTIVE, 5, "a")
    b = queue.wait(INTERACTIVE, 5, "b")
    assert isinstance(a, Waiter) and a != b
    queue.leave(b)
    assert line(queue) == ["a"]
