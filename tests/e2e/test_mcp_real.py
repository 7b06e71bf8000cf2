"""MCP servers no one here wrote, behind the daemon (a separate process), driven by the
official openai SDK: mcp-server-time from the package index and, when node is present,
@modelcontextprotocol/server-everything through npx."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.e2e.test_cli import run_cli
from tests.fake_upstream import CHAT, Reply, chat_completion
from tests.integration.test_mcp_chat import tool_calls

pytestmark = pytest.mark.e2e

NPX = shutil.which("npx")
TIME = [sys.executable, "-m", "mcp_server_time", "--local-timezone", "UTC"]


async def start_with(start_daemon, fake_upstream, tmp_path: Path, servers: dict):
    mcp_json = tmp_path / "mcp.json"
    mcp_json.write_text(json.dumps({"mcpServers": servers}))
    daemon = await start_daemon("--upstream", fake_upstream.url, "--mcp-config", str(mcp_json))
    async with aiohttp.ClientSession() as session:  # wait for the servers to connect
        for _ in range(600):
            async with session.get(daemon.url + "/readyz") as resp:
                states = (await resp.json())["mcp_servers"]
            if all(s["state"] in ("ready", "backoff") for s in states.values()):
                break
            await asyncio.sleep(0.1)
    return daemon, states


@pytest.fixture
async def daemon(start_daemon, fake_upstream, tmp_path: Path):
    time = {"command": TIME[0], "args": TIME[1:]}
    daemon, states = await start_with(start_daemon, fake_upstream, tmp_path, {"time": time})
    assert states["time"]["state"] == "ready", states
    return daemon


@pytest.fixture
async def everything(start_daemon, fake_upstream, tmp_path: Path):
    if NPX is None:
        pytest.skip("node/npx not installed")
    server = {"command": NPX, "args": ["-y", "@modelcontextprotocol/server-everything"]}
    daemon, states = await start_with(start_daemon, fake_upstream, tmp_path, {"everything": server})
    if states["everything"]["state"] != "ready":
        # npx fetches the package from the npm registry on first use; without it there
        # is nothing to test against here
        pytest.skip(f"server-everything did not start: {states['everything']}")
    return daemon


@pytest.fixture
async def client(daemon):
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture
async def everything_client(everything):
    async with openai.AsyncOpenAI(base_url=everything.base_url, api_key="x", max_retries=0) as c:
        yield c


def tool_results(fake_upstream) -> list[str]:
    return [
        m["content"]
        for m in fake_upstream.requests_to(CHAT)[-1].body["messages"]
        if m["role"] == "tool"
    ]


async def test_time_server_through_chat_completions(client, fake_upstream):
    """A chat completion with extra_body mcp_servers runs mcp-server-time's tool."""
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "time__get_current_time", '{"timezone": "UTC"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is now.")))
    completion = await client.chat.completions.create(
        model="test-model",
        messages=[{"role": "user", "content": "Time?"}],
        extra_body={"mcp_servers": ["time"]},
    )
    assert completion.choices[0].message.content == "It is now."
    [result] = tool_results(fake_upstream)
    assert json.loads(result)["timezone"] == "UTC"
    offered = [t["function"]["name"] for t in fake_upstream.requests_to(CHAT)[0].body["tools"]]
    assert sorted(offered) == ["time__convert_time", "time__get_current_time"]


async def test_time_server_through_responses(client, fake_upstream):
    """client.responses.create with an mcp tool: listing, call and answer as output items."""
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=tool_calls(
                (
                    "c1",
                    "time__convert_time",
                    '{"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}',
                )
            )
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("21:00 in Tokyo.")))
    response = await client.responses.create(
        model="test-model",
        input="Noon UTC in Tokyo?",
        tools=[{"type": "mcp", "server_label": "time", "require_approval": "never"}],
    )
    assert [item.type for item in response.output] == ["mcp_list_tools", "mcp_call", "message"]
    call = response.output[1]
    assert "21:00" in call.output
    assert response.output_text == "21:00 in Tokyo."


EVERYTHING_CASES = [
    ("echo", {"message": "hi there"}, "hi there"),
    ("get-tiny-image", {}, "not shown, the model does not read images"),
    ("get-resource-reference", {"resourceType": "Text", "resourceId": 1}, "[resource "),
    ("get-structured-content", {"location": "Chicago"}, "temperature"),
    ("trigger-long-running-operation", {"duration": 1, "steps": 2}, "completed"),
]


