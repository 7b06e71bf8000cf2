"""The mcp tool of /v1/responses with a real MCP server (tests/mcp_servers/calc.py) and
the scripted fake upstream."""

from __future__ import annotations

import contextlib
import json
import sys

import httpx2
import pytest
from aiohttp import web

from proxy.mcp import transports
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk
from tests.integration.test_mcp_chat import CALC_SERVER, tool_calls
from tests.integration.test_responses import sse_events
from tests.mcp_servers.network import served_calc

R = "/v1/responses"
CALC_TOOL = {"type": "mcp", "server_label": "calc", "require_approval": "never"}


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(mcp__servers={"calc": CALC_SERVER})


async def create(proxy, **body) -> dict:
    body.setdefault("model", "test-model")
    resp = await proxy.post(R, json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def sent(fake_upstream, n: int = -1) -> dict:
    return fake_upstream.requests_to(CHAT)[n].body


async def test_mcp_loop_lists_calls_and_answers(proxy, fake_upstream):
    """An mcp tool: its tools are listed once, the model's call runs, the answer follows;
    the turn continues with the MCP steps in the chain."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 2, "b": 3}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2 + 3 = 5")))
    body = await create(proxy, input="What is 2+3?", tools=[CALC_TOOL])
    kinds = [item["type"] for item in body["output"]]
    assert kinds == ["mcp_list_tools", "mcp_call", "message"]
    listing, call, message = body["output"]
    assert listing["server_label"] == "calc" and listing["id"].startswith("mcpl_")
    assert {t["name"] for t in listing["tools"]} >= {"add", "echo"}
    add = next(t for t in listing["tools"] if t["name"] == "add")
    assert add["input_schema"]["properties"]["a"]["type"] == "integer"
    assert (call["name"], call["server_label"], call["output"], call["status"]) == (
        "add",
        "calc",
        "5",
        "completed",
    )
    assert call["id"].startswith("mcp_") and json.loads(call["arguments"]) == {"a": 2, "b": 3}
    assert message["content"][0]["text"] == "2 + 3 = 5"
    second = sent(fake_upstream)["messages"]
    assert second[-2]["tool_calls"][0] == {
        "id": call["id"],
        "type": "function",
        "function": {"name": "calc__add", "arguments": call["arguments"]},
    }
    assert second[-1] == {"role": "tool", "tool_call_id": call["id"], "content": "5"}
    assert body["usage"]["total_tokens"] == 14

    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Still 5.")))
    follow = await create(
        proxy, input="And again?", tools=[CALC_TOOL], previous_response_id=body["id"]
    )
    assert [i["type"] for i in follow["output"]] == ["message"]  # listed once per conversation
    history = sent(fake_upstream)["messages"]
    assert {"role": "tool", "tool_call_id": call["id"], "content": "5"} in history

    # Stateless, the whole history re-sent as input (as the Agents SDK does): the
    # listing in it counts, the call and its output are rendered from their items.
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("5 again.")))
    again = await create(
        proxy,
        tools=[CALC_TOOL],
        store=False,
        input=[
            {"role": "user", "content": "What is 2+3?"},
            *body["output"],
            {"role": "user", "content": "And again?"},
        ],
    )
    assert [i["type"] for i in again["output"]] == ["message"]
    resent = sent(fake_upstream)["messages"]
    assert resent[-2] == {"role": "tool", "tool_call_id": call["id"], "content": "5"} or (
        {"role": "tool", "tool_call_id": call["id"], "content": "5"} in resent
    )


async def test_streamed_mcp_events(proxy, fake_upstream):
    """Streamed: the list and call events arrive in order, with the items' output indexes,
    in the same stream as the text."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 1, "b": 1}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2")))
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "1+1", "stream": True, "tools": [CALC_TOOL]}
    )
    events = sse_events(await resp.read())
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:6] == [
        "response.output_item.added",
        "response.mcp_list_tools.in_progress",
        "response.mcp_list_tools.completed",
        "response.output_item.done",
    ]
    call_events = [e for e in events if e["type"].startswith("response.mcp_call")]
    assert [e["type"] for e in call_events] == [
        "response.mcp_call_arguments.delta",
        "response.mcp_call_arguments.done",
        "response.mcp_call.in_progress",
        "response.mcp_call.completed",
    ]
    assert {e["output_index"] for e in call_events} == {1}
    assert types[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert [i["type"] for i in final["output"]] == ["mcp_list_tools", "mcp_call", "message"]


async def test_approval_asked_then_approved(proxy, fake_upstream):
    """require_approval always: the call waits as an mcp_approval_request; approving it runs
    the call and the model continues with its result."""
    tool = {**CALC_TOOL, "require_approval": "always"}
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 4, "b": 5}'))))
    first = await create(proxy, input="4+5?", tools=[tool])
    request_item = first["output"][-1]
    assert request_item["type"] == "mcp_approval_request"
    assert first["status"] == "completed"
    assert (request_item["name"], request_item["server_label"]) == ("add", "calc")
    assert len(fake_upstream.requests_to(CHAT)) == 1
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("9")))
    second = await create(
        proxy,
        tools=[tool],
        previous_response_id=first["id"],
        input=[
            {
                "type": "mcp_approval_response",
                "approval_request_id": request_item["id"],
                "approve": True,
            }
        ],
    )
    call = second["output"][0]
    assert call["type"] == "mcp_call" and call["approval_request_id"] == request_item["id"]
    assert call["output"] == "9"
    messages = sent(fake_upstream)["messages"]
    assert messages[-2]["tool_calls"][0]["id"] == request_item["id"]
    assert messages[-1] == {"role": "tool", "tool_call_id": request_item["id"], "content": "9"}
    assert second["output"][-1]["content"][0]["text"] == "9"


