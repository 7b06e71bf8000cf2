"""What local models write, put into the API's shape on the way to the client: tool calls
written as text, and thinking in tags, replayed from real outputs
(tests/fixtures/model_outputs) by the scripted upstream."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai import AsyncOpenAI

from tests.fake_upstream import CHAT, Reply, chat_completion, chunk
from tests.model_outputs import load

FIXTURES = {f["id"]: f for f in load()}
HERMES = FIXTURES["qwen2.5-7b-parallel-calls"]
FALSE_POSITIVE = FIXTURES["fenced-tool-call-sample-is-text"]
MESSAGES = [{"role": "user", "content": "hi"}]


def tools_for(fixture: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}
        for name in fixture["offered"]
    ]


def deltas(content: str, step: int = 3) -> list[Any]:
    events: list[Any] = [chunk(role="assistant", content="")]
    events += [chunk(content[i : i + step]) for i in range(0, len(content), step)]
    events.append(chunk(finish="stop"))
    events.append(
        chunk(choices=False, usage={"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14})
    )
    return events


@pytest.fixture
async def client(proxy):
    """The openai SDK, pointed at the proxy."""
    async with AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0
    ) as client:
        yield client


def wanted_calls(fixture: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["name"], c["arguments"]) for c in fixture["expected"]["calls"]]


async def test_sdk_gets_tool_calls_written_as_text(client, fake_upstream):
    """client.chat.completions.create with tools: calls written as text come back as
    tool_calls, with finish_reason tool_calls and no content."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(HERMES["content"])))
    completion = await client.chat.completions.create(
        model="test-model", messages=MESSAGES, tools=tools_for(HERMES)
    )
    choice = completion.choices[0]
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == wanted_calls(
        HERMES
    )
    assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
    assert len({c.id for c in calls}) == len(calls)
    assert choice.message.content is None
    assert choice.finish_reason == "tool_calls"


