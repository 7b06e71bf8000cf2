"""/v1/responses against the scripted fake upstream and a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3

import pytest

from proxy.keys import STORE
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk, text_stream
from tests.unit.storage_support import limit_pages

R = "/v1/responses"


def tool_call_completion(*calls: tuple[str, str, str], content: str | None = None) -> dict:
    body = chat_completion(content=content or "")
    message = body["choices"][0]["message"]
    message["content"] = content
    message["tool_calls"] = [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
        for call_id, name, args in calls
    ]
    body["choices"][0]["finish_reason"] = "tool_calls"
    return body


def sent(fake_upstream, n: int = -1) -> dict:
    """The n-th chat request the upstream received."""
    return fake_upstream.requests_to(CHAT)[n].body


async def create(proxy, **body) -> dict:
    body.setdefault("model", "test-model")
    resp = await proxy.post(R, json=body)
    assert resp.status == 200, await resp.text()
    return await resp.json()


def sse_events(raw: bytes) -> list[dict]:
    events = []
    for block in raw.decode().split("\n\n"):
        lines = block.strip().splitlines()
        data = [line[6:] for line in lines if line.startswith("data: ")]
        if not data or data[0] == "[DONE]":
            continue
        event = json.loads(data[0])
        named = [line[7:] for line in lines if line.startswith("event: ")]
        assert named == [event["type"]]
        events.append(event)
    return events


async def test_create_returns_a_complete_response_that_is_stored(proxy, fake_upstream):
    """A response carries every field, its id reads back at once, and the upstream got
    the instructions as a system message and the input as a user message."""
    body = await create(proxy, input="Hi there", instructions="Be brief.", metadata={"k": "v"})
    assert body["object"] == "response"
    assert body["id"].startswith("resp_")
    assert body["status"] == "completed"
    assert isinstance(body["created_at"], int) and isinstance(body["completed_at"], int)
    assert body["output"][0]["type"] == "message"
    assert body["output"][0]["id"].startswith("msg_")
    assert body["output"][0]["content"][0] == {
        "type": "output_text",
        "text": "Hello!",
        "annotations": [],
        "logprobs": [],
    }
    assert body["usage"] == {
        "input_tokens": 5,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 7,
    }
    for key in (
        "error",
        "incomplete_details",
        "previous_response_id",
        "max_output_tokens",
        "tools",
        "tool_choice",
        "text",
        "truncation",
        "parallel_tool_calls",
        "top_p",
        "temperature",
        "reasoning",
        "store",
        "background",
        "service_tier",
        "safety_identifier",
        "prompt_cache_key",
        "user",
        "max_tool_calls",
    ):
        assert key in body, key
    assert body["metadata"] == {"k": "v"}
    assert sent(fake_upstream)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi there"},
    ]
    stored = await (await proxy.get(f"{R}/{body['id']}")).json()
    assert stored == body


async def test_chain_of_three_turns_sends_the_whole_history(proxy, fake_upstream):
    """Each turn sees every earlier input and output; instructions are per turn; the
    earlier turns are sent exactly as before, so the upstream's prompt cache holds."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("One.")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Two.")))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Three.")))
    first = await create(proxy, input="Count: 1", instructions="Count along.")
    second = await create(proxy, input="Next", previous_response_id=first["id"])
    third = await create(
        proxy, input="Again", previous_response_id=second["id"], instructions="New rules."
    )
    assert third["previous_response_id"] == second["id"]
    assert third["instructions"] == "New rules."
    assert sent(fake_upstream, 1)["messages"] == [
        {"role": "user", "content": "Count: 1"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Next"},
    ]
    assert sent(fake_upstream, 2)["messages"] == [
        {"role": "system", "content": "New rules."},
        {"role": "user", "content": "Count: 1"},
        {"role": "assistant", "content": "One."},
        {"role": "user", "content": "Next"},
        {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "Again"},
    ]
    raw = [s.headers for s in fake_upstream.requests_to(CHAT)]
    assert raw  # the serialised history of turn 2 is a prefix of turn 3's (below)
    second_body = json.dumps(sent(fake_upstream, 1)["messages"])[1:-1]
    third_body = json.dumps(sent(fake_upstream, 2)["messages"][1:])
    assert third_body.startswith("[" + second_body)


@pytest.mark.parametrize("bad", ["resp_nope", ""])
async def test_unknown_previous_response_is_404(proxy, bad):
    """A previous_response_id that was never stored gives 404 previous_response_not_found."""
    resp = await proxy.post(
        R,
        json={
            "model": "test-model",
            "input": "x",
            "previous_response_id": bad or "resp_" + "0" * 48,
        },
    )
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "previous_response_not_found"
    assert error["param"] == "previous_response_id"


async def test_conversation_and_previous_response_together_is_400(proxy):
    """conversation and previous_response_id are exclusive."""
    resp = await proxy.post(
        R,
        json={
            "model": "test-model",
            "input": "x",
            "previous_response_id": "resp_1",
            "conversation": "conv_1",
        },
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "previous_response_id"


@pytest.mark.parametrize("body", [{}, {"input": None}, {"input": []}])
async def test_a_turn_with_nothing_to_answer_is_400(proxy, fake_upstream, body):
    """No input, no instructions, no history: the upstream would get no message at all."""
    resp = await proxy.post(R, json={"model": "test-model", **body})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["param"] == "input"
    assert "nothing to answer" in error["message"]
    assert fake_upstream.requests_to(CHAT) == []


async def test_an_empty_input_may_continue_a_chain_or_follow_instructions(proxy, fake_upstream):
    first = await create(proxy, input="Hello")
    await create(proxy, previous_response_id=first["id"], input=[])
    assert [m["role"] for m in sent(fake_upstream)["messages"]] == ["user", "assistant"]
    await create(proxy, instructions="Say something.")
    assert sent(fake_upstream)["messages"] == [{"role": "system", "content": "Say something."}]


async def test_store_false_is_neither_readable_nor_continuable(proxy):
    """With store: false nothing is kept."""
    body = await create(proxy, input="secret", store=False)
    assert body["store"] is False
    assert (await proxy.get(f"{R}/{body['id']}")).status == 404
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "x", "previous_response_id": body["id"]}
    )
    assert resp.status == 404