async def test_approval_denied(proxy, fake_upstream):
    """Denying an approval request tells the model; nothing runs."""
    tool = {**CALC_TOOL, "require_approval": "always"}
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__pid", "{}"))))
    first = await create(proxy, input="pid?", tools=[tool])
    request_id = first["output"][-1]["id"]
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("OK, I won't.")))
    second = await create(
        proxy,
        tools=[tool],
        previous_response_id=first["id"],
        input=[
            {
                "type": "mcp_approval_response",
                "approval_request_id": request_id,
                "approve": False,
                "reason": "not now",
            }
        ],
    )
    assert [i["type"] for i in second["output"]] == ["message"]
    assert sent(fake_upstream)["messages"][-1] == {
        "role": "tool",
        "tool_call_id": request_id,
        "content": "The user denied this tool call. Reason: not now",
    }


async def test_allowed_tools_and_read_only(proxy, fake_upstream):
    """allowed_tools as names or as {read_only: true} (readOnlyHint) limits the tools."""
    await create(proxy, input="x", tools=[{**CALC_TOOL, "allowed_tools": ["echo", "pid"]}])
    assert sorted(t["function"]["name"] for t in sent(fake_upstream)["tools"]) == [
        "calc__echo",
        "calc__pid",
    ]
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("x")))
    await create(proxy, input="x", tools=[{**CALC_TOOL, "allowed_tools": {"read_only": True}}])
    assert [t["function"]["name"] for t in sent(fake_upstream)["tools"]] == ["calc__add"]


async def test_tool_choice_mcp(proxy, fake_upstream):
    """tool_choice {type: mcp, server_label, name} forces that tool upstream."""
    await create(
        proxy,
        input="x",
        tools=[CALC_TOOL],
        tool_choice={"type": "mcp", "server_label": "calc", "name": "echo"},
    )
    assert sent(fake_upstream)["tool_choice"] == {
        "type": "function",
        "function": {"name": "calc__echo"},
    }


@pytest.mark.parametrize(
    ("tool", "param"),
    [
        ({"type": "mcp", "server_label": "nope"}, "tools[0].server_label"),
        (
            {"type": "mcp", "server_label": "far", "server_url": "http://203.0.113.9/mcp"},
            "tools[0].server_url",
        ),
        ({"type": "mcp", "server_label": "x y"}, "tools[0].server_label"),
        (
            {"type": "mcp", "server_label": "c", "connector_id": "connector_gmail"},
            "tools[0].connector_id",
        ),
        (
            {"type": "mcp", "server_label": "calc", "require_approval": "sometimes"},
            "tools[0].require_approval",
        ),
    ],
)
async def test_bad_mcp_tools_are_400(proxy, fake_upstream, tool, param):
    """Unknown servers, URLs outside the allow-list and bad settings are refused; a
    refused URL is never contacted."""
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "tools": [tool]})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == param
    assert fake_upstream.requests_to(CHAT) == []


