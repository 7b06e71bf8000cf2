"""A real upstream no one here wrote: llama.cpp's own server (the xllamacpp wheel) with
SmolLM2-135M, started the way ``lmbridge serve --embedded`` starts it."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import anthropic
import openai
import pydantic
import pytest

from proxy.config import EmbeddedConfig
from proxy.embedded import child_argv, find_default_model, has_llamacpp

pytestmark = [
    pytest.mark.real_upstream,
    pytest.mark.e2e,
    pytest.mark.skipif(not has_llamacpp(), reason="needs the 'local' extra (xllamacpp)"),
]


@pytest.fixture(scope="session")
def llama_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama.cpp serving SmolLM2 on 127.0.0.1, shared by the session."""
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    argv = child_argv(EmbeddedConfig(), find_default_model())
    with log.open("wb") as errlog:
        process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errlog
        )
    assert process.stdout is not None and process.stdin is not None
    line = process.stdout.readline()
    try:
        yield json.loads(line)["url"]
    finally:
        process.stdin.close()
        process.wait(timeout=30)
        process.stdout.close()


@pytest.fixture
async def client(start_daemon, llama_url):
    daemon = await start_daemon("--upstream", llama_url)
    async with openai.AsyncOpenAI(
        base_url=daemon.base_url, api_key="unused", max_retries=0
    ) as client:
        yield client


async def test_models_and_chat(client):
    """The daemon lists llama.cpp's model and relays a real completion."""
    models = await client.models.list()
    assert [m.id for m in models.data] == ["smollm2"]
    completion = await client.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
    )
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0


async def test_a_json_schema_answer_from_llama_cpp_is_valid(client):
    """llama.cpp enforces a json_schema with a grammar: through lmbridge the answer parses
    as the schema's object and the header says valid, in one upstream call."""

    class City(pydantic.BaseModel):
        name: str
        population: int

    raw = await client.chat.completions.with_raw_response.parse(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a large city and its population."}],
        response_format=City,
        max_tokens=128,
        temperature=0,
    )
    assert raw.headers["X-LMBridge-Schema"] == "valid"
    parsed = raw.parse().choices[0].message.parsed
    assert isinstance(parsed, City)


async def test_default_model_and_stream_with_usage(client):
    """Without `model` the one loaded model is used; a real stream ends with usage."""
    stream = await client.chat.completions.create(
        model="",
        messages=[{"role": "user", "content": "Count to three."}],
        max_tokens=8,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    async for event in stream:
        if event.choices and event.choices[0].delta.content:
            pieces.append(event.choices[0].delta.content)
        usage = event.usage or usage
    assert pieces
    assert usage is not None and usage.completion_tokens >= 1


async def test_completions_embeddings_and_errors(client):
    """Text completion, embeddings, and an unknown model through the real upstream."""
    completion = await client.completions.create(model="smollm2", prompt="Once upon", max_tokens=4)
    assert completion.choices[0].text
    embedding = await client.embeddings.create(model="smollm2", input="hello")
    assert len(embedding.data[0].embedding) == 576
    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(model="smollm2", messages="not a list")  # type: ignore[arg-type]


CLAUDE_CONFIG = """
[models.aliases]
"claude-sonnet-4-5" = "smollm2"

[auth]
api_keys = ["sk-local"]
"""


async def test_claude_style_messages_reach_llama_cpp(start_daemon, llama_url):
    """Anthropic's Messages API as Claude Code speaks it (its SDK, x-api-key, a Claude
    model name mapped by an alias) goes through the relay to llama.cpp: a plain message,
    a stream event by event, a token count; an unknown model is lmbridge's 404."""
    daemon = await start_daemon("--upstream", llama_url, config=CLAUDE_CONFIG)
    question = [{"role": "user", "content": "Say hello."}]
    async with anthropic.AsyncAnthropic(
        base_url=daemon.url, api_key="sk-local", max_retries=0
    ) as claude:
        # temperature 0: the same few words every run (a sampled reply may be empty).
        message = await claude.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=8,
            messages=question,
            extra_body={"temperature": 0},
        )
        assert message.type == "message" and message.role == "assistant"
        assert message.model == "smollm2"  # llama.cpp answers with its own alias
        assert message.content[0].type == "text" and message.content[0].text
        assert message.usage.output_tokens > 0

        types, pieces = [], []
        stream = await claude.messages.create(
            model="claude-sonnet-4-5",
            max_tokens=8,
            messages=question,
            stream=True,
            extra_body={"temperature": 0},
        )
        async for event in stream:
            types.append(event.type)
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                pieces.append(event.delta.text)
        assert types[0] == "message_start" and types[-1] == "message_stop"
        assert "content_block_delta" in types and "".join(pieces)

        counted = await claude.messages.count_tokens(model="claude-sonnet-4-5", messages=question)
        assert counted.input_tokens > 0

        with pytest.raises(anthropic.NotFoundError) as caught:
            await claude.messages.create(model="claude-opus-9", max_tokens=8, messages=question)
        assert caught.value.body["error"]["code"] == "model_not_found"
    async with anthropic.AsyncAnthropic(
        base_url=daemon.url, api_key="wrong", max_retries=0
    ) as stranger:
        with pytest.raises(anthropic.AuthenticationError):
            await stranger.messages.create(
                model="claude-sonnet-4-5", max_tokens=8, messages=question
            )


