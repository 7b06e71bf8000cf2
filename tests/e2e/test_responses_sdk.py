"""The Responses API of the daemon (a separate process), driven by the official openai SDK
and the OpenAI Agents SDK, against the scripted fake upstream."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import openai
import pytest
from pydantic import BaseModel

from proxy.bench.processes import writer_processes
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk, text_stream

pytestmark = pytest.mark.e2e


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    body = chat_completion()
    message = body["choices"][0]["message"]
    message["content"] = None
    message["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


@pytest.fixture
async def daemon(start_daemon, fake_upstream):
    return await start_daemon("--upstream", fake_upstream.url)


@pytest.fixture
async def client(daemon):
    async with openai.AsyncOpenAI(
        base_url=daemon.base_url, api_key="unused", max_retries=0
    ) as client:
        yield client


def sent(fake_upstream, n: int = -1) -> list[dict]:
    return fake_upstream.requests_to(CHAT)[n].body["messages"]


async def test_create_retrieve_delete(client):
    """create, retrieve (same object), input_items, delete, then 404."""
    response = await client.responses.create(model="test-model", input="Hi")
    assert response.output_text == "Hello!"
    again = await client.responses.retrieve(response.id)
    assert again.model_dump() == response.model_dump()
    items = await client.responses.input_items.list(response.id)
    assert [i.content[0].text for i in items.data] == ["Hi"]
    deleted = await client.responses.delete(response.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_three_turn_chain(client, fake_upstream):
    """Three turns chained by previous_response_id: the upstream receives the whole chain."""
    for text in ("A.", "B.", "C."):
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(text)))
    first = await client.responses.create(model="test-model", input="one")
    second = await client.responses.create(
        model="test-model", input="two", previous_response_id=first.id
    )
    third = await client.responses.create(
        model="test-model", input="three", previous_response_id=second.id
    )
    assert third.output_text == "C."
    assert sent(fake_upstream) == [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "B."},
        {"role": "user", "content": "three"},
    ]


async def test_store_false(client):
    """store=False answers but keeps nothing."""
    response = await client.responses.create(model="test-model", input="x", store=False)
    assert response.output_text == "Hello!"
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_function_tool_round_trip(client, fake_upstream):
    """call -> function_call_output -> answer, chained."""
    tools = [
        {
            "type": "function",
            "name": "add",
            "description": "Add two numbers",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        }
    ]
    fake_upstream.add_reply(CHAT, Reply(json=tool_call("call_1", "add", '{"a": 2, "b": 3}')))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2 + 3 = 5")))
    first = await client.responses.create(model="test-model", input="2+3?", tools=tools)
    call = first.output[0]
    assert call.type == "function_call" and call.name == "add"
    result = json.loads(call.arguments)
    second = await client.responses.create(
        model="test-model",
        tools=tools,
        previous_response_id=first.id,
        input=[
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": str(result["a"] + result["b"]),
            }
        ],
    )
    assert second.output_text == "2 + 3 = 5"
    assert sent(fake_upstream)[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}


class Answer(BaseModel):
    city: str
    population: int


async def test_parse_with_a_pydantic_schema(client, fake_upstream):
    """responses.parse sends a json_schema format and parses the answer."""
    fake_upstream.add_reply(
        CHAT, Reply(json=chat_completion('{"city": "Paris", "population": 2100000}'))
    )
    parsed = await client.responses.parse(
        model="test-model", input="Biggest French city?", text_format=Answer
    )
    assert parsed.output_parsed == Answer(city="Paris", population=2100000)
    sent_format = fake_upstream.requests_to(CHAT)[-1].body["response_format"]
    assert sent_format["type"] == "json_schema"
    assert sent_format["json_schema"]["name"] == "Answer"


async def test_stream_helper_and_final_response(client, fake_upstream):
    """client.responses.stream(...) yields text deltas and get_final_response() works."""
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("Hel", "lo", " there", usage=True)))
    deltas = []
    async with client.responses.stream(model="test-model", input="Hi") as stream:
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert deltas == ["Hel", "lo", " there"]
    assert final.output_text == "Hello there"
    assert final.usage is not None and final.usage.output_tokens == 3
    stored = await client.responses.retrieve(final.id)
    assert stored.output_text == "Hello there"


async def test_conversation(client, fake_upstream):
    """A conversation keeps the turns of responses created in it."""
    conversation = await client.conversations.create(
        items=[{"type": "message", "role": "user", "content": "I like tea."}]
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Noted.")))
    await client.responses.create(
        model="test-model", input="Remember that.", conversation=conversation.id
    )
    await client.responses.create(
        model="test-model", input="What do I like?", conversation=conversation.id
    )
    assert sent(fake_upstream) == [
        {"role": "user", "content": "I like tea."},
        {"role": "user", "content": "Remember that."},
        {"role": "assistant", "content": "Noted."},
        {"role": "user", "content": "What do I like?"},
    ]
    items = await client.conversations.items.list(conversation.id, order="asc")
    assert len(items.data) == 5  # the first item, then input and output of two turns


async def test_background_response_polled(client, fake_upstream):
    """A background response returns queued and is polled to completion."""
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("done"), release, chunk(finish="stop")]))
    response = await client.responses.create(model="test-model", input="x", background=True)
    assert response.status in ("queued", "in_progress")
    release.set()
    for _ in range(200):
        response = await client.responses.retrieve(response.id)
        if response.status not in ("queued", "in_progress"):
            break
        await asyncio.sleep(0.02)
    assert response.status == "completed"
    assert response.output_text == "done"


def writers_of(pid: int) -> list[int]:
    if not Path("/proc").exists():
        pytest.skip("needs Linux's /proc")
    return writer_processes(pid)


def exited(pid: int) -> bool:
    """Gone, or a zombie waiting for init to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


