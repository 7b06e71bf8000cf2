"""`lmbridge mcp` driven by the mcp SDK's client over stdio, as a coding assistant
would: against a daemon (a separate process) with the scripted fake upstream and the
calc MCP server, and on its own with --standalone."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.stdio import stdio_client

from proxy import __version__
from tests.e2e.conftest import clean_env, free_port, lmbridge
from tests.fake_upstream import CHAT, Reply, chat_completion
from tests.integration.test_mcp_chat import CALC_SERVER, tool_calls
from tests.mcp_servers.network import wait_for_port

pytestmark = pytest.mark.e2e

TOOLS = {
    "list_models",
    "health",
    "chat",
    "respond",
    "delegate",
    "get_response",
    "embed",
    "list_mcp_servers",
}


def bridge_params(tmp_path: Path, *args: str) -> StdioServerParameters:
    return StdioServerParameters(
        command=lmbridge(),
        args=["mcp", *args],
        env=clean_env(tmp_path),
        cwd=str(tmp_path),
    )


@pytest.fixture
async def daemon(start_daemon, fake_upstream, tmp_path: Path):
    mcp_json = tmp_path / "mcp.json"
    mcp_json.write_text(json.dumps({"mcpServers": {"calc": CALC_SERVER}}))
    return await start_daemon("--upstream", fake_upstream.url, "--mcp-config", str(mcp_json))


@pytest.fixture
def connect(daemon, tmp_path: Path) -> Callable[[], Client]:
    """Opens a session with `lmbridge mcp --url <daemon>`; used as ``async with
    connect() as bridge`` inside the test (an anyio scope must not span fixture and test
    tasks)."""
    return lambda: Client(stdio_client(bridge_params(tmp_path, "--url", daemon.url)), mode="auto")


async def call(client: Client, tool: str, **arguments: Any) -> Any:
    """The tool's structured result (or its text), failing the test on a tool error."""
    result = await client.call_tool(tool, arguments)
    text = "".join(getattr(block, "text", "") for block in result.content)
    assert not result.is_error, text
    return result.structured_content if result.structured_content is not None else text


async def tool_error(client: Client, tool: str, **arguments: Any) -> str:
    result = await client.call_tool(tool, arguments)
    assert result.is_error
    return "".join(getattr(block, "text", "") for block in result.content)


def sent(fake_upstream, n: int = -1) -> dict:
    return fake_upstream.requests_to(CHAT)[n].body


async def test_the_tools_are_there_with_their_fixed_names(connect):
    """The server says who it is (lmbridge and its version) and offers its fixed tools."""
    async with connect() as bridge:
        assert bridge.server_info is not None
        assert (bridge.server_info.name, bridge.server_info.version) == ("lmbridge", __version__)
        listed = {t.name: t for t in (await bridge.list_tools()).tools}
        assert set(listed) == TOOLS
        delegate = listed["delegate"].input_schema
        assert delegate["required"] == ["task"]
        assert set(delegate["properties"]) == {
            "task",
            "mcp_servers",
            "model",
            "max_rounds",
            "wait_seconds",
        }


async def test_list_models_health_and_mcp_servers(connect, daemon):
    async with connect() as bridge:
        models = await call(bridge, "list_models")
        assert models["models"][0]["id"] == "test-model"
        health = await call(bridge, "health")
        assert health["status"] == "ready" and health["daemon"] == daemon.url
        for _ in range(100):
            servers = (await call(bridge, "list_mcp_servers"))["servers"]
            if servers[0]["state"] == "ready":
                break
            await asyncio.sleep(0.1)
        [calc] = servers
        assert calc["name"] == "calc" and "add" in {t["name"] for t in calc["tools"]}


async def test_chat_plain_and_with_a_json_schema(connect, fake_upstream):
    async with connect() as bridge:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Paris.")))
        answer = await call(
            bridge,
            "chat",
            prompt="Capital of France?",
            system="Be brief.",
            temperature=0.2,
            max_tokens=20,
        )
        assert answer == "Paris."
        body = sent(fake_upstream)
        assert body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Capital of France?"},
        ]
        assert body["temperature"] == 0.2 and body["max_tokens"] == 20

        schema = {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        }
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion('{"city": "Paris"}')))
        result = await call(bridge, "chat", prompt="Capital?", json_schema=schema)
        assert json.loads(result) == {"city": "Paris"}
        assert sent(fake_upstream)["response_format"]["json_schema"]["schema"] == schema


async def test_respond_keeps_the_history(connect, fake_upstream):
    async with connect() as bridge:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Hello Ada.")))
        first = await call(bridge, "respond", input="My name is Ada.")
        assert first["text"] == "Hello Ada." and first["response_id"].startswith("resp_")
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("You are Ada.")))
        second = await call(
            bridge, "respond", input="Who am I?", previous_response_id=first["response_id"]
        )
        assert second["text"] == "You are Ada."
        assert [m["content"] for m in sent(fake_upstream)["messages"]] == [
            "My name is Ada.",
            "Hello Ada.",
            "Who am I?",
        ]


