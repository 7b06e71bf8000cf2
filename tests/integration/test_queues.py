"""Per-model concurrency and queues through the daemon, against the scripted fake
upstream: the limit honoured exactly, 429 model_busy and 504 queue_timeout, priorities,
a client gone from the queue, streams and tool loops holding their slot only while the
model runs, and the limit taken from what the upstream reports."""

from __future__ import annotations

import asyncio
import io
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.app import create_app
from proxy.keys import METRICS
from proxy.logs import RequestLog
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk, text_stream
from tests.integration.test_mcp_chat import tool_calls
from tests.integration.test_responses import R, create, sse_events
from tests.integration.test_responses_websocket import turn

CALC = str(Path(__file__).resolve().parents[1] / "mcp_servers" / "calc.py")
MODEL = "test-model"


def ask(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def until(condition: Callable[[], Any], what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def gauge(proxy: Any, name: str) -> float | None:
    return proxy.server.app[METRICS].registry.get_sample_value(name, {"model": MODEL})


def queued(proxy: Any) -> float | None:
    return gauge(proxy, "lmbridge_model_requests_queued")


def contents(fake_upstream: Any) -> list[str]:
    """The last user message of each chat request the upstream received, in order."""
    return [s.body["messages"][-1]["content"] for s in fake_upstream.requests_to(CHAT)]


def held(fake_upstream: Any) -> asyncio.Event:
    """The next chat reply waits for the returned event before it answers."""
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(hold=release))
    return release


async def test_the_limit_is_honoured_exactly(make_proxy, fake_upstream):
    """With max_concurrent 2, two requests reach the upstream and the third waits in the
    queue until one of them has its answer."""
    proxy = await make_proxy(models__max_concurrent=2)
    first, second = held(fake_upstream), held(fake_upstream)
    calls = [asyncio.create_task(proxy.post(CHAT, json=ask(f"q{i}"))) for i in range(2)]
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 2, "two at the upstream")
    third = asyncio.create_task(proxy.post(CHAT, json=ask("q2")))
    await until(lambda: queued(proxy) == 1, "the third queued")
    assert len(fake_upstream.requests_to(CHAT)) == 2
    assert gauge(proxy, "lmbridge_model_requests_running") == 2
    first.set()
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 3, "the third upstream")
    second.set()
    for call in [*calls, third]:
        assert (await call).status == 200
    assert gauge(proxy, "lmbridge_model_requests_running") == 0


async def test_a_full_queue_answers_429_model_busy_with_retry_after(make_proxy, fake_upstream):
    """One running, queue_size waiting: one more gets 429 model_busy in the OpenAI shape,
    with Retry-After, at once, without reaching the upstream."""
    proxy = await make_proxy(models__max_concurrent=1, models__queue_size=1)
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask("running")))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    waiting = asyncio.create_task(proxy.post(CHAT, json=ask("waiting")))
    await until(lambda: queued(proxy) == 1, "the second queued")
    refused = await proxy.post(CHAT, json=ask("refused", stream=True))
    assert refused.status == 429
    assert int(refused.headers["Retry-After"]) >= 1
    error = (await refused.json())["error"]
    assert error["code"] == "model_busy" and error["type"] == "rate_limit_error"
    assert MODEL in error["message"] and "models.queue_size" in error["message"]
    release.set()
    assert (await running).status == 200 and (await waiting).status == 200
    assert contents(fake_upstream) == ["running", "waiting"]
    refusals = proxy.server.app[METRICS].registry.get_sample_value(
        "lmbridge_model_queue_refused_total", {"model": MODEL}
    )
    assert refusals == 1


async def test_a_wait_beyond_queue_timeout_is_504_and_logged(
    aiohttp_client, make_config, fake_upstream
):
    """A request that gets no slot within queue_timeout gets 504 queue_timeout; its log
    line says how long it waited (queued_ms), and the one that did not wait has none."""
    stream = io.StringIO()
    request_log = RequestLog("json", stream)
    config = make_config(models__max_concurrent=1, models__queue_timeout="50ms")
    proxy = await aiohttp_client(create_app(config, request_log=request_log))
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask()))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    late = await proxy.post(CHAT, json=ask(), headers={"X-Request-ID": "late"})
    assert late.status == 504
    error = (await late.json())["error"]
    assert error["code"] == "queue_timeout" and "models.queue_timeout" in error["message"]
    release.set()
    assert (await running).status == 200
    request_log.flush()
    entries = map(json.loads, stream.getvalue().splitlines())
    lines = {line["request_id"]: line for line in entries}
    assert lines["late"]["status"] == 504 and lines["late"]["queued_ms"] >= 50
    assert next(line for line in lines.values() if "queued_ms" not in line)["status"] == 200


