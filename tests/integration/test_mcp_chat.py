"""Tool loops on /v1/chat/completions with a real MCP server (tests/mcp_servers/calc.py
over stdio) and the scripted fake upstream."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import pytest

from tests.fake_upstream import CHAT, Reply, chat_completion, chunk
from tests.mcp_servers.network import served_calc

CALC = str(Path(__file__).resolve().parents[1] / "mcp_servers" / "calc.py")
CALC_SERVER = {"command": sys.executable, "args": [CALC]}
ASK = {"model": "test-model", "messages": [{"role": "user", "content": "What is 2+3?"}]}


def tool_calls(
    *calls: tuple[str, str, str], content: str | None = None, finish: str = "tool_calls"
) -> dict:
    body = chat_completion()
    message = body["choices"][0]["message"]
    message["content"] = content
    message["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        for call_id, name, args in calls
    ]
    body["choices"][0]["finish_reason"] = finish
    return body


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(mcp__servers={"calc": CALC_SERVER}, mcp__default_servers="all")


def sent(fake_upstream, n: int = -1) -> dict:
    return fake_upstream.requests_to(CHAT)[n].body


async def test_two_round_loop(proxy, fake_upstream):
    """The model calls an MCP tool; lmbridge runs it, sends the result back with the call
    id, and the client gets the final answer with usage summed over both rounds."""
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("call_1", "calc__add", '{"a": 2, "b": 3}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2 + 3 = 5")))
    resp = await proxy.post(CHAT, json=ASK)
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "2 + 3 = 5"
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == 14  # 7 per round
    first, second = sent(fake_upstream, 0), sent(fake_upstream, 1)
    assert "calc__add" in [t["function"]["name"] for t in first["tools"]]
    assert second["messages"][-2]["tool_calls"][0]["id"] == "call_1"
    assert second["messages"][-1] == {"role": "tool", "tool_call_id": "call_1", "content": "5"}
    assert "mcp_servers" not in first


async def test_streamed_loop_is_one_stream(proxy, fake_upstream):
    """Streamed: content of both rounds arrives, MCP tool-call deltas are held back, and
    the client sees one finish_reason, one usage chunk and one [DONE]."""
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "calc__add", "arguments": ""},
    }
    args = {"index": 0, "function": {"arguments": '{"a": 2, "b": 3}'}}
    fake_upstream.add_reply(
        CHAT,
        Reply(
            stream=[
                chunk(role="assistant", content="Let me add. "),
                chunk(tool_calls=[call]),
                chunk(tool_calls=[args]),
                chunk(finish="stop"),  # stop WITH tool calls: the calls decide
                chunk(
                    choices=False,
                    usage={"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                ),
            ]
        ),
    )
    fake_upstream.add_reply(
        CHAT,
        Reply(
            stream=[
                chunk(role="assistant", content="It is 5."),
                chunk(finish="stop"),
                chunk(
                    choices=False,
                    usage={"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11},
                ),
            ]
        ),
    )
    resp = await proxy.post(
        CHAT, json={**ASK, "stream": True, "stream_options": {"include_usage": True}}
    )
    raw = await resp.read()
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Let me add. It is 5."
    assert not any(c["choices"] and c["choices"][0]["delta"].get("tool_calls") for c in chunks)
    finishes = [
        c["choices"][0]["finish_reason"]
        for c in chunks
        if c["choices"] and c["choices"][0]["finish_reason"]
    ]
    assert finishes == ["stop"]
    usage = [c["usage"] for c in chunks if c.get("usage")]
    assert usage == [
        {
            "prompt_tokens": 14,
            "completion_tokens": 5,
            "total_tokens": 19,
            "prompt_tokens_details": {"cached_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0},
        }
    ]
    assert len({c["id"] for c in chunks}) == 1
    assert sent(fake_upstream, 1)["messages"][-1]["content"] == "5"


async def test_parallel_calls_run_together(proxy, fake_upstream):
    """Several MCP calls of one reply run in parallel; each result keeps its call id."""
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=tool_calls(
                ("c1", "calc__overlap", '{"seconds": 0.3}'),
                ("c2", "calc__overlap", '{"seconds": 0.3}'),
                ("c3", "calc__add", '{"a": 1, "b": 1}'),
            )
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("done")))
    assert (await proxy.post(CHAT, json=ASK)).status == 200
    tools = [m for m in sent(fake_upstream)["messages"] if m["role"] == "tool"]
    # Both overlap calls were running at the same time: each saw two in flight.
    assert [(m["tool_call_id"], m["content"]) for m in tools] == [
        ("c1", "2"),
        ("c2", "2"),
        ("c3", "2"),
    ]


async def test_round_limit_forces_a_final_answer(make_proxy, fake_upstream):
    """At mcp.max_rounds, one last call with tool_choice none asks for the answer."""
    proxy = await make_proxy(
        mcp__servers={"calc": CALC_SERVER}, mcp__default_servers="all", mcp__max_rounds=2
    )
    for n in range(2):
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls((f"c{n}", "calc__add", f'{{"a": {n}, "b": 1}}')))
        )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("final")))
    body = await (await proxy.post(CHAT, json=ASK)).json()
    assert body["choices"][0]["message"]["content"] == "final"
    requests = fake_upstream.requests_to(CHAT)
    assert len(requests) == 3
    assert requests[2].body["tool_choice"] == "none"
    assert "limit" in requests[2].body["messages"][-1]["content"]


async def test_repeated_identical_call_is_not_run_again(proxy, fake_upstream):
    """The same tool with the same arguments gets the earlier result and a note."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__pid", "{}"))))
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c2", "calc__pid", "{ }"))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("ok")))
    await proxy.post(CHAT, json=ASK)
    tools = [m for m in sent(fake_upstream)["messages"] if m["role"] == "tool"]
    assert tools[1]["content"].startswith(tools[0]["content"])
    assert "not run again" in tools[1]["content"]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (("calc__fail", '{"reason": "broken"}'), "The tool reported an error"),
        (("calc__add", "{not json"), "not valid JSON"),
        (("calc__add", '{"a": ' + "1" * 5000 + ', "b": 1}'), "more than 4300 digits"),
        (("calc__add", '{"a": "x"}'), "error"),
        (("calc__add", "[1, 2]"), "must be a JSON object"),
    ],
)
async def test_tool_errors_become_results(proxy, fake_upstream, call, fragment):
    """A tool that raises, bad arguments: the model is told, the request succeeds."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", *call))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("sorry")))
    resp = await proxy.post(CHAT, json=ASK)
    assert resp.status == 200
    assert fragment in sent(fake_upstream)["messages"][-1]["content"]


async def test_hanging_tool_times_out(make_proxy, fake_upstream):
    """A tool slower than its server's timeout gives the model a timeout result."""
    proxy = await make_proxy(
        mcp__servers={"calc": {**CALC_SERVER, "timeout": 0.5}}, mcp__default_servers="all"
    )
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__slow", '{"seconds": 30}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("too slow")))
    resp = await asyncio.wait_for(proxy.post(CHAT, json=ASK), 10)
    assert resp.status == 200
    assert "no result within 0.5s" in sent(fake_upstream)["messages"][-1]["content"]
    text = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_mcp_tool_calls_total{outcome="timeout",server="calc",tool="slow"} 1.0' in text