async def wait_exited(pid: int, within: float = 10.0) -> None:
    for _ in range(int(within / 0.05)):
        if exited(pid):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"process {pid} still runs")


async def test_kill_9_and_restart_keeps_every_acknowledged_response(
    start_daemon, fake_upstream, tmp_path
):
    """Every response acknowledged before kill -9 is readable after a restart; a background
    response that was running is failed, not left in progress for ever."""
    db = tmp_path / "kept.db"
    daemon = await start_daemon("--upstream", fake_upstream.url, "--db", str(db))
    ids = []
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        for i in range(20):
            ids.append((await c.responses.create(model="test-model", input=f"m{i}")).id)
        fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a")], stall=True))
        running = await c.responses.create(model="test-model", input="long", background=True)
        for _ in range(100):
            if len(fake_upstream.requests_to(CHAT)) > 20:
                break
            await asyncio.sleep(0.01)
    writers = writers_of(daemon.process.pid)
    assert writers
    daemon.process.send_signal(signal.SIGKILL)
    await daemon.process.wait()
    # Its writer process sees the end of its input, commits what it had, and exits.
    for pid in writers:
        await wait_exited(pid)

    restarted = await start_daemon("--upstream", fake_upstream.url, "--db", str(db))
    async with openai.AsyncOpenAI(base_url=restarted.base_url, api_key="x", max_retries=0) as c:
        for response_id in ids:
            assert (await c.responses.retrieve(response_id)).output_text == "Hello!"
        failed = await c.responses.retrieve(running.id)
        assert failed.status == "failed"
        assert failed.error is not None and "restarted" in failed.error.message


async def test_openai_agents_sdk_two_turns_with_a_tool(daemon, fake_upstream):
    """An OpenAI Agents SDK agent with a function tool, two turns chained by
    previous_response_id: the second turn's upstream request carries the whole history."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    calls = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """Weather for a city."""
        calls.append(city)
        return f"Sunny in {city}"

    fake_upstream.add_reply(
        CHAT, Reply(json=tool_call("call_w", "get_weather", '{"city": "Oslo"}'))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is sunny in Oslo.")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("You asked about Oslo.")))
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        model = agents.OpenAIResponsesModel(model="test-model", openai_client=c)
        agent = agents.Agent(
            name="weather", instructions="Use tools.", model=model, tools=[get_weather]
        )
        first = await agents.Runner.run(agent, "Weather in Oslo?")
        assert first.final_output == "It is sunny in Oslo."
        assert calls == ["Oslo"]
        second = await agents.Runner.run(
            agent, "Which city did I ask about?", previous_response_id=first.last_response_id
        )
        assert second.final_output == "You asked about Oslo."
    history = sent(fake_upstream)
    assert history[0] == {"role": "system", "content": "Use tools."}
    assert history[1] == {"role": "user", "content": "Weather in Oslo?"}
    assert history[2]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert history[3] == {"role": "tool", "tool_call_id": "call_w", "content": "Sunny in Oslo"}
    assert history[4] == {"role": "assistant", "content": "It is sunny in Oslo."}
    assert history[5] == {"role": "user", "content": "Which city did I ask about?"}


async def test_sigterm_to_every_process_of_the_service_keeps_the_response_in_flight(
    start_daemon, fake_upstream, tmp_path
):
    """systemd stops a unit by sending SIGTERM to all of its processes: the writer process
    keeps committing while the daemon drains, so a response streaming at that moment is
    stored complete; then both exit."""
    db = tmp_path / "drain.db"
    daemon = await start_daemon("--upstream", fake_upstream.url, "--db", str(db))
    [writer] = writers_of(daemon.process.pid)
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("one"), 0.5, chunk(" two"), chunk(finish="stop")])
    )
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        stream = await c.responses.create(model="test-model", input="hi", stream=True)
        response_id = None
        async for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.output_text.delta" and event.delta == "one":
                for pid in (daemon.process.pid, writer):
                    os.kill(pid, signal.SIGTERM)
        assert event.type == "response.completed"
    assert await daemon.stop() == 0
    await wait_exited(writer)

    restarted = await start_daemon("--upstream", fake_upstream.url, "--db", str(db))
    async with openai.AsyncOpenAI(base_url=restarted.base_url, api_key="x", max_retries=0) as c:
        kept = await c.responses.retrieve(response_id)
    assert kept.status == "completed"
    assert kept.output_text == "one two"