async def test_delete_then_404(proxy):
    """A deleted response is gone; deleting it again is 404."""
    body = await create(proxy, input="x")
    resp = await proxy.delete(f"{R}/{body['id']}")
    assert await resp.json() == {"id": body["id"], "object": "response", "deleted": True}
    assert (await proxy.get(f"{R}/{body['id']}")).status == 404
    assert (await proxy.delete(f"{R}/{body['id']}")).status == 404


async def test_input_items_are_listed_and_paged(proxy):
    """input_items lists the request's items newest first by default, with a cursor."""
    items = [{"role": "user", "content": f"m{i}"} for i in range(5)]
    body = await create(proxy, input=items)
    page = await (await proxy.get(f"{R}/{body['id']}/input_items?limit=2")).json()
    assert page["object"] == "list"
    assert [i["content"][0]["text"] for i in page["data"]] == ["m4", "m3"]
    assert page["has_more"] is True
    assert page["first_id"] == page["data"][0]["id"]
    nxt = await (
        await proxy.get(f"{R}/{body['id']}/input_items?limit=10&after={page['last_id']}")
    ).json()
    assert [i["content"][0]["text"] for i in nxt["data"]] == ["m2", "m1", "m0"]
    assert nxt["has_more"] is False
    asc = await (await proxy.get(f"{R}/{body['id']}/input_items?order=asc")).json()
    assert asc["data"][0]["content"][0]["text"] == "m0"
    for query, param in (("limit=0", "limit"), ("limit=x", "limit"), ("order=up", "order")):
        resp = await proxy.get(f"{R}/{body['id']}/input_items?{query}")
        assert resp.status == 400
        assert (await resp.json())["error"]["param"] == param
    assert (await proxy.get(f"{R}/resp_missing/input_items")).status == 404