async def test_killed_server_is_restarted(proxy, fake_upstream):
    """A server that dies mid-loop: the call in flight fails, the server comes back."""
    from proxy.keys import MCP

    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__die", "{}"))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("it died")))
    resp = await proxy.post(CHAT, json=ASK)
    assert resp.status == 200
    assert "connection" in sent(fake_upstream)["messages"][-1]["content"]
    supervisor = proxy.app[MCP].supervisors["calc"]
    assert await supervisor.ready(15)
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c2", "calc__add", '{"a": 1, "b": 2}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("3")))
    await proxy.post(CHAT, json=ASK)
    assert sent(fake_upstream)["messages"][-1]["content"] == "3"
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_mcp_server_restarts_total{server="calc"} 1.0' in metrics


async def test_client_tools_pass_through_beside_mcp_tools(proxy, fake_upstream):
    """A client tool call returns to the client after the MCP calls of the same turn ran."""
    client_tool = {
        "type": "function",
        "function": {"name": "ask_user", "parameters": {"type": "object", "properties": {}}},
    }
    fake_upstream.add_reply(
        CHAT,
        Reply(json=tool_calls(("m1", "calc__add", '{"a": 1, "b": 1}'), ("u1", "ask_user", "{}"))),
    )
    body = await (await proxy.post(CHAT, json={**ASK, "tools": [client_tool]})).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["ask_user"]
    assert len(fake_upstream.requests_to(CHAT)) == 1
    from proxy.keys import METRICS

    text = proxy.app[METRICS].render().decode()
    assert 'lmbridge_mcp_tool_calls_total{outcome="ok",server="calc",tool="add"} 1.0' in text
    assert 'lmbridge_mcp_tool_call_duration_seconds_count{server="calc"} 1.0' in text