async def test_llama_cpps_own_routes_are_relayed(start_daemon, llama_url):
    """What this llama.cpp serves besides the OpenAI routes answers through lmbridge as it
    answers directly: /tokenize, /detokenize, /apply-template, /props, /slots, /health;
    its 501 for a route it was not started with, and its 404, come back unchanged."""
    daemon = await start_daemon("--upstream", llama_url)
    async with aiohttp.ClientSession() as session:

        async def both(method: str, path: str, body: object = None) -> tuple[int, bytes]:
            answers = []
            for base in (daemon.url, llama_url):
                async with session.request(method, base + path, json=body) as resp:
                    answers.append((resp.status, resp.content_type, await resp.read()))
            assert answers[0][:2] == answers[1][:2], path
            return answers[0][0], answers[0][2]

        status, body = await both("POST", "/tokenize", {"content": "hello world"})
        assert status == 200
        tokens = json.loads(body)["tokens"]
        assert tokens
        status, body = await both("POST", "/detokenize", {"tokens": tokens})
        assert json.loads(body)["content"].strip() == "hello world"
        status, body = await both("POST", "/apply-template", {"messages": [
            {"role": "user", "content": "hi"}]})  # fmt: skip
        assert "hi" in json.loads(body)["prompt"]
        for path in ("/props", "/slots", "/health"):
            assert (await both("GET", path))[0] == 200, path
        status, body = await both("POST", "/v1/rerank", {"query": "a", "documents": ["b"]})
        assert status == 501 and b"--reranking" in body
        status, body = await both("GET", "/no/such/route")
        assert status == 404
        # lmbridge's own /metrics, never llama.cpp's.
        async with session.get(daemon.url + "/metrics") as resp:
            assert "lmbridge_requests_total" in await resp.text()
            assert 'route="/tokenize"' in await resp.text()


