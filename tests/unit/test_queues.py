"""Per-model queues (proxy/queues.py): which models get one, waiting with asyncio,
refusals, timeouts, cancellation, and what the metrics see. The clock is the fake one;
no test waits on real time but for the one timeout, which is behaviour, not timing."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from proxy.config import ModelsConfig
from proxy.errors import ModelBusy, QueueTimeout
from proxy.metrics import Metrics
from proxy.model_records import ModelInfo
from proxy.queues import Admission, ModelQueues
from proxy.slots import BACKGROUND, INTERACTIVE
from tests.clock import FakeClock

MODEL = ModelInfo(id="m")


def make_queues(clock: FakeClock | None = None, **settings: Any) -> ModelQueues:
    tables = settings.pop("tables", {})
    config = ModelsConfig.model_validate({**settings, **tables})
    return ModelQueues(config, Metrics(), low_priority={"batch"}, clock=clock or FakeClock())


def sample(queues: ModelQueues, name: str, **labels: str) -> float | None:
    return queues.metrics.registry.get_sample_value(name, labels)


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_model_without_a_limit_has_no_queue():
    """No max_concurrent and nothing reported by the upstream: no queue at all."""
    queues = make_queues()
    assert queues.get(MODEL) is None
    async with queues.admission(MODEL, INTERACTIVE) as _:
        pass
    assert list(queues.states()) == []


@pytest.mark.parametrize(
    ("settings", "parallel", "limit"),
    [
        ({}, 4, 4),  # LM Studio's default, llama.cpp's total_slots
        ({"max_concurrent": 2}, None, 2),
        ({"max_concurrent": 2}, 4, 2),  # configured wins over the upstream's
        ({"max_concurrent": 2, "tables": {"m": {"max_concurrent": 1}}}, 4, 1),
        ({"tables": {"other": {"max_concurrent": 1}}}, None, None),
    ],
)
async def test_the_limit_is_the_configured_one_else_the_upstreams(settings, parallel, limit):
    """max_concurrent of the model's tables, else of [models], else the upstream's."""
    queue = make_queues(**settings).get(ModelInfo(id="m", parallel=parallel))
    assert (queue.slots.limit if queue else None) == limit


async def test_the_limit_follows_what_the_upstream_reports():
    """A model list that reports another parallelism changes the queue's limit."""
    queues = make_queues()
    queue = queues.get(ModelInfo(id="m", parallel=1))
    assert queue is not None
    assert queues.get(ModelInfo(id="m", parallel=3)) is queue
    assert queue.slots.limit == 3
    assert queues.get(ModelInfo(id="m")) is queue
    assert queue.slots.limit is None


async def test_the_n_plus_first_request_waits_for_a_slot():
    """max_concurrent requests run; the next waits until one ends, and its wait is
    counted with the clock."""
    clock = FakeClock()
    queues = make_queues(clock, max_concurrent=2)
    running = [queues.admission(MODEL, INTERACTIVE) for _ in range(2)]
    for admission in running:
        await admission.__aenter__()
    third = queues.admission(MODEL, INTERACTIVE)
    entering = asyncio.create_task(third.__aenter__())
    await settle()
    assert not entering.done()
    assert sample(queues, "lmbridge_model_requests_queued", model="m") == 1
    clock.advance(2.5)
    await running[0].__aexit__(None, None, None)
    await asyncio.wait_for(entering, 5)
    assert third.queued and third.waited == 2.5
    assert not running[1].queued and running[1].waited == 0
    assert sample(queues, "lmbridge_model_requests_running", model="m") == 2
    assert sample(queues, "lmbridge_model_requests_queued", model="m") == 0
    assert sample(queues, "lmbridge_model_max_concurrent", model="m") == 2
    assert sample(queues, "lmbridge_model_queue_wait_seconds_count", model="m") == 3


async def test_a_full_queue_refuses_with_retry_after():
    """Beyond queue_size waiting requests: ModelBusy at once, with Retry-After, counted."""
    queues = make_queues(max_concurrent=1, queue_size=1)
    await queues.admission(MODEL, INTERACTIVE).__aenter__()
    waiting = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    await settle()
    with pytest.raises(ModelBusy) as refused:
        await queues.admission(MODEL, INTERACTIVE).__aenter__()
    assert refused.value.status == 429 and refused.value.code == "model_busy"
    assert refused.value.retry_after is not None and refused.value.retry_after >= 1
    assert "models.queue_size" in refused.value.message
    assert sample(queues, "lmbridge_model_queue_refused_total", model="m") == 1
    with pytest.raises(ModelBusy):
        queues.check_room(MODEL)
    waiting.cancel()


async def test_queue_size_zero_refuses_whatever_finds_no_free_slot():
    """No line: a free slot is taken, anything else is refused."""
    queues = make_queues(max_concurrent=1, queue_size=0)
    queues.check_room(MODEL)
    await queues.admission(MODEL, INTERACTIVE).__aenter__()
    with pytest.raises(ModelBusy):
        await queues.admission(MODEL, INTERACTIVE).__aenter__()


