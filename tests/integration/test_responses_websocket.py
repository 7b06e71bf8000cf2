"""The WebSocket mode of /v1/responses, with aiohttp's WebSocket client, against the
scripted fake upstream and a real SQLite file."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3

import aiohttp
import pytest

from proxy.keys import METRICS
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk

R = "/v1/responses"
TERMINAL = {"response.completed", "response.failed", "response.incomplete"}


async def turn(ws, **body) -> list[dict]:
    """Send one response.create; the events until the turn's last (terminal or error)."""
    body.setdefault("model", "test-model")
    await ws.send_str(json.dumps({"type": "response.create", **body}))
    return await events_of_turn(ws)


async def events_of_turn(ws) -> list[dict]:
    events = []
    while True:
        message = await asyncio.wait_for(ws.receive(), 10)
        assert message.type == aiohttp.WSMsgType.TEXT, message
        event = json.loads(message.data)
        events.append(event)
        if event["type"] in TERMINAL or event["type"] == "error":
            return events


def sent_messages(fake_upstream, n: int = -1) -> list[dict]:
    return fake_upstream.requests_to(CHAT)[n].body["messages"]


def rows(tmp_path, table: str = "responses") -> int:
    with sqlite3.connect(tmp_path / "lmbridge.db") as conn:
        return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


async def test_a_turn_streams_the_same_events_as_sse(proxy, fake_upstream):
    """One response.create: the events of an SSE stream, one JSON text message each,
    numbered from 0, ending with response.completed; the response is stored."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("Hel"), chunk("lo"), chunk(finish="stop")]))
    async with proxy.ws_connect(R) as ws:
        events = await turn(ws, input="hi")
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in types
    assert types[-1] == "response.completed"
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    stored = await (await proxy.get(f"{R}/{final['id']}")).json()
    assert stored["status"] == "completed" and stored["id"] == final["id"]
    # The upstream was asked for a stream, as for an SSE client.
    assert fake_upstream.requests_to(CHAT)[-1].body["stream"] is True


async def test_turns_run_one_at_a_time_in_order(proxy, fake_upstream):
    """Two response.create sent at once: the second starts after the first ended."""
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("one"), release, chunk(finish="stop")]))
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("two"), chunk(finish="stop")]))
    async with proxy.ws_connect(R) as ws:
        for text in ("first", "second"):
            await ws.send_str(
                json.dumps({"type": "response.create", "model": "test-model", "input": text})
            )
        first_events = []
        while len(first_events) < 3:
            first_events.append(json.loads((await ws.receive()).data))
        assert len(fake_upstream.requests_to(CHAT)) == 1  # the second waits its turn
        release.set()
        first = await events_of_turn(ws)
        second = await events_of_turn(ws)
    assert first[-1]["response"]["output"][0]["content"][0]["text"] == "one"
    assert second[0]["sequence_number"] == 0
    assert second[-1]["response"]["output"][0]["content"][0]["text"] == "two"
    assert [m["content"] for m in sent_messages(fake_upstream, 1)] == ["second"]


async def test_store_false_chain_lives_in_the_connection(proxy, fake_upstream, tmp_path):
    """store: false continuations read the connection's memory: the model sees the whole
    chain, and nothing is ever written to SQLite."""
    for text in ("A", "B", "C"):
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(text)))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one", store=False))[-1]["response"]
        second = (await turn(ws, input="two", store=False, previous_response_id=first["id"]))[-1][
            "response"
        ]
        third = await turn(ws, input="three", store=False, previous_response_id=second["id"])
    assert third[-1]["type"] == "response.completed"
    assert [(m["role"], m["content"]) for m in sent_messages(fake_upstream)] == [
        ("user", "one"),
        ("assistant", "A"),
        ("user", "two"),
        ("assistant", "B"),
        ("user", "three"),
    ]
    assert rows(tmp_path) == 0
    assert (await proxy.get(f"{R}/{first['id']}")).status == 404


async def test_store_false_id_unknown_to_the_connection_is_not_found(proxy, fake_upstream):
    """Another connection (or a restart) does not hold it: previous_response_not_found, as
    the error envelope; the connection stays usable."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("B")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one", store=False))[-1]["response"]
    async with proxy.ws_connect(R) as ws:
        [error] = await turn(ws, input="two", store=False, previous_response_id=first["id"])
        assert error["type"] == "error"
        assert error["status"] == 404
        assert error["error"]["code"] == "previous_response_not_found"
        assert error["error"]["param"] == "previous_response_id"
        again = await turn(ws, input="one, then two")  # a new chain on the same socket
    assert again[-1]["type"] == "response.completed"