async def test_serve_embedded_answers_and_stops_its_child(start_daemon, tmp_path: Path):
    """`lmbridge serve --embedded` starts llama.cpp itself, answers, and takes it down on exit."""
    daemon = await start_daemon("--embedded", ready_within=180)
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        completion = await c.chat.completions.create(
            messages=[{"role": "user", "content": "Hi"}], model="smollm2", max_tokens=4
        )
    assert completion.choices[0].message.content
    match = re.search(r"embedded llama.cpp serving \S+ at (http://\S+) ", daemon.log())
    assert match, daemon.log()
    # SmolLM2's template drops tools: the start-up line says so. lmbridge then describes
    # the tools in the system message (the model sees them: more prompt tokens); with
    # that turned off, the request is told its tools were dropped.
    assert "Its chat template cannot render tools" in daemon.log()
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"messages": [{"role": "user", "content": "Hi"}], "tools": [tool], "max_tokens": 2}
    prompt_tokens = {}
    async with aiohttp.ClientSession() as session:
        for describe in (True, False):
            sent = {**body, "lmbridge": {"describe_tools": describe}}
            async with session.post(daemon.base_url + "/chat/completions", json=sent) as resp:
                assert resp.status == 200
                prompt_tokens[describe] = (await resp.json())["usage"]["prompt_tokens"]
                warning = resp.headers.get("X-LMBridge-Warning", "")
                assert ("cannot render tools" in warning) is not describe, warning
    assert prompt_tokens[True] > prompt_tokens[False] + 20, prompt_tokens
    assert await daemon.stop() == 0
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(match.group(1) + "/health")


async def test_embedded_context_fits_a_coding_agents_first_request(start_daemon):
    """The embedded default context takes a request the size of Codex CLI's first one
    (about 4,600 tokens); a request that still does not fit says which setting raises the
    limit and how many tokens it had."""
    daemon = await start_daemon("--embedded", ready_within=180)
    sentence = "The quick brown fox jumps over the lazy dog near the river bank. "
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        completion = await c.chat.completions.create(
            model="smollm2",
            max_tokens=2,
            messages=[{"role": "user", "content": sentence * 370 + "Say hi."}],
        )
        assert completion.usage is not None and completion.usage.prompt_tokens > 4600
        with pytest.raises(openai.BadRequestError) as caught:
            await c.chat.completions.create(
                model="smollm2",
                max_tokens=2,
                messages=[{"role": "user", "content": sentence * 800}],
            )
    assert caught.value.code == "context_length_exceeded"
    message = caught.value.message
    assert "embedded.context_length (now 8192" in message
    assert re.search(r"The request has \d{5} tokens; the model's context holds 8192", message)


async def test_a_real_model_drives_a_real_mcp_server(start_daemon, llama_url, tmp_path: Path):
    """llama.cpp's SmolLM2 writes a tool call as text (told to copy it), lmbridge
    recognises it (mcp.text_tool_calls), runs mcp-server-time's tool and asks the model
    again with the result: the whole loop with no scripted part."""
    import sys

    from tests.e2e.conftest import clean_env

    config = tmp_path / "lmbridge.toml"
    config.write_text(
        "[mcp]\ntext_tool_calls = true\nmax_rounds = 1\n"
        f"[mcp.servers.time]\ncommand = {json.dumps(sys.executable)}\n"
        'args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]\n'
    )
    daemon = await start_daemon(
        "--upstream", llama_url, "--config", str(config), env=clean_env(tmp_path)
    )
    call = '<tool_call>{"name": "time__get_current_time", "arguments": {"timezone": "UTC"}}'
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        completion = await c.chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=60,
            messages=[
                {"role": "system", "content": "You copy text exactly."},
                {
                    "role": "user",
                    "content": "Copy this text exactly, with nothing before "
                    f"or after it:\n{call}</tool_call>",
                },
            ],
            extra_body={"mcp_servers": ["time"]},
        )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.prompt_tokens > 0
    async with aiohttp.ClientSession() as session, session.get(daemon.url + "/metrics") as resp:
        metrics = await resp.text()
    ran = 'lmbridge_mcp_tool_calls_total{outcome="ok",server="time",tool="get_current_time"}'
    assert ran + " 1.0" in metrics