@pytest.fixture
async def remote_calc():
    async with served_calc("http") as url:
        yield url


async def test_allowed_remote_server_url(make_proxy, fake_upstream, remote_calc):
    """A server_url on the allow-list is connected for the response (streamable HTTP)."""
    proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/mcp"])
    tool = {
        "type": "mcp",
        "server_label": "far",
        "server_url": remote_calc,
        "require_approval": "never",
        "headers": {"X-Test": "1"},
    }
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "far__add", '{"a": 20, "b": 1}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("21")))
    body = await create(proxy, input="20+1", tools=[tool])
    assert [i["type"] for i in body["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    assert body["output"][1]["output"] == "21"


async def test_allowed_remote_sse_server_url(make_proxy, fake_upstream):
    """A legacy SSE server_url works through the guarded client: the message endpoint the
    server names (same origin, another path) is not a redirect and is used."""
    async with served_calc("sse") as url:
        proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/sse"])
        tool = {
            "type": "mcp",
            "server_label": "far",
            "server_url": url,
            "require_approval": "never",
        }
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls(("c1", "far__add", '{"a": 2, "b": 3}')))
        )
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("5")))
        body = await create(proxy, input="2+3", tools=[tool])
    assert [i["type"] for i in body["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    assert body["output"][1]["output"] == "5"


async def test_remote_server_needs_approval_by_default(make_proxy, fake_upstream, remote_calc):
    """As on OpenAI, a server_url's calls need approval unless require_approval says never."""
    proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/mcp"])
    tool = {"type": "mcp", "server_label": "far", "server_url": remote_calc}
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "far__add", '{"a": 1, "b": 1}'))))
    body = await create(proxy, input="1+1", tools=[tool])
    assert body["output"][-1]["type"] == "mcp_approval_request"