async def test_store_true_continues_from_storage_on_a_new_connection(proxy, fake_upstream):
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("B")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one"))[-1]["response"]
    async with proxy.ws_connect(R) as ws:
        second = await turn(ws, input="two", previous_response_id=first["id"])
    assert second[-1]["type"] == "response.completed"
    assert [m["content"] for m in sent_messages(fake_upstream)] == ["one", "A", "two"]


async def test_a_failed_continuation_forgets_what_it_continued(proxy, fake_upstream):
    """A continuation that fails (here a model the upstream does not list) evicts the
    response it continued: naming it again is previous_response_not_found."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one", store=False))[-1]["response"]
        [failed] = await turn(
            ws, model="no-such-model", input="two", store=False, previous_response_id=first["id"]
        )
        assert failed["error"]["code"] == "model_not_found"
        [gone] = await turn(ws, input="two", store=False, previous_response_id=first["id"])
    assert gone["error"]["code"] == "previous_response_not_found"


@pytest.mark.parametrize(
    ("message", "code", "param"),
    [
        ("not json", "invalid_request", None),
        ("[1, 2]", "invalid_request", "type"),
        ('{"type": "response.cancel"}', "unknown_message_type", "type"),
        ('{"model": "test-model", "input": "x"}', "unknown_message_type", "type"),
        ('{"type": "response.create", "model": "test-model", "stream": false}', None, "stream"),
        (
            '{"type": "response.create", "model": "test-model", "background": true}',
            None,
            "background",
        ),
        (
            '{"type": "response.create", "model": "test-model", "stream_options": {}}',
            None,
            "stream_options",
        ),
        ('{"type": "response.create", "model": "test-model", "input": 5}', None, "input"),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays(
    proxy, fake_upstream, message, code, param
):
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("fine")))
    async with proxy.ws_connect(R) as ws:
        await ws.send_str(message)
        [error] = await events_of_turn(ws)
        assert error["type"] == "error" and error["status"] == 400
        assert error["error"]["param"] == param
        if code is not None:
            assert error["error"]["code"] == code
        after = await turn(ws, input="still there?")
    assert after[-1]["type"] == "response.completed"


async def test_binary_messages_are_refused(proxy, fake_upstream):
    async with proxy.ws_connect(R) as ws:
        await ws.send_bytes(b'{"type": "response.create"}')
        [error] = await events_of_turn(ws)
    assert error["status"] == 400 and "text messages" in error["error"]["message"]


async def test_get_without_upgrade_says_how_to_use_it(proxy):
    resp = await proxy.get(R)
    assert resp.status == 426
    body = await resp.json()
    assert body["error"]["code"] == "upgrade_required"
    assert "POST /v1/responses" in body["error"]["message"]


async def test_keys_and_ownership_apply(make_proxy, fake_upstream):
    """The upgrade needs a client key; what one key's socket stores, another key's socket
    cannot continue."""
    proxy = await make_proxy(auth__api_keys=["key-a", "key-b"])
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await proxy.ws_connect(R)
    assert refused.value.status == 401
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    async with proxy.ws_connect(R, headers={"Authorization": "Bearer key-a"}) as ws:
        first = (await turn(ws, input="one"))[-1]["response"]
    async with proxy.ws_connect(R, headers={"Authorization": "Bearer key-b"}) as ws:
        [error] = await turn(ws, input="two", previous_response_id=first["id"])
    assert error["error"]["code"] == "previous_response_not_found"


async def test_a_foreign_web_page_cannot_open_a_socket(proxy):
    """Cross-site WebSocket hijacking: a browser's handshake carries its page's origin."""
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await proxy.ws_connect(R, headers={"Origin": "https://evil.example"})
    assert refused.value.status == 403
    with pytest.raises(aiohttp.WSServerHandshakeError) as rebound:
        await proxy.ws_connect(R, headers={"Host": "attacker.example:1234"})
    assert rebound.value.status == 403


async def test_a_client_gone_mid_turn_cancels_the_upstream_request(proxy, fake_upstream):
    """The client closes during a turn: the upstream request is closed and the partial
    response stored as cancelled, as on HTTP."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("partial")], stall=True))
    async with proxy.ws_connect(R) as ws:
        await ws.send_str(
            json.dumps({"type": "response.create", "model": "test-model", "input": "x"})
        )
        created = json.loads((await ws.receive()).data)
        while True:  # until the upstream's first words arrived
            event = json.loads((await ws.receive()).data)
            if event["type"] == "response.output_text.delta":
                break
    await asyncio.wait_for(fake_upstream.cancelled.wait(), 10)
    response_id = created["response"]["id"]
    for _ in range(500):  # stored as the turn ends, after the upstream request closed
        resp = await proxy.get(f"{R}/{response_id}")
        if resp.status == 200:
            break
        await asyncio.sleep(0.01)
    stored = await resp.json()
    assert stored["status"] == "cancelled"
    assert stored["output"][0]["content"][0]["text"] == "partial"