async def test_function_tool_round_trip(proxy, fake_upstream):
    """A tool call comes back as function_call; its output goes upstream as a tool message
    with the same call id, after the assistant's tool_calls."""
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        }
    ]
    fake_upstream.add_reply(
        CHAT, Reply(json=tool_call_completion(("call_abc", "get_weather", '{"city": "Paris"}')))
    )
    first = await create(proxy, input="Weather in Paris?", tools=tools)
    call = first["output"][0]
    assert call["type"] == "function_call"
    assert call["id"].startswith("fc_")
    assert (call["call_id"], call["name"], call["arguments"]) == (
        "call_abc",
        "get_weather",
        '{"city": "Paris"}',
    )
    assert sent(fake_upstream)["tools"][0]["function"]["name"] == "get_weather"
    assert first["tools"][0]["description"] == "Weather"
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("It is sunny.")))
    second = await create(
        proxy,
        previous_response_id=first["id"],
        tools=tools,
        input=[{"type": "function_call_output", "call_id": "call_abc", "output": '{"temp": 21}'}],
    )
    assert second["output"][0]["content"][0]["text"] == "It is sunny."
    messages = sent(fake_upstream)["messages"]
    assert messages[-2]["role"] == "assistant"
    assert messages[-2]["tool_calls"][0]["id"] == "call_abc"
    assert messages[-1] == {"role": "tool", "tool_call_id": "call_abc", "content": '{"temp": 21}'}


async def test_namespace_tools_are_flattened_and_mapped_back(proxy, fake_upstream):
    """Namespace tools go upstream as <namespace>__<name> and come back with namespace set."""
    tools = [
        {
            "type": "namespace",
            "name": "agents",
            "description": "Sub-agents",
            "tools": [
                {
                    "type": "function",
                    "name": "spawn",
                    "parameters": {"type": "object", "properties": {}},
                }
            ],
        }
    ]
    fake_upstream.add_reply(CHAT, Reply(json=tool_call_completion(("c1", "agents__spawn", "{}"))))
    body = await create(proxy, input="go", tools=tools)
    assert sent(fake_upstream)["tools"][0]["function"]["name"] == "agents__spawn"
    call = body["output"][0]
    assert (call["name"], call["namespace"]) == ("spawn", "agents")
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("done")))
    await create(
        proxy,
        tools=tools,
        input=[
            {
                "type": "function_call",
                "call_id": "c1",
                "name": "spawn",
                "namespace": "agents",
                "arguments": "{}",
            },
            {"type": "function_call_output", "call_id": "c1", "output": "ok"},
        ],
    )
    assert sent(fake_upstream)["messages"][0]["tool_calls"][0]["function"]["name"] == (
        "agents__spawn"
    )


async def test_hosted_tools_are_dropped_and_mcp_refused(proxy, fake_upstream):
    """web_search and friends are dropped (Codex sends them always); an mcp tool for a
    server lmbridge does not have is a clear 400."""
    body = await create(
        proxy,
        input="x",
        tools=[{"type": "web_search"}, {"type": "function", "name": "f", "parameters": {}}],
    )
    assert body["status"] == "completed"
    assert [t["function"]["name"] for t in sent(fake_upstream)["tools"]] == ["f"]
    resp = await proxy.post(
        R,
        json={"model": "test-model", "input": "x", "tools": [{"type": "mcp", "server_label": "x"}]},
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "tools[0].server_label"


async def test_rejecting_unsupported_tools_when_configured(make_proxy):
    """With responses.unsupported_tools = "reject", a hosted tool is a 400."""
    proxy = await make_proxy(responses__unsupported_tools="reject")
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "x", "tools": [{"type": "file_search"}]}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "tools[0].type"


async def test_settings_map_to_chat_parameters(proxy, fake_upstream):
    """text.format, max_output_tokens, temperature, reasoning.effort reach the upstream."""
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion('{"a": 1}')))
    await create(
        proxy,
        input="x",
        max_output_tokens=50,
        temperature=0.2,
        top_p=0.9,
        reasoning={"effort": "low"},
        text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
    )
    body = sent(fake_upstream)
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.2 and body["top_p"] == 0.9
    assert body["reasoning_effort"] == "low"
    assert body["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "A", "schema": schema, "strict": True},
    }


async def test_length_finish_is_incomplete(proxy, fake_upstream):
    """finish_reason length gives status incomplete with reason max_output_tokens."""
    completion = chat_completion("cut")
    completion["choices"][0]["finish_reason"] = "length"
    fake_upstream.add_reply(CHAT, Reply(json=completion))
    body = await create(proxy, input="x", max_output_tokens=1)
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    stored = await (await proxy.get(f"{R}/{body['id']}")).json()
    assert stored["status"] == "incomplete"