async def test_a_stream_holds_its_slot_until_it_ends(make_proxy, fake_upstream):
    """A streamed answer keeps the model's slot while it streams: the next request waits
    until the stream's last event, then runs."""
    proxy = await make_proxy(models__max_concurrent=1)
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("first", role="assistant"), release, chunk(finish="stop")])
    )
    resp = await proxy.post(CHAT, json=ask("streamed", stream=True))
    assert b'"first"' in await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    other = asyncio.create_task(proxy.post(CHAT, json=ask("next")))
    await until(lambda: queued(proxy) == 1, "the next request queued")
    assert contents(fake_upstream) == ["streamed"]
    release.set()
    assert (await resp.read()).endswith(b"data: [DONE]\n\n")
    assert (await other).status == 200
    assert contents(fake_upstream) == ["streamed", "next"]


async def test_background_responses_wait_behind_interactive_requests(make_proxy, fake_upstream):
    """A background response queued first still runs after an interactive request that
    came later."""
    proxy = await make_proxy(models__max_concurrent=1)
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask("running")))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    background = await create(proxy, input="background work", background=True)
    assert background["status"] == "queued"
    await until(lambda: queued(proxy) == 1, "the background response queued")
    # Waiting for a slot of its model, it is still queued, not in progress.
    polled = await (await proxy.get(f"{R}/{background['id']}")).json()
    assert polled["status"] == "queued"
    interactive = asyncio.create_task(proxy.post(CHAT, json=ask("interactive")))
    await until(lambda: queued(proxy) == 2, "the interactive request queued")
    release.set()
    assert (await running).status == 200 and (await interactive).status == 200
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 3, "the background upstream")
    assert contents(fake_upstream) == ["running", "interactive", "background work"]
    events = sse_events(await (await proxy.get(f"{R}/{background['id']}?stream=true")).read())
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert kinds[-1] == "response.completed"


async def test_requests_of_a_low_priority_key_wait_behind_the_others(make_proxy, fake_upstream):
    """auth.low_priority_keys: that key's requests go after other keys' in the queue."""
    proxy = await make_proxy(
        models__max_concurrent=1,
        auth__api_keys=["sk-me", "sk-batch"],
        auth__low_priority_keys=["sk-batch"],
    )

    def post(key: str, content: str) -> asyncio.Task[Any]:
        headers = {"Authorization": f"Bearer {key}"}
        return asyncio.create_task(proxy.post(CHAT, json=ask(content), headers=headers))

    release = held(fake_upstream)
    calls = [post("sk-me", "running")]
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    calls.append(post("sk-batch", "batch"))
    await until(lambda: queued(proxy) == 1, "the batch request queued")
    calls.append(post("sk-me", "mine"))
    await until(lambda: queued(proxy) == 2, "mine queued")
    release.set()
    assert [(await call).status for call in calls] == [200, 200, 200]
    assert contents(fake_upstream) == ["running", "mine", "batch"]


async def test_a_client_gone_from_the_queue_frees_its_place(serve, fake_upstream):
    """A client that disconnects while it waits leaves the queue at once: the place goes
    to the next request, which runs when the slot is free (the daemon's own listener,
    which cancels the handler of a closed connection)."""
    port = await serve(models__max_concurrent=1, models__queue_size=1)
    url = f"http://127.0.0.1:{port}"
    gauge_line = f'lmbridge_model_requests_queued{{model="{MODEL}"}} '

    async def until_queued(session: aiohttp.ClientSession, count: int) -> None:
        for _ in range(1000):
            async with session.get(f"{url}/metrics") as resp:
                if gauge_line + f"{count:.1f}" in (await resp.text()).splitlines():
                    return
        raise AssertionError(f"never {count} queued")

    release = held(fake_upstream)
    async with aiohttp.ClientSession() as session, aiohttp.ClientSession() as leaving:
        running = asyncio.create_task(session.post(f"{url}{CHAT}", json=ask("running")))
        await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
        gone = asyncio.create_task(leaving.post(f"{url}{CHAT}", json=ask("gone")))
        await until_queued(session, 1)
        gone.cancel()
        await leaving.close()  # the connection closes: the daemon cancels its handler
        await until_queued(session, 0)
        next_one = asyncio.create_task(session.post(f"{url}{CHAT}", json=ask("next")))
        await until_queued(session, 1)  # its place, not a 429
        release.set()
        assert (await running).status == 200
        assert (await next_one).status == 200
    assert contents(fake_upstream) == ["running", "next"]