async def test_lmbridge_mcp_in_front_of_llama_cpp(llama_url, tmp_path: Path):
    """`lmbridge mcp --standalone` with llama.cpp behind it, driven over stdio by the mcp
    SDK's client: the models, a real answer, and a two-turn conversation."""
    from mcp import Client
    from mcp.client.stdio import stdio_client

    from tests.e2e.test_bridge import bridge_params, call

    params = bridge_params(tmp_path, "--standalone", "--upstream", llama_url)
    async with Client(stdio_client(params), mode="auto") as client:
        models = await call(client, "list_models")
        assert [m["id"] for m in models["models"]] == ["smollm2"]
        answer = await call(client, "chat", prompt="Say hello.", max_tokens=8)
        assert isinstance(answer, str) and answer.strip()
        first = await call(client, "respond", input="My name is Ada.", max_tokens=16)
        second = await call(
            client,
            "respond",
            input="What is my name?",
            max_tokens=16,
            previous_response_id=first["response_id"],
        )
        assert second["status"] in ("completed", "incomplete") and second["text"]


async def test_bench_real_reuses_the_prompt_cache(tmp_path: Path):
    """`lmbridge bench --real`: on llama.cpp, the second turn of a chain reads most of its
    prompt from the cache (counts, not timings, are checked)."""
    from tests.e2e.test_cli import run_cli

    out = tmp_path / "real.json"
    code, text, err = await run_cli(
        tmp_path, "bench", "--real", "--real-turns", "2", "--json", str(out), within=240
    )
    assert code == 0, err
    report = json.loads(out.read_text())
    first, second = report["turns"]
    assert first["cached_tokens"] == 0
    assert second["cached_tokens"] > 0.9 * second["prompt_tokens"]
    assert report["cold_last_prompt"]["prompt_tokens"] >= second["prompt_tokens"]
    assert "prompt cache across one /v1/responses chain" in text


async def test_smollm2_writes_a_call_as_text_and_the_client_gets_a_tool_call(client):
    """SmolLM2's template cannot render tools: lmbridge describes the offered function
    tool in the system message, and the call the model writes as text comes back as a
    structured call, whole and streamed. (A 135M model does not call tools by itself: a
    llama.cpp grammar makes it write the call; the text is still the model's own output,
    read by lmbridge like any other.)"""
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    ask = dict(
        model="smollm2",
        temperature=0,
        max_tokens=60,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[weather],
        extra_body={"grammar": "root ::= " + json.dumps(call)},
    )
    completion = await client.chat.completions.create(**ask)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "get_weather"
    assert json.loads(tool_call.function.arguments) == {"city": "Paris"}

    content, names, arguments, finish = "", [], "", None
    async with await client.chat.completions.create(**ask, stream=True) as stream:
        async for chunk in stream:
            if not chunk.choices:
                continue
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for part in delta.tool_calls or []:
                names += [part.function.name] if part.function and part.function.name else []
                arguments += (part.function.arguments or "") if part.function else ""
            finish = chunk.choices[0].finish_reason or finish
    assert (content, names, finish) == ("", ["get_weather"], "tool_calls")
    assert json.loads(arguments) == {"city": "Paris"}


async def test_a_streamed_text_completion_is_counted_for_a_client_that_asked_no_usage(
    start_daemon, llama_url
):
    """llama.cpp's streamed /v1/completions with usage asked for by lmbridge (llama.cpp
    puts it on its last text event anyway, which reaches the client as it came): the
    client gets the text, and the usage report counts the tokens."""
    daemon = await start_daemon("--upstream", llama_url)
    async with openai.AsyncOpenAI(
        base_url=daemon.base_url, api_key="unused", max_retries=0
    ) as client:
        stream = await client.completions.create(
            model="smollm2", prompt="Once upon", max_tokens=4, stream=True
        )
        events = [event async for event in stream]
    assert "".join(e.choices[0].text for e in events if e.choices)
    assert all(e.choices for e in events)  # no usage-only event
    async with aiohttp.ClientSession() as session:
        for _ in range(100):  # records are written in batches
            async with session.get(daemon.url + "/v1/lmbridge/usage?since=0") as resp:
                total = (await resp.json())["total"]
            if total["requests"]:
                break
            await asyncio.sleep(0.1)
    assert total["requests"] == 1
    assert total["prompt_tokens"] > 0 and 1 <= total["completion_tokens"] <= 4