async def test_reasoning_content_becomes_a_reasoning_item(proxy, fake_upstream):
    """Upstream reasoning_content becomes a reasoning item before the message."""
    completion = chat_completion("42")
    completion["choices"][0]["message"]["reasoning_content"] = "Let me think."
    fake_upstream.add_reply(CHAT, Reply(json=completion))
    body = await create(proxy, input="x")
    assert [i["type"] for i in body["output"]] == ["reasoning", "message"]
    assert body["output"][0]["id"].startswith("rs_")
    assert body["output"][0]["content"] == [{"type": "reasoning_text", "text": "Let me think."}]


async def test_upstream_failure_is_stored_as_failed(proxy, fake_upstream):
    """An upstream 500: the client gets the error, and the failed response is stored."""
    fake_upstream.add_reply(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x"})
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert "boom" in error["message"]
    response_id = error["message"].split("response ")[1].split(" ")[0]
    stored = await (await proxy.get(f"{R}/{response_id}")).json()
    assert stored["status"] == "failed"
    assert stored["error"]["message"] == "boom"


async def test_context_exceeded_is_400_unless_truncation_auto(proxy, fake_upstream):
    """truncation disabled: the upstream's context error is a 400 context_length_exceeded;
    truncation auto: the oldest turns are dropped and the request retried."""
    first = await create(proxy, input="old turn")
    overflow = Reply(
        status=400,
        json={
            "error": {
                "code": 400,
                "message": "the request exceeds the available context size, try increasing it",
                "type": "exceed_context_size_error",
            }
        },
    )
    fake_upstream.add_reply(CHAT, overflow)
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "new", "previous_response_id": first["id"]}
    )
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "context_length_exceeded"
    fake_upstream.add_reply(CHAT, overflow)
    body = await create(proxy, input="new", previous_response_id=first["id"], truncation="auto")
    assert body["status"] == "completed"
    assert sent(fake_upstream)["messages"] == [{"role": "user", "content": "new"}]


async def test_upstream_json_that_only_python_reads_is_not_dropped(proxy, fake_upstream):
    """An upstream written in Python may put -Infinity in a chunk (a logprob) and a
    64-bit-plus integer in a completion: the text and the value come through."""
    odd = (
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"},"logprobs":{"content":['
        b'{"token":"Hel","logprob":-Infinity}]}}]}\n\n'
    )
    fake_upstream.add_reply(CHAT, Reply(stream=[odd, chunk("lo"), chunk(finish="stop")]))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "stream": True})
    events = sse_events(await resp.read())
    assert events[-1]["type"] == "response.completed"
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "Hello"

    big = chat_completion("Fine.")
    big["system_fingerprint"] = 123456789012345678901234567890
    fake_upstream.add_reply(CHAT, Reply(json=big))
    body = await create(proxy, input="y")
    assert body["output"][0]["content"][0]["text"] == "Fine."


async def test_a_lone_surrogate_escape_is_kept_not_a_500(proxy, fake_upstream):
    """A client that cut a string inside an emoji sends "\\ud83d": the turn is answered,
    stored and sent upstream with the same escape; as an id it is simply not found."""
    raw = b'{"model": "test-model", "input": "cut \\ud83d", "metadata": {"k": "\\ud83d"}}'
    resp = await proxy.post(R, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 200, await resp.text()
    body = await resp.json()
    assert sent(fake_upstream)["messages"][-1]["content"] == "cut \ud83d"
    stored = await (await proxy.get(f"{R}/{body['id']}")).json()
    assert stored["metadata"] == {"k": "\ud83d"}
    items = await (await proxy.get(f"{R}/{body['id']}/input_items")).json()
    assert items["data"][0]["content"][0]["text"] == "cut \ud83d"
    for field in ("previous_response_id", "conversation"):
        raw = b'{"model": "test-model", "input": "x", "' + field.encode() + b'": "resp_\\ud83d"}'
        resp = await proxy.post(R, data=raw, headers={"Content-Type": "application/json"})
        assert resp.status == 404, (field, resp.status, await resp.text())
    assert (await proxy.get(f"{R}/resp_%ED%A0%BD")).status == 404
    raw = b'{"model": "test-model", "input": [{"role": "user", "content": "x", "id": "m\\ud83d"}]}'
    resp = await proxy.post(R, data=raw, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "input[0].id"


async def test_streamed_response_events(proxy, fake_upstream):
    """stream: true sends OpenAI's event sequence, each as event: + data:, then [DONE];
    the stored response equals the one in response.completed."""
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("Hel", "lo", usage=True)))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "stream": True})
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    raw = await resp.read()
    assert raw.endswith(b"data: [DONE]\n\n")
    events = sse_events(raw)
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = events[-1]["response"]
    assert final["output"][0]["content"][0]["text"] == "Hello"
    assert final["usage"]["output_tokens"] == 2
    assert {e["response"]["id"] for e in events if "response" in e} == {final["id"]}
    stored = await (await proxy.get(f"{R}/{final['id']}")).json()
    assert stored == final
    assert sent(fake_upstream)["stream_options"] == {"include_usage": True}