async def test_server_everything_results(everything_client, fake_upstream):
    """Text, image, embedded resource, structured and long-running results of
    server-everything reach the model in a form it can read (one daemon for all cases:
    npx takes seconds to start)."""
    for tool, arguments, expected in EVERYTHING_CASES:
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls(("c1", f"everything__{tool}", json.dumps(arguments))))
        )
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("done")))
        await everything_client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "go"}],
            extra_body={"mcp_servers": ["everything"]},
        )
        [result] = tool_results(fake_upstream)
        assert expected.lower() in result.lower(), (tool, result)


async def test_mcp_list_command(daemon, tmp_path):
    """`lmbridge mcp-list` prints the servers and their tools."""
    code, out, err = await run_cli(tmp_path, "mcp-list", "--mcp-config", str(tmp_path / "mcp.json"))
    assert code == 0, err
    assert "time  (ready)" in out and "get_current_time" in out and "convert_time" in out


async def test_mcp_list_reports_a_broken_server_and_fails(tmp_path):
    config = tmp_path / "lmbridge.toml"
    python = json.dumps(sys.executable)
    config.write_text(
        f"[mcp.servers.time]\ncommand = {python}\nargs = {json.dumps(TIME[1:])}\n"
        f'[mcp.servers.broken]\ncommand = {python}\nargs = ["-c", "raise SystemExit(3)"]\n'
    )
    code, out, err = await run_cli(tmp_path, "mcp-list", "--config", str(config), "--json")
    assert code == 1, err
    listing = json.loads(out)
    assert listing["time"]["state"] == "ready" and listing["broken"]["state"] == "backoff"
    assert listing["broken"]["error"]


async def test_mcp_list_without_servers(tmp_path):
    code, out, _ = await run_cli(tmp_path, "mcp-list")
    assert code == 0 and "no MCP servers configured" in out


async def test_streamed_responses_events_through_the_sdk(client, fake_upstream):
    """client.responses.stream with an mcp tool: the SDK parses every event; the MCP events
    and the text share one stream with consistent output indexes."""
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "time__get_current_time", '{"timezone": "UTC"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is now.")))
    tool = {"type": "mcp", "server_label": "time", "require_approval": "never"}
    async with client.responses.stream(
        model="test-model",
        input="Time?",
        tools=[tool],  # type: ignore[list-item]
    ) as stream:
        events = [event async for event in stream]
        final = await stream.get_final_response()
    types = [e.type for e in events]
    for expected in (
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
        "response.output_text.delta",
        "response.completed",
    ):
        assert expected in types, (expected, types)
    assert types.index("response.mcp_call.completed") < types.index("response.output_text.delta")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [item.type for item in final.output] == ["mcp_list_tools", "mcp_call", "message"]
    call_events = [e for e in events if e.type.startswith("response.mcp_call.")]
    assert {e.output_index for e in call_events} == {1}
    assert {e.item_id for e in call_events} == {final.output[1].id}
    assert json.loads(final.output[1].output)["timezone"] == "UTC"
    assert final.output_text == "It is now."


async def test_agents_sdk_hosted_mcp_tool_with_approval(daemon, fake_upstream):
    """The OpenAI Agents SDK's HostedMCPTool against the configured time server: the run
    stops at the approval request, the SDK's callback approves, lmbridge runs the call."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "time__get_current_time", '{"timezone": "UTC"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is now, in UTC.")))
    asked = []

    def approve(request):  # type: ignore[no-untyped-def]
        asked.append(request.data.name)
        return {"approve": True}

    tool = agents.HostedMCPTool(
        tool_config={"type": "mcp", "server_label": "time", "require_approval": "always"},
        on_approval_request=approve,
    )
    async with openai.AsyncOpenAI(base_url=daemon.base_url, api_key="x", max_retries=0) as c:
        model = agents.OpenAIResponsesModel(model="test-model", openai_client=c)
        agent = agents.Agent(name="clock", instructions="Tell the time.", model=model, tools=[tool])
        result = await agents.Runner.run(agent, "What time is it?")
    assert asked == ["get_current_time"]
    assert result.final_output == "It is now, in UTC."
    [result_message] = [
        m for m in fake_upstream.requests_to(CHAT)[-1].body["messages"] if m["role"] == "tool"
    ]
    assert json.loads(result_message["content"])["timezone"] == "UTC"