ASK_USER = {
    "type": "function",
    "function": {
        "name": "ask_user",
        "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
    },
}


def client_turn(first: dict, *, answer: str = "blue") -> list[dict]:
    """What a client sends next: its history, the assistant message it got, its result."""
    message = first["choices"][0]["message"]
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": answer} for c in message["tool_calls"]
    ]
    return [*ASK["messages"], message, *results]


async def test_mcp_steps_of_a_turn_handed_to_the_client_come_back(proxy, fake_upstream):
    """The model called an MCP tool beside a client tool: the client only saw its own
    call, yet its next request reaches the model with the MCP call and result in place."""
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=tool_calls(
                ("m1", "calc__add", '{"a": 1, "b": 1}'), ("u1", "ask_user", '{"q": "colour?"}')
            )
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("1 + 1 = 2, and blue.")))
    first = await (await proxy.post(CHAT, json={**ASK, "tools": [ASK_USER]})).json()
    assert [c["id"] for c in first["choices"][0]["message"]["tool_calls"]] == ["u1"]

    resp = await proxy.post(CHAT, json={**ASK, "tools": [ASK_USER], "messages": client_turn(first)})
    assert (await resp.json())["choices"][0]["message"]["content"] == "1 + 1 = 2, and blue."
    messages = sent(fake_upstream)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert [c["id"] for c in messages[1]["tool_calls"]] == ["m1", "u1"]
    assert messages[2] == {"role": "tool", "tool_call_id": "m1", "content": "2"}
    assert messages[3] == {"role": "tool", "tool_call_id": "u1", "content": "blue"}


async def test_earlier_rounds_come_back_before_the_client_call(proxy, fake_upstream):
    """Streamed: round 1 called MCP only, round 2 the client only. The client's next
    request carries round 1 again, before the assistant message it built from the
    deltas. A client that re-serialised the arguments still matches; one that sends
    the history again later gets the same steps again."""
    mcp_call = {
        "index": 0,
        "id": "m1",
        "type": "function",
        "function": {"name": "calc__add", "arguments": '{"a": 2, "b": 2}'},
    }
    client_call = {
        "index": 0,
        "id": "u7",
        "type": "function",
        "function": {"name": "ask_user", "arguments": '{"q":"why?"}'},
    }
    for call in (mcp_call, client_call):
        fake_upstream.add_reply(
            CHAT, Reply(stream=[chunk(tool_calls=[call]), chunk(finish="tool_calls")])
        )
    resp = await proxy.post(CHAT, json={**ASK, "tools": [ASK_USER], "stream": True})
    deltas = [
        json.loads(line[6:])
        for line in (await resp.text()).splitlines()
        if line.startswith("data: {")
    ]
    handed = [c for d in deltas for ch in d["choices"] for c in ch["delta"].get("tool_calls", [])]
    assert [c["id"] for c in handed] == ["u7"]
    first = {
        "choices": [
            {
                "message": {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "u7",
                            "type": "function",
                            "function": {"name": "ask_user", "arguments": '{ "q": "why?" }'},
                        }
                    ],
                }
            }
        ]
    }
    for _ in range(2):
        await proxy.post(CHAT, json={**ASK, "tools": [ASK_USER], "messages": client_turn(first)})
        messages = sent(fake_upstream)["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant", "tool", "assistant", "tool"]
        assert messages[1]["tool_calls"][0]["id"] == "m1"
        assert messages[2] == {"role": "tool", "tool_call_id": "m1", "content": "4"}
        assert [c["id"] for c in messages[3]["tool_calls"]] == ["u7"]