async def test_stream_failure_ends_with_response_failed(proxy, fake_upstream):
    """An upstream stream cut mid-answer ends with response.failed, and is stored so."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("par")], cut=True))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "stream": True})
    events = sse_events(await resp.read())
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert failed["error"]["code"] == "server_error"
    assert failed["error"]["type"] == "upstream_unavailable"
    stored = await (await proxy.get(f"{R}/{failed['id']}")).json()
    assert stored["status"] == "failed"


async def test_a_stream_whose_model_call_fails_before_any_byte_still_begins_with_created(
    make_proxy, fake_upstream
):
    """The start of a streamed response is held until its model call answers; when the
    call fails instead, the held start goes out first, then response.failed, numbered
    in one sequence, with no upstream named."""
    proxy = await make_proxy(upstream__retry_attempts=1)
    fake_upstream.add_reply(CHAT, Reply(drop=True))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "stream": True})
    assert resp.status == 200
    assert "X-LMBridge-Upstream" not in resp.headers
    events = sse_events(await resp.read())
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.failed",
    ]
    assert [e["sequence_number"] for e in events] == [0, 1, 2]
    assert events[-1]["response"]["error"]["type"] == "upstream_unavailable"


@pytest.mark.parametrize("before", [[], [chunk("par")]])
async def test_an_error_event_in_the_upstream_stream_fails_the_response(
    proxy, fake_upstream, before
):
    """An upstream that reports an error inside its stream (llama.cpp sends its failures
    this way on a 200), at its start or after text: response.failed with the upstream's
    message, stored so, and the turn is not sent again."""
    crash = {"error": {"code": 500, "message": "the model crashed", "type": "server_error"}}
    fake_upstream.add_reply(CHAT, Reply(stream=[*before, crash]))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "stream": True})
    events = sse_events(await resp.read())
    assert events[-1]["type"] == "response.failed"
    failed = events[-1]["response"]
    assert "the model crashed" in failed["error"]["message"]
    stored = await (await proxy.get(f"{R}/{failed['id']}")).json()
    assert stored["status"] == "failed"
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_replay_of_a_stored_response(proxy):
    """GET ?stream=true replays a finished response's events; starting_after skips."""
    body = await create(proxy, input="x")
    raw = await (await proxy.get(f"{R}/{body['id']}?stream=true")).read()
    events = sse_events(raw)
    assert events[0]["type"] == "response.created"
    assert events[-1]["response"] == body
    later = sse_events(
        await (await proxy.get(f"{R}/{body['id']}?stream=true&starting_after=3")).read()
    )
    assert [e["sequence_number"] for e in later] == list(range(4, len(events)))