class Target:
    """An HTTP server on 127.0.0.1 that records what reaches it; optionally it answers
    307 to ``redirect_to`` (a path on itself, or an absolute URL)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []
        self.redirect_to: str | None = None
        self.port = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._any)
        return app

    async def _any(self, request: web.Request) -> web.StreamResponse:
        self.seen.append((request.method, request.path))
        if self.redirect_to is not None and request.path in ("/mcp", "/sse"):
            return web.Response(status=307, headers={"Location": self.redirect_to})
        return web.Response(status=404)


@pytest.fixture
async def target(aiohttp_server) -> Target:
    target = Target()
    server = await aiohttp_server(target.app())
    target.port = server.port
    return target


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:1@localhost:{port}/mcp",  # the issue: a password, not a port
        "http://127.0.0.1:{port}@localhost:{port}/mcp",
        "http://user:pw@127.0.0.1:{port}/mcp",
        "http://127.0.0.1:{port}\\@localhost:{port}/mcp",
        "http://127.0.0.1:{port}/mcp\t",
        "http://127.0.0.1:99999/mcp",
        "http://127.0.0.1:0/mcp",
        "ftp://127.0.0.1:{port}/mcp",
        "http://[::1:{port}/mcp",
        "http://127.0.0.1:{port}/x/../../admin/mcp/%2e%2e/",
        "http://127.0.0.1:{port}/mcp%2fadmin",
        "http://127.0.0.2:{port}/mcp",
        "http://0x7f000002:{port}/mcp",
    ],
)
async def test_server_urls_outside_the_allow_list_are_400_and_never_reached(
    make_proxy, fake_upstream, target, url
):
    """Userinfo, bad ports and schemes, malformed URLs and other hosts are a 400 naming
    tools[0].server_url; neither the named server nor the upstream hears anything."""
    proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/mcp"])
    tool = {"type": "mcp", "server_label": "far", "server_url": url.format(port=target.port)}
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "tools": [tool]})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["type"]) == ("tools[0].server_url", "invalid_request_error")
    assert "pw@" not in error["message"]
    assert target.seen == []
    assert fake_upstream.requests_to(CHAT) == []


@pytest.mark.parametrize(
    "spelling", ["2130706433", "0x7f000001", "127.1", "0177.0.0.1", "[::ffff:127.0.0.1]"]
)
async def test_other_spellings_of_an_allowed_host_are_that_host(
    make_proxy, fake_upstream, remote_calc, spelling
):
    """A decimal, hex, short, octal or IPv4-mapped 127.0.0.1 matches 127.0.0.1 and is
    connected as 127.0.0.1."""
    proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/mcp"])
    url = remote_calc.replace("127.0.0.1", spelling)
    tool = {"type": "mcp", "server_label": "far", "server_url": url, "require_approval": "never"}
    body = await create(proxy, input="x", tools=[tool])
    listing = body["output"][0]
    assert listing["type"] == "mcp_list_tools" and listing.get("error") is None
    assert {t["name"] for t in listing["tools"]} >= {"add"}


@pytest.mark.parametrize("path", ["/mcp", "/sse"])  # streamable HTTP, legacy SSE
@pytest.mark.parametrize("where", ["other port", "same port, other path"])
async def test_a_redirect_the_allow_list_refuses_is_not_followed(
    make_proxy, fake_upstream, aiohttp_server, target, where, path
):
    """A server_url answering 307 to a URL outside mcp.remote_servers (another port, or
    another path on the same port, which the SDK alone would follow): the connection
    fails with the reason in the listing, and the redirect's target hears nothing."""
    redirector = Target()
    server = await aiohttp_server(redirector.app())
    if where == "other port":
        redirector.redirect_to = f"http://127.0.0.1:{target.port}{path}"
        allowed = f"http://127.0.0.1:{server.port}{path}"
    else:
        redirector.redirect_to = "/admin"
        allowed = f"http://127.0.0.1:*{path}"
    proxy = await make_proxy(mcp__remote_servers=[allowed])
    tool = {
        "type": "mcp",
        "server_label": "far",
        "require_approval": "never",
        "server_url": f"http://127.0.0.1:{server.port}{path}",
    }
    body = await create(proxy, input="x", tools=[tool])
    listing = body["output"][0]
    assert listing["type"] == "mcp_list_tools" and listing["tools"] == []
    assert "which mcp.remote_servers does not allow; not followed" in listing["error"]
    assert redirector.seen and all(seen == path for _, seen in redirector.seen)
    assert target.seen == []
    assert "tools" not in sent(fake_upstream)


async def test_a_redirect_the_allow_list_accepts_is_followed(
    make_proxy, fake_upstream, remote_calc
):
    """The server's own 307 from /mcp/ to /mcp, both allowed, is followed as before."""
    proxy = await make_proxy(mcp__remote_servers=["http://127.0.0.1:*/mcp"])
    tool = {
        "type": "mcp",
        "server_label": "far",
        "server_url": remote_calc + "/",
        "require_approval": "never",
    }
    body = await create(proxy, input="x", tools=[tool])
    listing = body["output"][0]
    assert listing.get("error") is None and {t["name"] for t in listing["tools"]} >= {"add"}


async def test_an_error_quoting_a_server_url_is_shown_redacted(
    make_proxy, fake_upstream, monkeypatch, caplog
):
    """An HTTP error that quotes the server's URL (as httpx's raise_for_status does)
    reaches the listing and the log with the password and token masked. Mocked: the SDK
    in use words its own errors without the URL."""

    @contextlib.asynccontextmanager
    async def failing(url: str, **_: object):
        request = httpx2.Request("POST", url)
        response = httpx2.Response(401, request=request)
        raise httpx2.HTTPStatusError(
            f"Client error for url '{url}'", request=request, response=response
        )
        yield

    monkeypatch.setattr(transports, "streamable_http_client", failing)
    secret = {"url": "http://bob:hunter2@127.0.0.1:9/mcp?token=sk-t0ken", "start": "lazy"}
    proxy = await make_proxy(mcp__servers={"far": secret})
    body = await create(proxy, input="x", tools=[{"type": "mcp", "server_label": "far"}])
    error = body["output"][0]["error"]
    assert error == "HTTPStatusError: Client error for url 'http://***@127.0.0.1:9/mcp?token=***'"
    assert "hunter2" not in caplog.text and "sk-t0ken" not in caplog.text


