"""The daemon as a process, driven by the official openai SDK, against the fake upstream."""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import openai
import pytest

from tests.fake_upstream import CHAT, Reply, chat_completion, chunk, text_stream

pytestmark = pytest.mark.e2e


@pytest.fixture
async def daemon(start_daemon, fake_upstream):
    return await start_daemon("--upstream", fake_upstream.url)


@pytest.fixture
async def client(daemon):
    async with openai.AsyncOpenAI(
        base_url=daemon.base_url, api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_models_list(client, fake_upstream):
    """client.models.list() returns the upstream's models."""
    models = await client.models.list()
    assert [m.id for m in models.data] == ["test-model"]


async def test_chat_completion(client, fake_upstream):
    """A chat completion round-trips through the daemon."""
    completion = await client.chat.completions.create(
        model="test-model", messages=[{"role": "user", "content": "hi"}]
    )
    assert completion.choices[0].message.content == "Hello!"
    assert fake_upstream.requests_to(CHAT)[0].body["messages"] == [
        {"role": "user", "content": "hi"}
    ]


async def test_streamed_chat_completion(client, fake_upstream):
    """A streamed chat completion arrives chunk by chunk with its usage."""
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("Hel", "lo", usage=True)))
    stream = await client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    async for event in stream:
        if event.choices:
            text += event.choices[0].delta.content or ""
        if event.usage:
            usage = event.usage
    assert text == "Hello"
    assert usage is not None and usage.completion_tokens == 2


async def test_completions_and_embeddings(client):
    """Legacy completions and embeddings work through the SDK."""
    completion = await client.completions.create(model="test-model", prompt="Hi")
    assert completion.choices[0].text == " there"
    embedding = await client.embeddings.create(model="test-model", input="x")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]


async def test_unknown_model_is_404_model_not_found(client):
    """The SDK raises NotFoundError with code model_not_found, listing the models."""
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.code == "model_not_found"
    assert "test-model" in caught.value.message


async def test_malformed_json_is_400(daemon):
    """Malformed JSON gets 400 in the OpenAI error shape from the real daemon."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            daemon.base_url + "/chat/completions",
            data=b"{oops",
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.status == 400
        body = await resp.json()
    assert body["error"]["type"] == "invalid_request_error"
    assert "not valid JSON" in body["error"]["message"]


async def test_sigterm_lets_a_running_stream_finish(daemon, fake_upstream):
    """On SIGTERM the daemon stops accepting, finishes the stream in flight, then exits 0."""
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("one"), 0.5, chunk("two"), chunk(finish="stop")])
    )
    body = {"model": "test-model", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(daemon.base_url + "/chat/completions", json=body) as resp,
    ):
        first = await resp.content.readuntil(b"\n\n")
        assert b'"one"' in first
        daemon.process.send_signal(signal.SIGTERM)
        # The listener closes once the signal is handled; new connections are refused.
        async with aiohttp.ClientSession() as fresh:
            for _ in range(500):
                try:
                    async with fresh.get(daemon.url + "/healthz"):
                        pass
                except aiohttp.ClientConnectionError:
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the daemon still accepts connections after SIGTERM")
        rest = await resp.read()
    assert b'"two"' in rest and rest.endswith(b"data: [DONE]\n\n")
    assert await daemon.stop() == 0
    assert "shutting down" in daemon.log()


async def test_a_stopped_upstream_fails_fast_with_the_sdk_default_retries(start_daemon):
    """With no model server running, the SDK (its default two retries included) gets the
    502 that says how to start one within seconds, on the first and every later request:
    no circuit_open with a Retry-After for it to wait out."""
    from tests.e2e.conftest import free_port

    daemon = await start_daemon("--upstream", f"http://127.0.0.1:{free_port()}")
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="unused") as client:
        assert client.max_retries == 2
        loop = asyncio.get_running_loop()
        for _ in range(3):
            started = loop.time()
            with pytest.raises(openai.InternalServerError) as caught:
                await client.chat.completions.create(
                    model="any", messages=[{"role": "user", "content": "hi"}]
                )
            elapsed = loop.time() - started
            assert caught.value.status_code == 502
            assert caught.value.code == "upstream_unavailable"
            assert "lms server start" in caught.value.message
            assert "--embedded" in caught.value.message
            # A bound against hanging on a Retry-After, not a timing measurement: the SDK's
            # own backoff for two retries is at most 0.5 s + 1 s (and lmbridge's 0.6 s each).
            assert elapsed < 15, elapsed
    assert "circuit open" not in daemon.log()


async def test_agents_sdk_over_the_websocket(daemon, fake_upstream):
    """The OpenAI Agents SDK's WebSocket transport: its run calls the client's function
    tool and continues on the same connection (the installed daemon)."""
    agents = pytest.importorskip("agents")
    from tests.integration.test_mcp_chat import tool_calls

    agents.set_tracing_disabled(True)
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "add", '{"a": 2, "b": 3}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2 + 3 = 5")))
    added = []

    @agents.function_tool
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        added.append((a, b))
        return a + b

    agent = agents.Agent(name="calc", instructions="Add.", model="test-model", tools=[add])
    async with agents.responses_websocket_session(
        api_key="unused", base_url=daemon.base_url
    ) as session:
        result = await session.run(agent, "What is 2+3?")
    assert added == [(2, 3)]
    assert result.final_output == "2 + 3 = 5"
    second = fake_upstream.requests_to(CHAT)[-1].body["messages"]
    assert second[-1] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    # Both turns went over one socket: the request log has a line for each, none a POST.
    await daemon.stop()
    log = daemon.log()
    assert log.count("method=WEBSOCKET path=/v1/responses") == 2, log
    assert "method=POST path=/v1/responses" not in log