async def test_delegate_runs_a_tool_loop_and_reports_progress(connect, fake_upstream):
    async with connect() as bridge:
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 2, "b": 3}')))
        )
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("The sum is 5.")))
        progress: list[str] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(message or "")

        task = {"task": "Add 2 and 3.", "mcp_servers": ["calc"]}
        result = await bridge.call_tool("delegate", task, progress_callback=on_progress)
        assert not result.is_error
        out = result.structured_content
        assert out["status"] == "completed" and out["text"] == "The sum is 5."
        [step] = out["trace"]
        assert (step["server"], step["tool"], step["outcome"]) == ("calc", "add", "ok")
        assert step["ms"] >= 0
        assert any("calc.add: ok" in p for p in progress)
        tools = [t["function"]["name"] for t in sent(fake_upstream, 0)["tools"]]
        assert "calc__add" in tools
        last = sent(fake_upstream)["messages"][-1]
        assert last["role"] == "tool" and last["content"] == "5"


async def test_delegate_that_outlives_its_wait_is_fetched_later(connect, fake_upstream):
    async with connect() as bridge:
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 1, "b": 1}')))
        )
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Two."), delay=2.0))
        early = await call(bridge, "delegate", task="Add 1 and 1.", wait_seconds=0.5)
        assert early["status"] == "in_progress" and "get_response" in early["note"]
        for _ in range(100):
            later = await call(bridge, "get_response", response_id=early["response_id"])
            if later["status"] == "completed":
                break
            await asyncio.sleep(0.1)
        assert later["text"] == "Two."
        [step] = later["trace"]
        assert step["tool"] == "add" and step["outcome"] == "ok" and "ms" in step


async def test_unknown_model_and_unknown_server_are_tool_errors(connect):
    async with connect() as bridge:
        message = await tool_error(bridge, "chat", prompt="hi", model="gpt-9")
        assert "gpt-9" in message and "test-model" in message
        message = await tool_error(bridge, "delegate", task="x", mcp_servers=["nope"])
        assert "nope" in message and "calc" in message
        # the server answers on after errors
        assert (await call(bridge, "list_models"))["models"]


def embeddings(count: int, dimensions: int) -> dict:
    return {
        "object": "list",
        "model": "test-model",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.5] * dimensions}
            for i in range(count)
        ],
    }


async def test_embed_returns_vectors_or_a_preview(connect, fake_upstream):
    async with connect() as bridge:
        fake_upstream.add_reply("/v1/embeddings", Reply(json=embeddings(2, 4)))
        small = await call(bridge, "embed", texts=["a", "b"])
        assert (small["count"], small["dimensions"]) == (2, 4)
        assert small["vectors"] == [[0.5] * 4, [0.5] * 4]
        assert fake_upstream.requests_to("/v1/embeddings")[-1].body["input"] == ["a", "b"]
        fake_upstream.add_reply("/v1/embeddings", Reply(json=embeddings(2, 768)))
        large = await call(bridge, "embed", texts=["a", "b"])
        assert "vectors" not in large and "vectors_omitted" in large
        assert large["dimensions"] == 768 and large["preview"][1] == [0.5] * 8


async def test_long_answers_are_cut_and_paged_with_get_response(daemon, fake_upstream, tmp_path):
    env = {**clean_env(tmp_path), "LMBRIDGE_BRIDGE_RESULT_MAX_CHARS": "300"}
    params = bridge_params(tmp_path, "--url", daemon.url)
    params = params.model_copy(update={"env": env})
    long = "".join(f"{i:04d} " for i in range(200))  # 1,000 characters
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(long)))
    async with Client(stdio_client(params), mode="auto") as client:
        first = await call(client, "respond", input="Count.")
        assert first["text"].startswith(long[:300]) and "700 more characters" in first["text"]
        assert first["next_offset"] == 300
        pieces = [first["text"][:300]]
        offset = first["next_offset"]
        while offset is not None:
            page = await call(
                client, "get_response", response_id=first["response_id"], offset=offset
            )
            pieces.append(page["text"][:300])
            offset = page.get("next_offset")
        assert "".join(pieces) == long