async def test_sdk_streams_tool_calls_written_as_text(client, fake_upstream):
    """Streamed in small deltas: the calls arrive as tool_calls deltas, the usage chunk
    and [DONE] pass, finish_reason is tool_calls."""
    fake_upstream.add_reply(CHAT, Reply(stream=deltas(HERMES["content"])))
    stream = await client.chat.completions.create(
        model="test-model",
        messages=MESSAGES,
        tools=tools_for(HERMES),
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    content, finish, usage = "", None, None
    async for event in stream:
        usage = event.usage or usage
        for choice in event.choices:
            content += choice.delta.content or ""
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                entry = calls.setdefault(call.index, {"name": "", "arguments": ""})
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
    got = [(c["name"], json.loads(c["arguments"])) for _, c in sorted(calls.items())]
    assert got == wanted_calls(HERMES)
    assert content.strip() == ""
    assert finish == "tool_calls"
    assert usage is not None and usage.total_tokens == 14


@pytest.mark.parametrize("streamed", [False, True])
async def test_false_positive_stays_text(proxy, fake_upstream, streamed):
    """A <tool_call> sample in a fenced block is text, whole or streamed."""
    content = FALSE_POSITIVE["content"]
    reply = Reply(stream=deltas(content)) if streamed else Reply(json=chat_completion(content))
    fake_upstream.add_reply(CHAT, reply)
    body = {"model": "test-model", "messages": MESSAGES, "tools": tools_for(FALSE_POSITIVE)}
    resp = await proxy.post(CHAT, json={**body, "stream": streamed})
    if not streamed:
        message = (await resp.json())["choices"][0]["message"]
        assert message["content"] == content and "tool_calls" not in message
        return
    raw = await resp.read()
    events = [json.loads(line[6:]) for line in raw.split(b"\n") if line[6:7] == b"{"]
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    assert text == content
    assert b"tool_calls" not in raw


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_request_turns_it_off(proxy, fake_upstream, streamed):
    """ "lmbridge": {"text_tool_calls": false} leaves the content alone, and the field
    never reaches the upstream."""
    content = HERMES["content"]
    reply = Reply(stream=deltas(content)) if streamed else Reply(json=chat_completion(content))
    fake_upstream.add_reply(CHAT, reply)
    body = {
        "model": "test-model",
        "messages": MESSAGES,
        "tools": tools_for(HERMES),
        "stream": streamed,
        "lmbridge": {"text_tool_calls": False},
    }
    resp = await proxy.post(CHAT, json=body)
    raw = await resp.read()
    assert b"tool_calls" not in raw
    seen = fake_upstream.requests_to(CHAT)[0].body
    assert "lmbridge" not in seen and seen["tools"] == body["tools"]


async def test_the_setting_turns_it_off(make_proxy, fake_upstream):
    """models.text_tool_calls = false: the completion comes back as it came."""
    proxy = await make_proxy(models__text_tool_calls=False)
    upstream_body = chat_completion(HERMES["content"])
    fake_upstream.add_reply(CHAT, Reply(json=upstream_body))
    body = {"model": "test-model", "messages": MESSAGES, "tools": tools_for(HERMES)}
    resp = await proxy.post(CHAT, json=body)
    assert (await resp.json())["choices"][0]["message"]["content"] == HERMES["content"]


@pytest.mark.parametrize("hold,is_call", [(65536, True), (64, False)])
async def test_the_hold_bounds_what_a_stream_waits_for(make_proxy, fake_upstream, hold, is_call):
    """models.text_call_hold: a streamed call written longer than the bound is released
    as the text it was, as soon as the bound is passed."""
    proxy = await make_proxy(models__text_call_hold=hold)
    note = "x" * 200
    written = f'<tool_call>{{"name": "save", "arguments": {{"note": "{note}"}}}}</tool_call>'
    fake_upstream.add_reply(CHAT, Reply(stream=deltas(written, step=16)))
    tool = {"type": "function", "function": {"name": "save", "parameters": {"type": "object"}}}
    body = {"model": "test-model", "messages": MESSAGES, "tools": [tool], "stream": True}
    resp = await proxy.post(CHAT, json=body)
    events = [line[6:] for line in (await resp.text()).split("\n") if line.startswith("data: ")]
    chunks = [json.loads(e) for e in events[:-1]]
    deltas_out = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    content = "".join(d.get("content") or "" for d in deltas_out)
    calls = [c for d in deltas_out for c in d.get("tool_calls") or []]
    if is_call:
        assert content == "" and [c["function"]["name"] for c in calls] == ["save"]
    else:
        assert content == written and calls == []
        # Released before the end: the text came in several deltas, not one at the finish.
        assert sum(1 for d in deltas_out if d.get("content")) > 2


async def test_a_bad_switch_is_a_400(proxy, fake_upstream):
    """An lmbridge field that is not an object of booleans is refused, naming it."""
    body = {"model": "test-model", "messages": MESSAGES, "lmbridge": {"text_tool_calls": "no"}}
    resp = await proxy.post(CHAT, json=body)
    assert resp.status == 400
    assert (await resp.json())["error"]["param"] == "lmbridge"


async def test_structured_calls_of_the_upstream_pass_unchanged(proxy, fake_upstream):
    """A stream whose calls the upstream parsed itself reaches the client byte for byte."""
    call = {
        "index": 0,
        "id": "call_up",
        "type": "function",
        "function": {"name": "get_current_temperature", "arguments": '{"location": "Paris"}'},
    }
    events = [chunk(role="assistant", content=""), chunk(tool_calls=[call]), chunk(finish="stop")]
    fake_upstream.add_reply(CHAT, Reply(stream=events))
    body = {"model": "test-model", "messages": MESSAGES, "tools": tools_for(HERMES), "stream": True}
    raw = await (await proxy.post(CHAT, json=body)).read()
    expected = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert raw == expected + b"data: [DONE]\n\n"


THINK = FIXTURES["deepseek-r1-think-then-answer"]


def response_tools(fixture: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "name": n, "parameters": {"type": "object"}}
        for n in fixture["offered"]
    ]