async def test_metrics_count_connections_turns_and_errors(proxy, fake_upstream):
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    metrics = proxy.server.app[METRICS]
    async with proxy.ws_connect(R) as ws:
        await turn(ws, input="one")
        await ws.send_str("nope")
        await events_of_turn(ws)
        assert metrics.websocket_connections == 1
        text = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_websocket_turns_total{outcome="completed"} 1.0' in text
    assert 'lmbridge_websocket_errors_total{code="invalid_request"} 1.0' in text
    assert "lmbridge_websocket_connections 1.0" in text


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def tool_call_completion(call_id: str, name: str, arguments: str) -> dict:
    body = chat_completion("")
    message = body["choices"][0]["message"]
    message["content"] = None
    message["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    ]
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


async def test_a_function_tool_loop_continues_from_memory(proxy, fake_upstream, tmp_path):
    """The agent loop of a coding client: the model calls the client's tool; the next
    turn sends only the tool's output, continuing from the connection's memory."""
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_call_completion("call_1", "get_weather", '{"city": "Oslo"}'))
    )
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Sunny in Oslo.")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="Weather?", tools=[WEATHER], store=False))[-1]["response"]
        [call] = first["output"]
        assert (call["type"], call["call_id"], call["name"]) == (
            "function_call",
            "call_1",
            "get_weather",
        )
        output = {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}
        second = await turn(
            ws, input=[output], tools=[WEATHER], store=False, previous_response_id=first["id"]
        )
    assert second[-1]["response"]["output"][0]["content"][0]["text"] == "Sunny in Oslo."
    messages = sent_messages(fake_upstream)
    assert messages[-2]["tool_calls"][0]["id"] == "call_1"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}
    assert rows(tmp_path) == 0


async def test_an_output_for_no_call_fails_the_turn(proxy, fake_upstream):
    """The Open Responses suite's way to fail a continuation: an output no call asked for
    is a 400, before the model is asked; on HTTP too."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one", store=False))[-1]["response"]
        stray = {"type": "function_call_output", "call_id": "call_missing", "output": "x"}
        [error] = await turn(ws, input=[stray], store=False, previous_response_id=first["id"])
    assert error["status"] == 400 and error["error"]["param"] == "input[0].call_id"
    assert len(fake_upstream.requests_to(CHAT)) == 1
    resp = await proxy.post(R, json={"model": "test-model", "input": [stray]})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "input[0].call_id"


async def test_generate_false_records_the_turn_without_asking_the_model(proxy, fake_upstream):
    """Codex's warm-up: instructions and tools sent ahead with generate: false; the next
    turn continues from it and the model sees them."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Hi!")))
    developer = {"role": "developer", "content": "You are terse."}
    async with proxy.ws_connect(R) as ws:
        warm = await turn(ws, input=[developer], tools=[WEATHER], store=False, generate=False)
        assert warm[-1]["type"] == "response.completed"
        assert warm[-1]["response"]["output"] == []
        assert fake_upstream.requests_to(CHAT) == []
        await turn(
            ws,
            input="hello",
            tools=[WEATHER],
            store=False,
            previous_response_id=warm[-1]["response"]["id"],
        )
    assert [(m["role"], m["content"]) for m in sent_messages(fake_upstream)] == [
        ("system", "You are terse."),
        ("user", "hello"),
    ]