async def test_a_wait_longer_than_queue_timeout_fails():
    """QueueTimeout (504) after queue_timeout in line; the waiter has left the line."""
    queues = make_queues(max_concurrent=1, queue_timeout=0.01)
    await queues.admission(MODEL, INTERACTIVE).__aenter__()
    with pytest.raises(QueueTimeout) as timed_out:
        await queues.admission(MODEL, INTERACTIVE).__aenter__()
    assert timed_out.value.status == 504 and timed_out.value.code == "queue_timeout"
    assert "models.queue_timeout" in timed_out.value.message
    assert sample(queues, "lmbridge_model_queue_timeouts_total", model="m") == 1
    assert sample(queues, "lmbridge_model_requests_queued", model="m") == 0


async def test_a_cancelled_waiter_leaves_the_line_and_the_next_gets_the_slot():
    """A request whose task is cancelled (its client went away) is out of the line at
    once; the slot released later goes to the one behind it."""
    queues = make_queues(max_concurrent=1)
    first = queues.admission(MODEL, INTERACTIVE)
    await first.__aenter__()
    gone = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    behind = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    await settle()
    gone.cancel()
    await settle()
    assert sample(queues, "lmbridge_model_requests_queued", model="m") == 1
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(behind, 5)
    assert gone.cancelled()
    assert sample(queues, "lmbridge_model_requests_running", model="m") == 1


async def test_a_slot_given_to_a_waiter_being_cancelled_is_handed_on():
    """Cancelled in the instant between being given a slot and using it: the slot goes
    to the next in line, never lost."""
    queues = make_queues(max_concurrent=1)
    first = queues.admission(MODEL, INTERACTIVE)
    await first.__aenter__()
    unlucky = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    behind = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    await settle()
    await first.__aexit__(None, None, None)  # the slot goes to unlucky...
    unlucky.cancel()  # ...whose task is cancelled before it runs again
    await asyncio.wait_for(behind, 5)
    assert unlucky.cancelled()
    assert sample(queues, "lmbridge_model_requests_running", model="m") == 1


async def test_background_work_waits_behind_interactive_requests():
    """Released slots go to interactive requests first, then to background ones."""
    queues = make_queues(max_concurrent=1)
    first = queues.admission(MODEL, INTERACTIVE)
    await first.__aenter__()
    order: list[str] = []

    async def run(name: str, priority: int) -> None:
        admission = queues.admission(MODEL, priority)
        async with admission:
            order.append(name)

    tasks = [asyncio.create_task(run("background", BACKGROUND))]
    await settle()
    tasks.append(asyncio.create_task(run("interactive", INTERACTIVE)))
    await settle()
    await first.__aexit__(None, None, None)
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == ["interactive", "background"]


def test_priority_of_background_work_and_low_priority_keys():
    """Background responses and the owners of low-priority keys are background work."""
    queues = make_queues()
    assert queues.priority("someone") == INTERACTIVE
    assert queues.priority("someone", background=True) == BACKGROUND
    assert queues.priority("batch") == BACKGROUND


async def test_an_admission_keeps_its_place_across_its_calls():
    """A second call of the same admission (a tool loop's next round) goes before
    requests that arrived after its first call."""
    queues = make_queues(max_concurrent=1)
    loop = queues.admission(MODEL, INTERACTIVE)
    async with loop:
        later = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
        await settle()
    await asyncio.wait_for(later, 5)  # the later request runs while the loop calls a tool
    last = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    await settle()
    next_round = asyncio.create_task(loop.__aenter__())
    await settle()
    queue = queues.get(MODEL)
    assert queue is not None
    assert [w.place for w in queue.slots.line] == [loop.place, 2]
    last.cancel()
    next_round.cancel()


def test_status_shows_each_queue():
    """/readyz's view: running, queued and the limit of each model with a queue."""
    queues = make_queues(max_concurrent=3)
    queues.get(MODEL)
    assert queues.status() == {"m": {"running": 0, "queued": 0, "max_concurrent": 3}}


def test_an_admission_without_a_queue_waits_for_nothing():
    """Admission(None, ...) is a no-op context: unlimited models."""
    admission = Admission(None, INTERACTIVE)
    assert admission.queue is None and admission.waited == 0 and not admission.queued


async def test_a_slot_released_while_a_cancelled_waiter_has_yet_to_leave_skips_it():
    """Cancelled, then a slot released before its task could leave the line: the slot
    goes past it to the next one."""
    queues = make_queues(max_concurrent=1)
    first = queues.admission(MODEL, INTERACTIVE)
    await first.__aenter__()
    gone = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    behind = asyncio.create_task(queues.admission(MODEL, INTERACTIVE).__aenter__())
    await settle()
    gone.cancel()
    await first.__aexit__(None, None, None)  # before gone's task runs again
    await asyncio.wait_for(behind, 5)
    assert gone.cancelled()
    assert sample(queues, "lmbridge_model_requests_running", model="m") == 1
    assert sample(queues, "lmbridge_model_requests_queued", model="m") == 0