async def test_background_response_is_polled_to_completion(proxy, fake_upstream):
    """background: true answers queued at once; the work finishes in the daemon."""
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("slow"), release, chunk(finish="stop")]))
    body = await create(proxy, input="x", background=True)
    assert body["status"] == "queued"
    assert body["background"] is True
    polled = await (await proxy.get(f"{R}/{body['id']}")).json()
    assert polled["status"] in ("queued", "in_progress")
    release.set()
    for _ in range(100):
        polled = await (await proxy.get(f"{R}/{body['id']}")).json()
        if polled["status"] == "completed":
            break
        await asyncio.sleep(0.02)
    assert polled["status"] == "completed"
    assert polled["output"][0]["content"][0]["text"] == "slow"
    events = sse_events(await (await proxy.get(f"{R}/{body['id']}?stream=true")).read())
    assert events[0]["type"] == "response.created"
    assert events[1]["type"] == "response.queued"
    assert events[-1]["type"] == "response.completed"


async def test_background_response_can_be_cancelled(proxy, fake_upstream):
    """cancel stops a running background response; it is stored as cancelled."""
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a")], stall=True))
    body = await create(proxy, input="x", background=True)
    for _ in range(100):
        if fake_upstream.requests_to(CHAT):
            break
        await asyncio.sleep(0.01)
    cancelled = await (await proxy.post(f"{R}/{body['id']}/cancel")).json()
    assert cancelled["status"] == "cancelled"
    assert (await (await proxy.get(f"{R}/{body['id']}")).json())["status"] == "cancelled"
    await asyncio.wait_for(fake_upstream.cancelled.wait(), 5)


async def test_cancel_of_a_foreground_response_is_400(proxy):
    """Only background responses can be cancelled."""
    body = await create(proxy, input="x")
    resp = await proxy.post(f"{R}/{body['id']}/cancel")
    assert resp.status == 400


async def test_background_stream_follows_live_events(proxy, fake_upstream):
    """background + stream: the events arrive live, and a second reader can join later."""
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("a"), release, chunk("b"), chunk(finish="stop")])
    )
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "x", "background": True, "stream": True}
    )
    first = await resp.content.readuntil(b"\n\n")
    response_id = json.loads(first.split(b"data: ")[1])["response"]["id"]
    # Its headers arrive while the run is held: it follows the live run.
    joiner = await proxy.get(f"{R}/{response_id}?stream=true&starting_after=1")
    release.set()
    events = sse_events(first + await resp.read())
    assert events[-1]["type"] == "response.completed"
    joined = sse_events(await joiner.read())
    assert joined[0]["sequence_number"] == 2
    assert joined[-1]["type"] == "response.completed"


async def test_conversation_lifecycle(proxy, fake_upstream):
    """A conversation holds items; a response in it sees them and appends its own."""
    conv = await (
        await proxy.post(
            "/v1/conversations",
            json={
                "items": [{"role": "user", "content": "My name is Ada."}],
                "metadata": {"topic": "names"},
            },
        )
    ).json()
    assert conv["object"] == "conversation"
    assert conv["id"].startswith("conv_")
    assert conv["metadata"] == {"topic": "names"}
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Hi Ada.")))
    body = await create(proxy, input="What is my name?", conversation=conv["id"])
    assert body["conversation"] == {"id": conv["id"]}
    assert sent(fake_upstream)["messages"] == [
        {"role": "user", "content": "My name is Ada."},
        {"role": "user", "content": "What is my name?"},
    ]
    items = await (await proxy.get(f"/v1/conversations/{conv['id']}/items?order=asc")).json()
    assert [i.get("role") for i in items["data"]] == ["user", "user", "assistant"]
    one = items["data"][2]
    got = await (await proxy.get(f"/v1/conversations/{conv['id']}/items/{one['id']}")).json()
    assert got == one
    added = await (
        await proxy.post(
            f"/v1/conversations/{conv['id']}/items",
            json={"items": [{"role": "user", "content": "Later"}]},
        )
    ).json()
    assert added["data"][0]["content"][0]["text"] == "Later"
    deleted = await proxy.delete(f"/v1/conversations/{conv['id']}/items/{one['id']}")
    assert (await deleted.json())["id"] == conv["id"]
    updated = await (
        await proxy.post(f"/v1/conversations/{conv['id']}", json={"metadata": {"topic": "other"}})
    ).json()
    assert updated["metadata"] == {"topic": "other"}
    gone = await (await proxy.delete(f"/v1/conversations/{conv['id']}")).json()
    assert gone == {"id": conv["id"], "object": "conversation.deleted", "deleted": True}
    assert (await proxy.get(f"/v1/conversations/{conv['id']}")).status == 404
    resp = await proxy.post(
        R, json={"model": "test-model", "input": "x", "conversation": conv["id"]}
    )
    assert resp.status == 404