async def test_sdk_responses_get_function_calls_written_as_text(client, fake_upstream):
    """client.responses.create with function tools: calls written as text come back as
    function_call items."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(HERMES["content"])))
    response = await client.responses.create(
        model="test-model", input="hi", tools=response_tools(HERMES)
    )
    calls = [item for item in response.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == wanted_calls(HERMES)
    assert all(c.call_id.startswith("call_") for c in calls)
    assert response.output_text == ""


async def test_sdk_responses_stream_function_calls_written_as_text(client, fake_upstream):
    """Streamed in small deltas: function_call items with their arguments events, and the
    final response holds them."""
    fake_upstream.add_reply(CHAT, Reply(stream=deltas(HERMES["content"])))
    stream = await client.responses.create(
        model="test-model", input="hi", tools=response_tools(HERMES), stream=True
    )
    kinds, final = [], None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.completed":
            final = event.response
    assert kinds.count("response.function_call_arguments.done") == 2
    assert "response.output_text.delta" not in kinds
    assert final is not None
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == wanted_calls(HERMES)


async def test_responses_switch_turns_it_off(client, fake_upstream):
    """ "lmbridge": {"text_tool_calls": false} on /v1/responses: the call stays text."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(HERMES["content"])))
    response = await client.responses.create(
        model="test-model",
        input="hi",
        tools=response_tools(HERMES),
        extra_body={"lmbridge": {"text_tool_calls": False}},
    )
    assert [item.type for item in response.output] == ["message"]
    assert response.output_text == HERMES["content"]
    assert "lmbridge" not in fake_upstream.requests_to(CHAT)[0].body


@pytest.mark.parametrize("streamed", [False, True])
async def test_sdk_chat_gets_reasoning_content(client, fake_upstream, streamed):
    """<think> at the start of the content is reasoning_content on chat completions,
    whole or streamed, without any tools offered."""
    content = THINK["content"]
    wanted = THINK["expected"]
    if not streamed:
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(content)))
        completion = await client.chat.completions.create(model="test-model", messages=MESSAGES)
        message = completion.choices[0].message
        assert message.model_extra["reasoning_content"] == wanted["reasoning"]
        assert message.content == wanted["text"]
        return
    fake_upstream.add_reply(CHAT, Reply(stream=deltas(content, 2)))
    stream = await client.chat.completions.create(
        model="test-model", messages=MESSAGES, stream=True
    )
    reasoning, answer = "", ""
    async for event in stream:
        for choice in event.choices:
            reasoning += (choice.delta.model_extra or {}).get("reasoning_content") or ""
            answer += choice.delta.content or ""
    assert (reasoning, answer) == (wanted["reasoning"], wanted["text"])


@pytest.mark.parametrize("streamed", [False, True])
async def test_sdk_responses_get_a_reasoning_item(client, fake_upstream, streamed):
    """<think> at the start of the content is a reasoning item on the Responses API."""
    content = THINK["content"]
    wanted = THINK["expected"]
    reply = Reply(stream=deltas(content, 2)) if streamed else Reply(json=chat_completion(content))
    fake_upstream.add_reply(CHAT, reply)
    if streamed:
        stream = await client.responses.create(model="test-model", input="hi", stream=True)
        response = None
        async for event in stream:
            if event.type == "response.completed":
                response = event.response
        assert response is not None
    else:
        response = await client.responses.create(model="test-model", input="hi")
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == wanted["reasoning"]
    assert response.output_text == wanted["text"]


async def test_think_tags_turned_off(make_proxy, fake_upstream):
    """models.think_tags = false: the content comes back as it came, and a stream
    without tools is relayed byte for byte."""
    proxy = await make_proxy(models__think_tags=False)
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(THINK["content"])))
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": MESSAGES})
    assert (await resp.json())["choices"][0]["message"]["content"] == THINK["content"]