async def test_a_made_up_tool_of_a_server_is_a_failed_mcp_call(proxy, fake_upstream):
    """calc__multiply (calc has no such tool, or it is not allowed here): an mcp_call
    with an error naming the offered tools, never a call to the server nor a
    function_call for the client."""
    tool = {
        "type": "mcp",
        "server_label": "calc",
        "require_approval": "never",
        "allowed_tools": ["add"],
    }
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "calc__echo", '{"text": "should not run"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Only add is there.")))
    body = await create(proxy, input="echo", tools=[tool])
    assert [i["type"] for i in body["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    call = body["output"][1]
    assert call["name"] == "echo" and call["output"] is None
    assert "there is no tool named 'echo'" in call["error"]["message"]
    assert "add" in call["error"]["message"]
    [result] = [m for m in sent(fake_upstream)["messages"] if m["role"] == "tool"]
    assert "there is no tool named 'echo'" in result["content"]


async def test_streamed_failures(make_proxy, fake_upstream):
    """A server that cannot start: mcp_list_tools.failed, a listing with its error, and
    the model answers without its tools; a tool that fails: mcp_call.failed with the
    error on the item."""
    broken = {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]}
    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER, "broken": broken})
    tools = [CALC_TOOL, {"type": "mcp", "server_label": "broken", "require_approval": "never"}]
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_calls(("c1", "calc__fail", '{"reason": "no luck"}')))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It failed.")))
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "go", "stream": True, "tools": tools}
    )
    events = sse_events(await resp.read())
    types = [e["type"] for e in events]
    assert "response.mcp_list_tools.failed" in types
    assert "response.mcp_call.failed" in types and "response.mcp_call.completed" not in types
    final = events[-1]["response"]
    assert final["status"] == "completed"
    listings = {i["server_label"]: i for i in final["output"] if i["type"] == "mcp_list_tools"}
    assert listings["broken"]["error"] and listings["broken"]["tools"] == []
    assert listings["calc"].get("error") is None
    [call] = [i for i in final["output"] if i["type"] == "mcp_call"]
    assert call["status"] == "failed" and call["output"] is None
    assert call["error"]["type"] == "mcp_tool_execution_error"
    assert "Error executing tool fail" in json.dumps(call["error"])  # the SDK masks the rest
    offered = [t["function"]["name"] for t in sent(fake_upstream, 0)["tools"]]
    assert offered and not any(name.startswith("broken__") for name in offered)


async def test_client_function_beside_mcp_call_continues_the_loop(proxy, fake_upstream):
    """One turn calls an MCP tool and a client function: the MCP call runs, the function
    call goes to the client, and previous_response_id with its output continues with
    both results in the history."""
    function = {
        "type": "function",
        "name": "ask_user",
        "parameters": {"type": "object", "properties": {"question": {"type": "string"}}},
    }
    fake_upstream.add_reply(
        CHAT,
        Reply(
            json=tool_calls(
                ("c1", "calc__add", '{"a": 2, "b": 2}'),
                ("c2", "ask_user", '{"question": "Which unit?"}'),
            )
        ),
    )
    first = await create(proxy, input="Add 2 and 2, ask the unit", tools=[CALC_TOOL, function])
    kinds = [i["type"] for i in first["output"]]
    assert kinds == ["mcp_list_tools", "mcp_call", "function_call"]
    assert first["output"][1]["output"] == "4"
    asked = first["output"][2]
    assert (asked["name"], asked["call_id"]) == ("ask_user", "c2")
    assert len(fake_upstream.requests_to(CHAT)) == 1  # the client's turn now

    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("4 metres.")))
    second = await create(
        proxy,
        tools=[CALC_TOOL, function],
        previous_response_id=first["id"],
        input=[{"type": "function_call_output", "call_id": "c2", "output": "metres"}],
    )
    assert [i["type"] for i in second["output"]] == ["message"]
    assert second["output"][0]["content"][0]["text"] == "4 metres."
    history = sent(fake_upstream)["messages"]
    calls = [c for m in history if m["role"] == "assistant" for c in m.get("tool_calls", [])]
    assert {c["function"]["name"] for c in calls} == {"calc__add", "ask_user"}
    results = {m["tool_call_id"]: m["content"] for m in history if m["role"] == "tool"}
    mcp_id = first["output"][1]["id"]
    assert results == {mcp_id: "4", "c2": "metres"}