async def test_the_default_limit_is_llama_cpps_total_slots(make_proxy, fake_upstream):
    """Without max_concurrent, a llama.cpp server's /props total_slots is the limit."""
    fake_upstream.llama_props = {"total_slots": 1}
    proxy = await make_proxy()
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask("running")))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    waiting = asyncio.create_task(proxy.post(CHAT, json=ask("waiting")))
    await until(lambda: queued(proxy) == 1, "the second queued")
    assert gauge(proxy, "lmbridge_model_max_concurrent") == 1
    release.set()
    assert (await running).status == 200 and (await waiting).status == 200


async def test_lm_studio_models_run_four_at_once_by_default(make_proxy, fake_upstream):
    """LM Studio's models get its default Max Concurrent Predictions, 4; /readyz shows
    the queue."""
    fake_upstream.lmstudio_v1 = {
        "models": [{"type": "llm", "key": MODEL, "loaded_instances": [{"id": MODEL}]}]
    }
    proxy = await make_proxy()
    assert (await proxy.post(CHAT, json=ask())).status == 200
    ready = await (await proxy.get("/readyz")).json()
    assert ready["model_queues"] == {MODEL: {"running": 0, "queued": 0, "max_concurrent": 4}}


async def test_a_model_without_a_limit_has_no_queue(proxy, fake_upstream):
    """An upstream that says nothing and no max_concurrent: no queue, no queue metrics."""
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert gauge(proxy, "lmbridge_model_requests_running") is None
    assert (await (await proxy.get("/readyz")).json())["model_queues"] == {}


async def test_per_model_tables_set_the_limit(make_proxy, fake_upstream):
    """A [models."PATTERN"] table gives one model its own limit and queue."""
    fake_upstream.models = [MODEL, "other-model"]
    proxy = await make_proxy(**{"models__test-*": {"max_concurrent": 1, "queue_size": 0}})
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask()))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    assert (await proxy.post(CHAT, json=ask())).status == 429  # no queue for it
    other = await proxy.post(CHAT, json={**ask(), "model": "other-model"})
    assert other.status == 200  # another model, no limit
    release.set()
    assert (await running).status == 200


async def test_relayed_routes_naming_a_model_take_a_slot(make_proxy, fake_upstream):
    """/v1/messages (relayed) naming a busy model waits for its slot like the rest."""
    proxy = await make_proxy(models__max_concurrent=1)
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask()))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    message = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}
    fake_upstream.add_reply("/v1/messages", Reply(json={"type": "message", "content": []}))
    relayed = asyncio.create_task(proxy.post("/v1/messages", json=message))
    await until(lambda: queued(proxy) == 1, "the relayed request queued")
    assert not fake_upstream.requests_to("/v1/messages")
    release.set()
    assert (await running).status == 200 and (await relayed).status == 200


async def test_a_streamed_response_finding_the_queue_full_is_a_plain_429(make_proxy, fake_upstream):
    """/v1/responses with stream: a full queue is refused before the stream opens."""
    proxy = await make_proxy(models__max_concurrent=1, models__queue_size=0)
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask()))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    resp = await proxy.post(R, json={"model": MODEL, "input": "x", "stream": True})
    assert resp.status == 429 and resp.headers["Content-Type"].startswith("application/json")
    assert (await resp.json())["error"]["code"] == "model_busy"
    release.set()
    assert (await running).status == 200


async def test_a_response_that_times_out_in_the_queue_is_stored_failed(make_proxy, fake_upstream):
    """A streamed response whose wait ends with queue_timeout fails: response.failed,
    stored with lmbridge's code as the error's type."""
    proxy = await make_proxy(models__max_concurrent=1, models__queue_timeout="50ms")
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask()))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    resp = await proxy.post(R, json={"model": MODEL, "input": "x", "stream": True})
    events = sse_events(await resp.read())
    failed = events[-1]["response"]
    assert events[-1]["type"] == "response.failed"
    assert failed["error"]["code"] == "server_error"
    assert failed["error"]["type"] == "queue_timeout"
    stored = await (await proxy.get(f"{R}/{failed['id']}")).json()
    assert stored["status"] == "failed"
    release.set()
    assert (await running).status == 200