async def test_hidden_steps_are_kept_per_client_key(make_proxy, fake_upstream):
    """Another API key sending the same assistant message gets nothing added."""
    proxy = await make_proxy(
        mcp__servers={"calc": CALC_SERVER},
        mcp__default_servers="all",
        auth__api_keys=["key-a", "key-b"],
    )
    fake_upstream.add_reply(
        CHAT,
        Reply(json=tool_calls(("m1", "calc__add", '{"a": 1, "b": 1}'), ("u1", "ask_user", "{}"))),
    )
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    first = await (await proxy.post(CHAT, json={**ASK, "tools": [ASK_USER]}, headers=a)).json()
    follow = {**ASK, "tools": [ASK_USER], "messages": client_turn(first)}
    await proxy.post(CHAT, json=follow, headers=b)
    assert [m["role"] for m in sent(fake_upstream)["messages"]] == ["user", "assistant", "tool"]
    await proxy.post(CHAT, json=follow, headers=a)
    assert [m["role"] for m in sent(fake_upstream)["messages"]] == [
        "user",
        "assistant",
        "tool",
        "tool",
    ]


async def test_servers_are_chosen_per_request(make_proxy, fake_upstream):
    """mcp_servers in the body or X-MCP-Servers picks servers; unknown names are a 400;
    without either, the default (none) sends no MCP tools."""
    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER})
    await proxy.post(CHAT, json=ASK)
    assert "tools" not in sent(fake_upstream)
    await proxy.post(CHAT, json={**ASK, "mcp_servers": ["calc"]})
    assert "calc__add" in [t["function"]["name"] for t in sent(fake_upstream)["tools"]]
    assert "mcp_servers" not in sent(fake_upstream)
    await proxy.post(CHAT, json=ASK, headers={"X-MCP-Servers": "calc"})
    assert "tools" in sent(fake_upstream)
    resp = await proxy.post(CHAT, json={**ASK, "mcp_servers": ["nope"]})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "mcp_servers" and "nope" in error["message"]
    await proxy.post(CHAT, json={**ASK, "mcp_servers": []})
    assert "tools" not in sent(fake_upstream)


async def test_allowed_tools_and_long_results(make_proxy, fake_upstream):
    """allowed_tools limits what is offered; long results are cut with a marker."""
    proxy = await make_proxy(
        mcp__servers={"calc": {**CALC_SERVER, "allowed_tools": ["big"]}},
        mcp__default_servers="all",
        mcp__result_max_chars=100,
    )
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__big", '{"chars": 5000}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("long")))
    await proxy.post(CHAT, json=ASK)
    assert [t["function"]["name"] for t in sent(fake_upstream, 0)["tools"]] == ["calc__big"]
    result = sent(fake_upstream)["messages"][-1]["content"]
    assert result.startswith("x" * 100) and "4900 more characters cut" in result


