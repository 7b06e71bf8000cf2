"""The Responses builder reads what local models write: tool calls written as text become
function_call items, thinking in tags a reasoning item; real outputs
(tests/fixtures/model_outputs), whole and streamed in small deltas, every stream checked
like any other (sequence, item order, the SDK's own event types and accumulator)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.chat_output import ChatOutput
from proxy.model_output.think_tags import THINK
from proxy.responses.builder import ResponseBuilder
from proxy.responses.objects import response_object
from proxy.responses.render import convert_tools
from proxy.responses.request import parse_create
from tests.model_outputs import expected, load
from tests.unit.test_responses_builder import (
    CREATED_AT,
    check_stream,
    chunk,
    counter_ids,
    sdk_accumulate,
    short,
    stop,
    text,
)

FIXTURES = [f for f in load() if not (f.get("think") or {}).get("opened")]
IDS = [f["id"] for f in FIXTURES]


def builder_for(offered: list[str], *, think: bool = True) -> ResponseBuilder:
    body = {"input": "hi", "tools": [{"type": "function", "name": n} for n in offered]}
    request = parse_create(body, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    output = ChatOutput(frozenset(offered), THINK if think else None)
    return ResponseBuilder(
        response,
        convert_tools(request).names,
        ids=counter_ids(),
        clock=lambda: CREATED_AT,
        output=output,
    )


def outcome(output: list[dict[str, Any]]) -> tuple[str, list[tuple[str, Any]], str]:
    reasoning = "".join(p["text"] for i in output if i["type"] == "reasoning" for p in i["content"])
    calls = [
        (i["name"], json.loads(i["arguments"])) for i in output if i["type"] == "function_call"
    ]
    message = "".join(p["text"] for i in output if i["type"] == "message" for p in i["content"])
    return reasoning, calls, message


@pytest.mark.parametrize("step", [None, 1, 4])
@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_each_fixture(fixture, step):
    """Whole (one completion) or streamed in deltas of 1 and 4 characters, a fixture's
    calls are function_call items, its thinking a reasoning item, its text a message."""
    builder = builder_for(fixture["offered"])
    content = fixture["content"]
    truncated = (fixture.get("think") or {}).get("truncated")
    finish = "length" if truncated else "stop"
    events = builder.start()
    if step is None:
        message = {"role": "assistant", "content": content}
        events += builder.feed_completion(
            {"choices": [{"index": 0, "message": message, "finish_reason": finish}]}
        )
    else:
        for i in range(0, len(content), step):
            events += builder.feed(text(content[i : i + step]))
        events += builder.feed(stop(finish))
    events += builder.finish()
    response = builder.response
    check_stream(events, response)
    sdk_accumulate(events, [{"type": "function", "name": n} for n in fixture["offered"]])
    wanted = expected(fixture)
    reasoning, calls, message = outcome(response["output"])
    assert calls == wanted.calls
    assert reasoning == wanted.reasoning
    assert message.strip() == wanted.text.strip()
    assert all(i["call_id"].startswith("call_") for i in response["output"] if "call_id" in i)


def test_the_events_of_a_call_written_as_text():
    """Text, then a call: the message closes, the call is added, its arguments stream as
    one delta and are done when the response ends."""
    builder = builder_for(["get_weather"], think=False)
    events = builder.start()
    events += builder.feed(text("Let me check. "))
    events += builder.feed(text('<tool_call>{"name": "get_weather", '))
    events += builder.feed(text('"arguments": {"city": "Paris"}}</tool_call>'))
    events += builder.feed(stop())
    events += builder.finish()
    check_stream(events, builder.response)
    assert [short(e) for e in events] == [
        "created",
        "in_progress",
        "output_item.added@0",
        "content_part.added@0",
        "output_text.delta@0",
        "output_text.done@0",
        "content_part.done@0",
        "output_item.done@0",
        "output_item.added@1",
        "function_call_arguments.delta@1",
        "function_call_arguments.done@1",
        "output_item.done@1",
        "completed",
    ]
    call = builder.response["output"][1]
    assert (call["name"], json.loads(call["arguments"])) == ("get_weather", {"city": "Paris"})


def test_upstream_reasoning_and_calls_are_left_alone():
    """reasoning_content from the upstream: the <think> in the content stays text;
    structured calls: the text before them is not searched."""
    builder = builder_for(["f"])
    builder.start()
    builder.feed(chunk({"reasoning_content": "hmm"}))
    builder.feed(text("<think>x</think>y"))
    builder.feed(stop())
    builder.finish()
    assert outcome(builder.response["output"]) == ("hmm", [], "<think>x</think>y")


def test_off_by_default_in_the_builder():
    """Without an output to read, the content is text as it came."""
    builder = builder_for(["f"])
    plain = ResponseBuilder(builder.response, builder.names, ids=counter_ids())
    plain.start()
    plain.feed(text('<tool_call>{"name": "f", "arguments": {}}</tool_call>'))
    plain.finish()
    assert outcome(plain.response["output"])[1] == []