async def test_conversations_over_the_socket(proxy, fake_upstream):
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("B")))
    conversation = await (await proxy.post("/v1/conversations", json={})).json()
    async with proxy.ws_connect(R) as ws:
        await turn(ws, input="one", conversation=conversation["id"])
        second = await turn(ws, input="two", conversation=conversation["id"])
    assert second[-1]["type"] == "response.completed"
    assert [m["content"] for m in sent_messages(fake_upstream)] == ["one", "A", "two"]
    items = await (await proxy.get(f"/v1/conversations/{conversation['id']}/items")).json()
    assert len(items["data"]) == 4


async def test_compact_then_a_new_chain_on_the_socket(proxy, fake_upstream):
    """/v1/responses/compact over HTTP, then its window as the input of a new chain."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("They chose blue.")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Blue.")))
    compacted = await (
        await proxy.post(
            f"{R}/compact",
            json={"model": "test-model", "input": [{"role": "user", "content": "We chose blue."}]},
        )
    ).json()
    async with proxy.ws_connect(R) as ws:
        events = await turn(
            ws,
            input=[*compacted["output"], {"role": "user", "content": "Which?"}],
            store=False,
            tools=[],
        )
    assert events[-1]["type"] == "response.completed"
    assert "They chose blue." in sent_messages(fake_upstream)[0]["content"]


async def test_mcp_tools_list_call_and_ask_for_approval(make_proxy, fake_upstream):
    from tests.integration.test_mcp_chat import CALC_SERVER, tool_calls

    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER})
    calc = {"type": "mcp", "server_label": "calc", "require_approval": "never"}
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a": 2, "b": 3}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("5")))
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c2", "calc__add", '{"a": 4, "b": 5}'))))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("9")))
    async with proxy.ws_connect(R) as ws:
        first = await turn(ws, input="2+3?", tools=[calc])
        types = [e["type"] for e in first]
        assert "response.mcp_list_tools.completed" in types
        assert "response.mcp_call.completed" in types
        final = first[-1]["response"]
        assert [i["type"] for i in final["output"]] == ["mcp_list_tools", "mcp_call", "message"]
        asking = {**calc, "require_approval": "always"}
        second = (await turn(ws, input="4+5?", tools=[asking], previous_response_id=final["id"]))[
            -1
        ]["response"]
        request_item = second["output"][-1]
        assert request_item["type"] == "mcp_approval_request"
        approval = {
            "type": "mcp_approval_response",
            "approval_request_id": request_item["id"],
            "approve": True,
        }
        third = (
            await turn(ws, input=[approval], tools=[asking], previous_response_id=second["id"])
        )[-1]["response"]
    assert third["output"][0]["type"] == "mcp_call" and third["output"][0]["output"] == "9"
    assert third["output"][-1]["content"][0]["text"] == "9"


async def test_the_connection_ends_at_its_age_limit(make_proxy, fake_upstream):
    """At responses.websocket_max_age the turn running finishes, then the error
    websocket_connection_limit_reached, then the close."""
    proxy = await make_proxy(responses__websocket_max_age=0.5)
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("slow"), release, chunk(finish="stop")]))
    async with proxy.ws_connect(R) as ws:
        await ws.send_str(
            json.dumps({"type": "response.create", "model": "test-model", "input": "x"})
        )
        assert json.loads((await ws.receive()).data)["type"] == "response.created"
        await asyncio.sleep(0.6)  # past the limit, the turn still held upstream
        release.set()
        events = await events_of_turn(ws)
        assert events[-1]["type"] == "response.completed"
        [limit] = await events_of_turn(ws)
        assert limit["error"]["code"] == "websocket_connection_limit_reached"
        assert limit["status"] == 400
        closing = await asyncio.wait_for(ws.receive(), 10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_an_idle_connection_at_its_limit_is_told_and_closed(make_proxy):
    proxy = await make_proxy(responses__websocket_max_age=0.2)
    async with proxy.ws_connect(R) as ws:
        [limit] = await events_of_turn(ws)
        assert limit["error"]["code"] == "websocket_connection_limit_reached"
        closing = await asyncio.wait_for(ws.receive(), 10)
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)


async def test_shutdown_lets_the_running_turn_end_then_closes(make_config, fake_upstream):
    """SIGTERM's drain: a turn running is finished and delivered, then the connection is
    closed as going away (1001)."""
    from proxy.app import create_app
    from proxy.serve import listening

    config = make_config(server__port=0)
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("last"), release, chunk(finish="stop")]))
    async with aiohttp.ClientSession() as session, contextlib.AsyncExitStack() as stack:
        runner = await stack.enter_async_context(listening(create_app(config), config.server))
        port = runner.addresses[0][1]
        ws = await session.ws_connect(f"http://127.0.0.1:{port}{R}")
        await ws.send_str(
            json.dumps({"type": "response.create", "model": "test-model", "input": "x"})
        )
        assert json.loads((await ws.receive()).data)["type"] == "response.created"
        stopping = asyncio.ensure_future(stack.aclose())  # what SIGTERM leads to
        release.set()
        events = await events_of_turn(ws)
        closing = await asyncio.wait_for(ws.receive(), 10)
        await stopping
    assert events[-1]["type"] == "response.completed"
    assert closing.type == aiohttp.WSMsgType.CLOSE and closing.data == 1001


async def test_the_openai_sdk_connects_over_a_websocket(proxy, fake_upstream):
    """The openai SDK's own WebSocket client (client.responses.connect): a turn, then a
    store: false continuation on the same connection."""
    from openai import AsyncOpenAI

    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("Hel"), chunk("lo"), chunk(finish="stop")]))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Again.")))
    client = AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0)
    async with client.responses.connect() as connection:
        await connection.response.create(model="test-model", input="hi", store=False)
        kinds = []
        async for event in connection:
            kinds.append(event.type)
            if event.type == "response.completed":
                first = event.response
                break
        assert first.output_text == "Hello"
        await connection.response.create(
            model="test-model", input="more", store=False, previous_response_id=first.id
        )
        async for event in connection:
            if event.type == "response.completed":
                second = event.response
                break
    assert kinds[0] == "response.created" and "response.output_text.delta" in kinds
    assert second.output_text == "Again." and second.previous_response_id == first.id
    assert [m["content"] for m in sent_messages(fake_upstream)] == ["hi", "Hello", "more"]
    await client.close()


async def test_an_upstream_failure_fails_the_turn_and_forgets_what_it_continued(
    proxy, fake_upstream
):
    """The upstream answers 500 to a continuation: the turn ends response.failed (the
    stream had begun), the response it continued is forgotten, the socket stays usable."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("A")))
    fake_upstream.add_reply(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("fresh")))
    async with proxy.ws_connect(R) as ws:
        first = (await turn(ws, input="one", store=False))[-1]["response"]
        failed = await turn(ws, input="two", store=False, previous_response_id=first["id"])
        assert failed[-1]["type"] == "response.failed"
        assert failed[-1]["response"]["error"]["code"]
        [gone] = await turn(ws, input="two", store=False, previous_response_id=first["id"])
        assert gone["error"]["code"] == "previous_response_not_found"
        fresh = await turn(ws, input="start again", store=False)
    assert fresh[-1]["response"]["output"][0]["content"][0]["text"] == "fresh"