async def test_objects_belong_to_the_key_that_created_them(make_proxy):
    """With client keys, another key gets 404 for a stored response and conversation."""
    proxy = await make_proxy(auth__api_keys=["key-a", "key-b"])
    a = {"Authorization": "Bearer key-a"}
    b = {"Authorization": "Bearer key-b"}
    resp = await proxy.post(R, json={"model": "test-model", "input": "x"}, headers=a)
    response_id = (await resp.json())["id"]
    assert (await proxy.get(f"{R}/{response_id}", headers=a)).status == 200
    assert (await proxy.get(f"{R}/{response_id}", headers=b)).status == 404
    assert (await proxy.delete(f"{R}/{response_id}", headers=b)).status == 404
    resp = await proxy.post(
        R,
        headers=b,
        json={"model": "test-model", "input": "x", "previous_response_id": response_id},
    )
    assert resp.status == 404
    conv = await (await proxy.post("/v1/conversations", json={}, headers=a)).json()
    assert (await proxy.get(f"/v1/conversations/{conv['id']}", headers=b)).status == 404


async def test_input_tokens_counts_with_the_upstream(proxy, fake_upstream):
    """input_tokens renders the input as a turn would and returns the upstream's count."""
    completion = chat_completion("x")
    completion["usage"]["prompt_tokens"] = 42
    fake_upstream.add_reply(CHAT, Reply(json=completion))
    resp = await proxy.post(f"{R}/input_tokens", json={"model": "test-model", "input": "Hello"})
    assert await resp.json() == {"object": "response.input_tokens", "input_tokens": 42}
    assert sent(fake_upstream)["max_tokens"] == 1


async def test_compact_bounds_the_summary(proxy, fake_upstream):
    """A model that never stops would hold the client until its own timeout: the summary
    is capped unless the client says how long it may be."""
    for body in ({}, {"max_output_tokens": 100}):
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion("Short.")))
        resp = await proxy.post(
            f"{R}/compact", json={"model": "test-model", "input": "We chose blue.", **body}
        )
        assert resp.status == 200
    assert sent(fake_upstream, 0)["max_tokens"] == 2048
    assert sent(fake_upstream, 1)["max_tokens"] == 100


async def test_compact_then_continue_from_the_compaction(proxy, fake_upstream):
    """compact summarises a chain into a compaction item that a later turn can start from."""
    first = await create(proxy, input="We chose the blue plan.")
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("They chose the blue plan.")))
    compacted = await (
        await proxy.post(
            f"{R}/compact", json={"model": "test-model", "previous_response_id": first["id"]}
        )
    ).json()
    assert compacted["object"] == "response.compaction"
    item = compacted["output"][0]
    assert item["type"] == "compaction" and item["encrypted_content"]
    assert "blue plan" in sent(fake_upstream)["messages"][1]["content"]
    await create(proxy, input=[item, {"role": "user", "content": "Which plan?"}])
    assert sent(fake_upstream)["messages"][0] == {
        "role": "user",
        "content": "Summary of the conversation so far:\nThey chose the blue plan.",
    }


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"input": 5}, 400, "input"),
        ({"input": [{"role": "robot", "content": "x"}]}, 400, "input[0].role"),
        ({"input": "x", "temperature": "hot"}, 400, "temperature"),
        ({"input": "x", "model": "no-such-model"}, 404, "model"),
        ({"input": "x", "background": True, "store": False}, 400, "background"),
        ({"input": [{"type": "item_reference", "id": "msg_nope"}]}, 404, "input[0].id"),
    ],
)
async def test_bad_requests_are_4xx(proxy, body, status, param):
    """Faults of the request are 4xx with the parameter named, never 5xx."""
    resp = await proxy.post(R, json={"model": "test-model", **body})
    assert resp.status == status
    assert (await resp.json())["error"]["param"] == param


async def test_item_reference_resolves_a_stored_item(proxy, fake_upstream):
    """An item_reference brings back a stored item (here an earlier output message)."""
    first = await create(proxy, input="x")
    ref = {"type": "item_reference", "id": first["output"][0]["id"]}
    await create(proxy, input=[ref, {"role": "user", "content": "and?"}])
    assert sent(fake_upstream)["messages"] == [
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "and?"},
    ]