async def test_daemon_down_every_tool_says_so_and_the_server_stays(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    async with Client(stdio_client(bridge_params(tmp_path, "--url", url)), mode="auto") as client:
        calls = [
            ("list_models", {}),
            ("health", {}),
            ("chat", {"prompt": "x"}),
            ("delegate", {"task": "x"}),
            ("get_response", {"response_id": "resp_x"}),
        ]
        for tool, arguments in calls:
            message = await tool_error(client, tool, **arguments)
            assert f"lmbridge is not reachable at {url}" in message
            assert "lmbridge serve" in message and "--standalone" in message


async def test_standalone_runs_the_daemon_inside(fake_upstream, tmp_path):
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("From inside.")))
    params = bridge_params(
        tmp_path, "--standalone", "--upstream", fake_upstream.url, "--db", str(tmp_path / "own.db")
    )
    async with Client(stdio_client(params), mode="auto") as client:
        assert await call(client, "chat", prompt="hi") == "From inside."
        health = await call(client, "health")
        assert health["status"] == "ready" and health["daemon"].startswith("http://127.0.0.1:")
    assert (tmp_path / "own.db").exists()
    assert fake_upstream.requests_to("/v1/models")


async def test_streamable_http_transport(daemon, fake_upstream, tmp_path):
    """`lmbridge mcp --transport http` serves MCP clients on 127.0.0.1 and refuses what a
    web page could send: a rebound Host (421) or any Origin not configured, localhost
    pages included (403)."""
    import aiohttp
    from mcp.client.streamable_http import streamable_http_client

    port = free_port()
    process = await asyncio.create_subprocess_exec(
        lmbridge(),
        "mcp",
        "--url",
        daemon.url,
        "--transport",
        "http",
        "--port",
        str(port),
        env=clean_env(tmp_path),
        cwd=str(tmp_path),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        await wait_for_port(port)
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Over HTTP.")))
        async with Client(
            streamable_http_client(f"http://127.0.0.1:{port}/mcp"), mode="auto"
        ) as client:
            assert await call(client, "chat", prompt="hi") == "Over HTTP."
        initialize = {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {}}
        refused = [
            ({"Host": f"attacker.example:{port}"}, 421),
            ({"Origin": "https://attacker.example"}, 403),
            ({"Origin": "http://localhost:5173"}, 403),
        ]
        async with aiohttp.ClientSession() as session:
            for headers, status in refused:
                async with session.post(
                    f"http://127.0.0.1:{port}/mcp",
                    json=initialize,
                    headers={"Accept": "application/json, text/event-stream", **headers},
                ) as resp:
                    assert resp.status == status, headers
        assert len(fake_upstream.requests_to(CHAT)) == 1
    finally:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), 5)
        except TimeoutError:
            process.kill()
            await process.wait()


async def test_api_key_from_the_environment(start_daemon, fake_upstream, tmp_path):
    """A daemon with client keys: the bridge sends LMBRIDGE_BRIDGE_API_KEY; without it,
    the tool error says the key is missing."""
    config = tmp_path / "keys.toml"
    config.write_text('[auth]\napi_keys = ["sk-bridge-test"]\n')
    daemon = await start_daemon("--upstream", fake_upstream.url, "--config", str(config))
    params = bridge_params(tmp_path, "--url", daemon.url)
    env = {**clean_env(tmp_path), "LMBRIDGE_BRIDGE_API_KEY": "sk-bridge-test"}
    keyed = params.model_copy(update={"env": env})
    async with Client(stdio_client(keyed), mode="auto") as client:
        assert (await call(client, "list_models"))["models"][0]["id"] == "test-model"
    async with Client(stdio_client(params), mode="auto") as client:
        message = await tool_error(client, "list_models")
        assert "lmbridge:" in message and "key" in message.lower()


async def test_delegate_all_leaves_out_servers_that_need_approval(
    start_daemon, fake_upstream, tmp_path
):
    """ "all" gives the task the servers it can use on its own; a server that needs
    approval, named, stops the task with waiting_for_approval."""
    mcp_json = tmp_path / "mcp.json"
    mcp_json.write_text(json.dumps({"mcpServers": {"calc": CALC_SERVER, "guarded": CALC_SERVER}}))
    config = tmp_path / "lmbridge.toml"  # lmbridge's own options live in its TOML
    config.write_text("[mcp.servers.guarded]\nrequire_approval = true\n")
    daemon = await start_daemon(
        "--upstream", fake_upstream.url, "--mcp-config", str(mcp_json), "--config", str(config)
    )
    async with Client(
        stdio_client(bridge_params(tmp_path, "--url", daemon.url)), mode="auto"
    ) as bridge:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Nothing to do.")))
        await call(bridge, "delegate", task="Look around.")
        offered = {t["function"]["name"].split("__")[0] for t in sent(fake_upstream)["tools"]}
        assert offered == {"calc"}
        call_add = ("c1", "guarded__add", '{"a": 1, "b": 2}')
        fake_upstream.add_reply(CHAT, Reply(json=tool_calls(call_add)))
        result = await call(bridge, "delegate", task="Add.", mcp_servers=["guarded"])
        assert result["waiting_for_approval"] == ["guarded.add"]