@pytest.mark.parametrize(("asked", "rounds"), [(1, 1), (50, 3)])
async def test_mcp_max_rounds_may_lower_the_limit(make_proxy, fake_upstream, asked, rounds):
    """The mcp_max_rounds extension lowers mcp.max_rounds (3 here) for one response; it
    cannot raise it."""
    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER}, mcp__max_rounds=3)
    for n in range(rounds):
        fake_upstream.add_reply(
            CHAT, Reply(json=tool_calls((f"c{n}", "calc__add", f'{{"a": {n}, "b": 1}}')))
        )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("final")))
    body = await create(proxy, input="loop", tools=[CALC_TOOL], mcp_max_rounds=asked)
    requests = fake_upstream.requests_to(CHAT)
    assert len(requests) == rounds + 1
    assert requests[-1].body["tool_choice"] == "none"
    assert body["output"][-1]["content"][0]["text"] == "final"


async def test_bad_mcp_max_rounds_is_400(proxy):
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "mcp_max_rounds": 0})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "mcp_max_rounds"


async def test_the_loop_skips_repeats_and_stops_at_the_budget_inside_a_round(
    make_proxy, fake_upstream
):
    """The Responses loop follows the same rules as chat completions' (proxy/mcp/policy):
    a repeated identical call is answered from the first result, not run again, and a
    round with more calls than the budget left runs only those within it."""
    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER}, mcp__max_tool_calls=2)
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 1, "b": 1}'))))
    second = tool_calls(
        ("c2", "calc__add", '{"b": 1, "a": 1}'), ("c3", "calc__add", '{"a": 5, "b": 5}')
    )
    fake_upstream.add_reply(CHAT, Reply(json=second))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("2")))
    body = await create(proxy, input="1+1?", tools=[CALC_TOOL])
    first, repeated, over = [item for item in body["output"] if item["type"] == "mcp_call"]
    assert first["output"] == "2"
    assert repeated["output"].startswith("2") and "not run again" in repeated["output"]
    assert over["status"] == "failed" and "limit" in json.dumps(over["error"])
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_mcp_tool_calls_total{outcome="ok",server="calc",tool="add"} 1.0' in metrics
    final = fake_upstream.requests_to(CHAT)[-1].body
    assert final["tool_choice"] == "none"  # the budget is spent: the answer is asked for


@pytest.mark.parametrize("streamed", [False, True])
async def test_mcp_call_written_as_text_runs(proxy, fake_upstream, streamed):
    """A call to an MCP tool written as text (models.text_tool_calls, on by default) is an
    mcp_call that lmbridge runs, whole or streamed; off by the request, it is text."""
    text_call = '<tool_call>\n{"name": "calc__add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    if streamed:
        pieces = [chunk(text_call[i : i + 4]) for i in range(0, len(text_call), 4)]
        first = Reply(stream=[*pieces, chunk(finish="stop")])
        second = Reply(stream=[chunk("It is 5."), chunk(finish="stop")])
    else:
        first, second = Reply(json=chat_completion(text_call)), Reply(json=chat_completion("5."))
    fake_upstream.add_reply(CHAT, first)
    fake_upstream.add_reply(CHAT, second)
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "2+3?", "tools": [CALC_TOOL], "stream": streamed}
    )
    assert resp.status == 200
    if streamed:
        events = sse_events(await resp.read())
        body = next(e["response"] for e in events if e["type"] == "response.completed")
    else:
        body = await resp.json()
    assert [i["type"] for i in body["output"]] == ["mcp_list_tools", "mcp_call", "message"]
    call = body["output"][1]
    assert (call["name"], call["output"]) == ("add", "5")

    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(text_call)))
    off = await create(proxy, input="2+3?", tools=[CALC_TOOL], lmbridge={"text_tool_calls": False})
    assert [i["type"] for i in off["output"]] == ["mcp_list_tools", "message"]