async def test_a_database_that_cannot_be_written_is_a_503_not_a_500(proxy, caplog):
    """A full disk (or a lost writer process) answers 503 storage_unavailable in the
    OpenAI shape, with nothing acknowledged; the cause goes to the daemon's log."""
    store = proxy.server.app[STORE]
    await store._writer.submit_alone(limit_pages, 2)
    resp = await proxy.post(R, json={"model": "test-model", "input": "x" * 100_000})
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "storage_unavailable"
    assert error["type"] == "server_error"
    assert "nothing of this request was kept" in error["message"]
    assert "full" in caplog.text
    assert "Traceback" not in caplog.text


async def test_responses_go_on_after_the_writer_process_is_killed(proxy):
    """The writer process is replaced on the next write; stored responses stay readable."""
    first = await create(proxy, input="before")
    store = proxy.server.app[STORE]
    pid = store._writer.pid
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        if store._writer.pid is None:
            break
        await asyncio.sleep(0.01)
    second = await create(proxy, input="after", previous_response_id=first["id"])
    assert store._writer.pid not in (None, pid)
    for response_id in (first["id"], second["id"]):
        assert (await proxy.get(f"{R}/{response_id}")).status == 200


async def test_a_streamed_response_that_cannot_be_stored_ends_with_an_error_event(proxy, caplog):
    """The stream has begun (200 sent) when the save fails: it ends with the Responses
    API's error event instead of hanging or stopping mid-way, and the log says why."""
    store = proxy.server.app[STORE]
    await store._writer.submit_alone(limit_pages, 2)
    body = {"model": "test-model", "input": "x" * 100_000, "stream": True}
    resp = await asyncio.wait_for(proxy.post(R, json=body), 10)
    assert resp.status == 200
    events = sse_events(await asyncio.wait_for(resp.read(), 10))
    assert events[0]["type"] == "response.created"
    last = events[-1]
    assert last["type"] == "error"
    assert last["code"] == "storage_unavailable"
    assert "nothing of this request was kept" in last["message"]
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    assert "full" in caplog.text
    created = events[0]["response"]["id"]
    assert (await proxy.get(f"{R}/{created}")).status == 404


async def test_a_replay_that_fails_after_it_began_ends_with_an_error_event(proxy, caplog):
    """GET ?stream=true opens the stream, then reads the stored response: a row that
    cannot be read (here corrupted in the database file) ends the stream with the
    Responses API's error event, never a hang or a cut without a word."""
    first = await create(proxy, input="x")
    store = proxy.server.app[STORE]
    with sqlite3.connect(store.path) as conn:
        conn.execute("UPDATE responses SET body = '{broken' WHERE id = ?", (first["id"],))
    resp = await asyncio.wait_for(proxy.get(f"{R}/{first['id']}?stream=true"), 10)
    assert resp.status == 200
    events = sse_events(await asyncio.wait_for(resp.read(), 10))
    assert [e["type"] for e in events] == ["error"]
    assert events[0]["code"] == "internal_error"
    assert events[0]["sequence_number"] == 0
    assert "unhandled error" in caplog.text


async def test_a_removed_database_directory_fails_writes_and_readiness(make_proxy, tmp_path):
    """The database's directory removed under the running daemon: writes answer 503
    storage_unavailable saying the file was removed and that lmbridge must be restarted,
    and /readyz fails on storage with that reason, instead of acknowledging writes that
    a restart would lose."""
    proxy = await make_proxy(storage__path=str(tmp_path / "data" / "lmbridge.db"))
    await create(proxy, input="before")
    shutil.rmtree(tmp_path / "data")
    resp = await proxy.post(R, json={"model": "test-model", "input": "after"})
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "storage_unavailable"
    assert "removed or replaced" in error["message"]
    assert "restarted" in error["message"]
    conv = await proxy.post("/v1/conversations", json={})
    assert conv.status == 503
    ready = await proxy.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["failing"] == ["storage"]
    assert "removed or replaced" in body["checks"]["storage"]["error"]