@pytest.fixture
async def loop_proxy(make_proxy):
    return await make_proxy(
        models__max_concurrent=1,
        mcp__servers={"calc": {"command": sys.executable, "args": [CALC]}},
        mcp__default_servers="all",
    )


async def test_a_tool_loop_holds_no_slot_while_its_tool_runs(serve, fake_upstream):
    """While a chat tool loop's MCP tool runs, the model's one slot serves another
    request; the loop waits for its next round's slot again."""
    port = await serve(
        models__max_concurrent=1,
        mcp__servers={"calc": {"command": sys.executable, "args": [CALC]}},
        mcp__default_servers="all",
    )
    url = f"http://127.0.0.1:{port}{CHAT}"
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("call_1", "calc__slow", '{"seconds": 60}')))
    )
    async with aiohttp.ClientSession() as loop_client, aiohttp.ClientSession() as other:
        looping = asyncio.create_task(loop_client.post(url, json=ask("loop")))
        await until(lambda: fake_upstream.requests_to(CHAT), "the loop's first round")
        async with other.post(url, json=ask("meanwhile")) as resp:
            assert resp.status == 200  # served while the tool sleeps
        assert not looping.done()
        looping.cancel()
    assert contents(fake_upstream) == ["loop", "meanwhile"]


async def test_two_tool_loops_on_one_slot_both_finish(loop_proxy, fake_upstream):
    """Two loops of two rounds each on a model with one slot: no deadlock, each gets its
    answer (a loop never holds a slot while it waits for another)."""
    release = asyncio.Event()
    add = ("call_1", "calc__add", '{"a": 2, "b": 3}')
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(add), hold=release))
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(add)))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("five")), times=2)
    first = asyncio.create_task(loop_proxy.post(CHAT, json=ask("a")))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first round")
    second = asyncio.create_task(loop_proxy.post(CHAT, json=ask("b")))
    await until(lambda: queued(loop_proxy) == 1, "the second loop queued")
    release.set()
    for call in (first, second):
        resp = await call
        assert resp.status == 200
        assert (await resp.json())["choices"][0]["message"]["content"] == "five"
    assert len(fake_upstream.requests_to(CHAT)) == 4


async def test_a_streamed_tool_loop_takes_a_slot_per_round(loop_proxy, fake_upstream):
    """Streamed, each round's stream holds the slot to its end, and gives it back."""
    call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": "calc__add"}}
    args = {"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}
    fake_upstream.add_reply(
        CHAT,
        Reply(
            stream=[
                chunk(role="assistant", content=""),
                chunk(tool_calls=[call]),
                chunk(tool_calls=[args]),
                chunk(finish="tool_calls"),
            ]
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("five")))
    resp = await loop_proxy.post(CHAT, json=ask(stream=True))
    assert b"five" in await resp.read()
    waits = loop_proxy.server.app[METRICS].registry.get_sample_value(
        "lmbridge_model_queue_wait_seconds_count", {"model": MODEL}
    )
    assert waits == 2
    assert gauge(loop_proxy, "lmbridge_model_requests_running") == 0


async def test_websocket_turns_wait_for_a_slot_and_are_refused_when_full(make_proxy, fake_upstream):
    """A WebSocket turn waits in the model's queue like an HTTP request, and a full queue
    is an error envelope with status 429 that leaves the connection open."""
    proxy = await make_proxy(models__max_concurrent=1, models__queue_size=1)
    release = held(fake_upstream)
    running = asyncio.create_task(proxy.post(CHAT, json=ask("running")))
    await until(lambda: fake_upstream.requests_to(CHAT), "the first upstream")
    async with proxy.ws_connect(R) as ws, proxy.ws_connect(R) as refused_ws:
        waiting = asyncio.create_task(turn(ws, input="over the socket"))
        await until(lambda: queued(proxy) == 1, "the turn queued")
        refused = await turn(refused_ws, input="one too many")
        assert refused[-1]["type"] == "error" and refused[-1]["status"] == 429
        assert refused[-1]["error"]["code"] == "model_busy"
        release.set()
        assert (await waiting)[-1]["type"] == "response.completed"
        assert (await turn(refused_ws, input="later"))[-1]["type"] == "response.completed"
    assert (await running).status == 200
    assert contents(fake_upstream) == ["running", "over the socket", "later"]