async def test_image_results_for_text_models_are_a_note(proxy, fake_upstream):
    """An image result becomes a note for a model not known to read images."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__picture", "{}"))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("a dot")))
    await proxy.post(CHAT, json=ASK)
    result = sent(fake_upstream)["messages"][-1]["content"]
    assert "a red dot" in result and "not shown" in result


async def test_text_tool_calls_when_enabled(make_proxy, fake_upstream):
    """With mcp.text_tool_calls, a <tool_call> block in the text is run as a call."""
    proxy = await make_proxy(
        mcp__servers={"calc": CALC_SERVER}, mcp__default_servers="all", mcp__text_tool_calls=True
    )
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=chat_completion(
                '<tool_call>{"name": "calc__add", "arguments": {"a": 4, "b": 4}}</tool_call>'
            )
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("8")))
    await proxy.post(CHAT, json=ASK)
    assert sent(fake_upstream)["messages"][-1]["content"] == "8"


async def test_streamed_loop_reads_text_calls_and_thinking(proxy, fake_upstream):
    """Streamed, a round whose model thinks in <think> tags and writes its MCP call as
    text: the client sees the thinking as reasoning_content and never the call's text;
    the call runs and the next round answers."""
    written = (
        "<think>Two and three.</think>Adding. "
        '<tool_call>{"name": "calc__add", "arguments": {"a": 2, "b": 3}}</tool_call>'
    )
    pieces = [chunk(written[i : i + 5]) for i in range(0, len(written), 5)]
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk(role="assistant", content=""), *pieces, chunk(finish="stop")])
    )
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk(role="assistant", content="It is 5."), chunk(finish="stop")])
    )
    resp = await proxy.post(CHAT, json={**ASK, "stream": True})
    raw = await resp.read()
    events = [line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert "".join(d.get("content") or "" for d in deltas) == "Adding. It is 5."
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "Two and three."
    assert not any(d.get("tool_calls") for d in deltas)
    history = sent(fake_upstream)["messages"]
    assert history[-2]["tool_calls"][0]["function"]["name"] == "calc__add"
    assert history[-2]["content"] == "Adding."
    assert history[-1] == {
        "role": "tool",
        "tool_call_id": history[-2]["tool_calls"][0]["id"],
        "content": "5",
    }


async def test_readyz_and_metrics_show_server_state(proxy):
    """/readyz's body lists the MCP servers; /metrics says whether each is up."""
    from proxy.keys import MCP

    assert await proxy.app[MCP].supervisors["calc"].ready(15)
    body = await (await proxy.get("/readyz")).json()
    assert body["mcp_servers"]["calc"]["state"] == "ready"
    assert body["mcp_servers"]["calc"]["tools"] == 10  # calc.py's tools before grow
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_mcp_server_up{server="calc"} 1.0' in metrics


async def test_a_server_that_cannot_start_is_named_and_left_out(make_proxy, fake_upstream):
    """A requested server that fails to start: the request is served at once with the
    other servers' tools, and X-MCP-Unavailable names the missing one (plain and streamed)."""
    broken = {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]}
    proxy = await make_proxy(
        mcp__servers={"calc": CALC_SERVER, "broken": broken}, mcp__default_servers="all"
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("hello")))
    resp = await proxy.post(CHAT, json=ASK)
    assert resp.status == 200
    assert resp.headers["X-MCP-Unavailable"] == "broken"
    offered = [t["function"]["name"] for t in sent(fake_upstream)["tools"]]
    assert offered and all(name.startswith("calc__") for name in offered)
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk(content="hi"), chunk(finish="stop")]))
    resp = await proxy.post(CHAT, json={**ASK, "stream": True})
    assert resp.headers["X-MCP-Unavailable"] == "broken"
    assert "[DONE]" in await resp.text()
    health = await (await proxy.get("/readyz")).json()
    assert health["mcp_servers"]["broken"]["state"] == "backoff"


@pytest.mark.parametrize("transport", ["http", "sse"])
async def test_configured_network_servers(make_proxy, fake_upstream, transport):
    """A configured server reached by URL: streamable HTTP (/mcp) and legacy SSE (/sse),
    the transport told by the URL as in mcp.json files."""
    async with served_calc(transport) as url:
        proxy = await make_proxy(mcp__servers={"net": {"url": url}}, mcp__default_servers="all")
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls(("c1", "net__add", '{"a": 4, "b": 5}')))
        )
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("9")))
        resp = await proxy.post(CHAT, json=ASK)
        assert (await resp.json())["choices"][0]["message"]["content"] == "9"
        assert sent(fake_upstream)["messages"][-1]["content"] == "9"
        await proxy.close()  # ends the session before the server stops


async def test_each_call_is_logged_without_its_arguments(proxy, fake_upstream, caplog):
    """One log record per call names server, tool, outcome and duration; the arguments
    appear only with debug logging."""
    import logging

    caplog.set_level(logging.INFO, logger="lmbridge")
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "calc__echo", '{"text": "top-secret-argument"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("ok")))
    await proxy.post(CHAT, json=ASK)
    [record] = [r for r in caplog.records if r.getMessage() == "mcp call"]
    fields = record.fields
    assert {k: fields[k] for k in ("server", "tool", "outcome")} == {
        "server": "calc",
        "tool": "echo",
        "outcome": "ok",
    }
    assert fields["duration_ms"] >= 0
    assert "top-secret-argument" not in caplog.text
    assert all("top-secret-argument" not in str(getattr(r, "fields", "")) for r in caplog.records)

    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="lmbridge")
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "calc__echo", '{"text": "debug-visible"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("ok")))
    await proxy.post(CHAT, json=ASK)
    [debug] = [r for r in caplog.records if r.getMessage() == "mcp call arguments"]
    assert debug.fields["arguments"] == {"text": "debug-visible"}


async def test_a_tool_that_does_not_exist_is_told_to_the_model(proxy, fake_upstream):
    """A call to a name that is neither an MCP tool nor a client tool (a small model's
    invention) comes back to the model as an error listing the real tools; it is not
    handed to the client."""
    client_tool = {
        "type": "function",
        "function": {"name": "ask_user", "parameters": {"type": "object", "properties": {}}},
    }
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=tool_calls(
                ("c1", "calc__multiply", '{"a": 2, "b": 3}'), ("c2", "search_web", "{}")
            )
        ),
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("I cannot multiply.")))
    body = await (await proxy.post(CHAT, json={**ASK, "tools": [client_tool]})).json()
    assert body["choices"][0]["message"]["content"] == "I cannot multiply."
    assert body["choices"][0]["finish_reason"] == "stop"
    results = [m for m in sent(fake_upstream)["messages"] if m["role"] == "tool"]
    assert [m["tool_call_id"] for m in results] == ["c1", "c2"]
    for result, name in zip(results, ("calc__multiply", "search_web"), strict=True):
        assert f"there is no tool named '{name}'" in result["content"]
        assert "calc__add" in result["content"] and "ask_user" in result["content"]


async def test_a_changed_tool_list_is_picked_up(proxy, fake_upstream):
    """A server that adds a tool and announces it: the next request offers the new tool."""
    from proxy.keys import MCP

    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__grow", "{}"))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("grown")))
    await proxy.post(CHAT, json=ASK)
    assert "calc__triple" not in [t["function"]["name"] for t in sent(fake_upstream)["tools"]]
    supervisor = proxy.app[MCP].supervisors["calc"]
    for _ in range(200):
        if any(t.name == "triple" for t in supervisor.tools):
            break
        await asyncio.sleep(0.05)
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c2", "calc__triple", '{"n": 7}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("21")))
    await proxy.post(CHAT, json=ASK)
    assert "calc__triple" in [t["function"]["name"] for t in sent(fake_upstream, -2)["tools"]]
    assert sent(fake_upstream)["messages"][-1]["content"] == "21"
