"""ResponseBuilder and replay_events: chat completion output -> Responses events and object.

Every emitted event is validated with the openai SDK's own ``ResponseStreamEvent``
type and fed through the SDK's stream accumulator (``ResponseStreamState``, what
``client.responses.stream(...).get_final_response()`` uses).
"""

from __future__ import annotations

import copy
import itertools
import json
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter, ValidationError

from proxy.errors import CircuitOpen, UpstreamStatus, UpstreamTimeout, UpstreamUnavailable
from proxy.responses import failures
from proxy.responses.builder import ResponseBuilder
from proxy.responses.objects import list_page, response_object
from proxy.responses.render import convert_tools
from proxy.responses.replay import replay_events
from proxy.responses.request import parse_create
from proxy.usage import usage_from_chat

EVENT = TypeAdapter(ResponseStreamEvent)
# The union's members by their ``type``, to report a failed validation readably.
EVENT_CLASSES = {
    typing.get_args(cls.model_fields["type"].annotation)[0]: cls
    for cls in typing.get_args(typing.get_args(ResponseStreamEvent)[0])
}
CREATED_AT = 1700000000
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def counter_ids() -> Callable[[str], str]:
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}
LOOKUP = {"type": "function", "name": "lookup"}
FILES = {
    "type": "namespace",
    "name": "fs",
    "description": "Files",
    "tools": [{"type": "function", "name": "read", "description": "Read a file"}],
}
TOOLS_BODY: dict[str, Any] = {"input": "hi", "tools": [WEATHER, LOOKUP, FILES]}


def make_builder(
    body: dict[str, Any] | None = None, *, max_tool_calls: int | None = None
) -> ResponseBuilder:
    request = parse_create(body or TOOLS_BODY, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    return ResponseBuilder(
        response,
        convert_tools(request).names,
        ids=counter_ids(),
        max_tool_calls=max_tool_calls,
        clock=lambda: CREATED_AT,
    )


# --- chat completion chunks ---------------------------------------------------------


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish}],
    }


def text(s: str) -> dict[str, Any]:
    return chunk({"content": s})


def stop(reason: str = "stop") -> dict[str, Any]:
    return chunk(finish=reason)


def call(
    index: int | None,
    *,
    id: str | None = None,
    name: str | None = None,
    args: Any = None,
    typed: bool = False,
) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if index is not None:
        delta["index"] = index
    if id is not None:
        delta["id"] = id
    if typed or id is not None:
        delta["type"] = "function"
    function: dict[str, Any] = {}
    if name is not None:
        function["name"] = name
    if args is not None:
        function["arguments"] = args
    delta["function"] = function
    return delta


def calls(*deltas: dict[str, Any]) -> dict[str, Any]:
    return chunk({"tool_calls": list(deltas)})


def llama(arguments: str, *, call_id: str = "call_ll", name: str = "get_weather") -> dict[str, Any]:
    """llama-cpp-python repeats id, type and the whole name in every delta."""
    return calls(call(0, id=call_id, name=name, args=arguments))


CHAT_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 30,
    "total_tokens": 150,
    "prompt_tokens_details": {"cached_tokens": 100},
    "completion_tokens_details": {"reasoning_tokens": 12},
}
USAGE = {
    "input_tokens": 120,
    "input_tokens_details": {"cached_tokens": 100, "cache_write_tokens": 0},
    "output_tokens": 30,
    "output_tokens_details": {"reasoning_tokens": 12},
    "total_tokens": 150,
}
USAGE_CHUNK = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "choices": [],
    "usage": CHAT_USAGE,
}


# --- running and checking -------------------------------------------------------------


@dataclass
class Case:
    name: str
    chunks: list[dict[str, Any]]
    events: list[str]
    output: list[tuple[Any, ...]]
    status: str = "completed"
    incomplete: str | None = None
    end: str = "finish"
    body: dict[str, Any] = field(default_factory=lambda: TOOLS_BODY)
    max_tool_calls: int | None = None
    usage: dict[str, Any] | None = None


def run(case: Case) -> tuple[ResponseBuilder, list[dict[str, Any]]]:
    builder = make_builder(case.body, max_tool_calls=case.max_tool_calls)
    events = builder.start()
    for c in case.chunks:
        events += builder.feed(c)
    if case.end == "finish":
        events += builder.finish()
    elif case.end == "fail":
        events += builder.fail("server_error", "The upstream went away.")
    else:
        events += builder.cancel()
    return builder, events


def short(event: dict[str, Any]) -> str:
    name = event["type"].removeprefix("response.")
    return f"{name}@{event['output_index']}" if "output_index" in event else name


def summary(output: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """(type, status, ...) of each output item: the text, or namespace/name/call_id/args."""
    out: list[tuple[Any, ...]] = []
    for item in output:
        if item["type"] == "message":
            out.append(("message", item["status"], "".join(p["text"] for p in item["content"])))
        elif item["type"] == "reasoning":
            out.append(("reasoning", item["status"], "".join(p["text"] for p in item["content"])))
        else:
            out.append(
                (
                    "function_call",
                    item["status"],
                    item.get("namespace"),
                    item["name"],
                    item["call_id"],
                    item["arguments"],
                )
            )
    return out


def validate_event(event: dict[str, Any]) -> Any:
    """The event as the SDK's ResponseStreamEvent; on failure, the error of its own type."""
    try:
        return EVENT.validate_python(event)
    except ValidationError:
        cls = EVENT_CLASSES.get(event.get("type"))
        if cls is not None:
            cls.model_validate(event)
        raise


def check_stream(events: list[dict[str, Any]], response: dict[str, Any]) -> None:
    """What every stream must satisfy, for the SDK and for any strict client."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        parsed = validate_event(event)  # raises on a missing or ill-typed field
        assert parsed.type == event["type"]
    assert events[0]["type"] == "response.created"
    assert events[-1]["type"] in TERMINAL
    assert sum(e["type"] in TERMINAL for e in events) == 1
    assert events[-1]["response"] == response
    assert all(e["response"]["id"] == response["id"] for e in events if "response" in e)

    output = response["output"]
    added = [e for e in events if e["type"] == "response.output_item.added"]
    done = [e for e in events if e["type"] == "response.output_item.done"]
    assert [e["output_index"] for e in added] == list(range(len(output)))
    assert sorted(e["output_index"] for e in done) == list(range(len(output)))
    for event in added:
        assert event["item"]["id"] == output[event["output_index"]]["id"]
        assert event["item"]["status"] == "in_progress"
    for event in done:
        assert event["item"] == output[event["output_index"]]

    opened: set[int] = set()
    closed: set[int] = set()
    parts: set[tuple[int, int]] = set()
    for event in events:
        if "output_index" not in event:
            continue
        index = event["output_index"]
        assert 0 <= index < len(output)
        if "item_id" in event:
            assert event["item_id"] == output[index]["id"]
        if event["type"] == "response.output_item.added":
            opened.add(index)
            continue
        assert index in opened, f"{event['type']} before its item was added"
        assert index not in closed, f"{event['type']} after its item was done"
        if event["type"] == "response.output_item.done":
            closed.add(index)
        elif event["type"] == "response.content_part.added":
            parts.add((index, event["content_index"]))
        elif "content_index" in event:
            assert (index, event["content_index"]) in parts, f"{event['type']} before its part"

    for index, item in enumerate(output):
        mine = [e for e in events if e.get("output_index") == index]
        if item["type"] == "message":
            deltas = "".join(e["delta"] for e in mine if e["type"] == "response.output_text.delta")
            dones = [e["text"] for e in mine if e["type"] == "response.output_text.done"]
            assert dones == [deltas] == [item["content"][0]["text"]]
        elif item["type"] == "reasoning":
            deltas = "".join(
                e["delta"] for e in mine if e["type"] == "response.reasoning_text.delta"
            )
            dones = [e["text"] for e in mine if e["type"] == "response.reasoning_text.done"]
            assert dones == [deltas] == [item["content"][0]["text"]]
        elif item["type"] == "function_call":
            deltas = "".join(
                e["delta"] for e in mine if e["type"] == "response.function_call_arguments.delta"
            )
            dones = [
                e["arguments"] for e in mine if e["type"] == "response.function_call_arguments.done"
            ]
            assert dones == [deltas] == [item["arguments"]]
    Response.model_validate(response)


def sdk_accumulate(
    events: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> tuple[ResponseStreamState[None], list[Any]]:
    """Feed the events through the SDK's own stream state, as ``responses.stream`` does."""
    state: ResponseStreamState[None] = ResponseStreamState(
        input_tools=tools if tools is not None else omit, text_format=omit
    )
    fired: list[Any] = []
    for event in events:
        fired += state.handle_event(validate_event(event))
    return state, fired


def expected_text(output: list[dict[str, Any]]) -> str:
    return "".join(
        p["text"]
        for item in output
        if item["type"] == "message"
        for p in item["content"]
        if p["type"] == "output_text"
    )


def check_sdk(events: list[dict[str, Any]], response: dict[str, Any]) -> None:
    """The SDK accumulator accepts the stream and ends with our text and function calls."""
    state, fired = sdk_accumulate(events, TOOLS_BODY["tools"])
    output = response["output"]
    calls_out = [
        (i.get("namespace"), i["name"], i["call_id"], i["arguments"])
        for i in output
        if i["type"] == "function_call"
    ]
    final = state._completed_response
    if response["status"] == "completed":
        assert final is not None
        assert final.id == response["id"]
        assert final.output_text == expected_text(output)
        got = [
            (o.namespace, o.name, o.call_id, o.arguments)
            for o in final.output
            if o.type == "function_call"
        ]
        assert got == calls_out
        for o in final.output:
            if o.type == "function_call" and o.name == "get_weather":  # the strict tool
                assert o.parsed_arguments == json.loads(o.arguments)
        assert fired[-1].type == "response.completed"
    else:
        assert final is None
        assert fired[-1].type == events[-1]["type"]
        assert fired[-1].response.output_text == expected_text(output)


# --- the table -------------------------------------------------------------------------

OPEN_PART = ["output_item.added@{i}", "content_part.added@{i}"]
TEXT_DONE = ["output_text.done@{i}", "content_part.done@{i}", "output_item.done@{i}"]
REASONING_DONE = ["reasoning_text.done@{i}", "content_part.done@{i}", "output_item.done@{i}"]
CALL_DONE = ["function_call_arguments.done@{i}", "output_item.done@{i}"]


def at(index: int, names: list[str]) -> list[str]:
    return [n.format(i=index) for n in names]


def repeat(name: str, times: int) -> list[str]:
    return [name] * times


START = ["created", "in_progress"]

CASES = [
    Case(
        "plain-text",
        [
            chunk({"role": "assistant", "content": ""}),
            text("Hel"),
            text("lo"),
            text(" world"),
            stop(),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            *repeat("output_text.delta@0", 3),
            *at(0, TEXT_DONE),
            "completed",
        ],
        [("message", "completed", "Hello world")],
    ),
    Case(
        "reasoning-content-then-text",
        [
            chunk({"role": "assistant"}),
            chunk({"reasoning_content": "Let me "}),
            chunk({"reasoning_content": "think."}),
            text("Hi"),
            text("!"),
            stop(),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            *repeat("reasoning_text.delta@0", 2),
            *at(0, REASONING_DONE),
            *at(1, OPEN_PART),
            *repeat("output_text.delta@1", 2),
            *at(1, TEXT_DONE),
            "completed",
        ],
        [("reasoning", "completed", "Let me think."), ("message", "completed", "Hi!")],
    ),
    Case(
        "reasoning-field-then-text",
        [chunk({"reasoning": "hmm"}), text("ok"), stop()],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            *at(1, OPEN_PART),
            "output_text.delta@1",
            *at(1, TEXT_DONE),
            "completed",
        ],
        [("reasoning", "completed", "hmm"), ("message", "completed", "ok")],
    ),
    Case(
        "reasoning-and-text-in-one-delta",
        [chunk({"reasoning_content": "r", "content": "t"}), stop()],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            *at(1, OPEN_PART),
            "output_text.delta@1",
            *at(1, TEXT_DONE),
            "completed",
        ],
        [("reasoning", "completed", "r"), ("message", "completed", "t")],
    ),
    Case(
        "text-then-reasoning-again",
        [text("a"), chunk({"reasoning_content": "b"}), text("c"), stop()],
        [
            *START,
            *at(0, OPEN_PART),
            "output_text.delta@0",
            *at(0, TEXT_DONE),
            *at(1, OPEN_PART),
            "reasoning_text.delta@1",
            *at(1, REASONING_DONE),
            *at(2, OPEN_PART),
            "output_text.delta@2",
            *at(2, TEXT_DONE),
            "completed",
        ],
        [
            ("message", "completed", "a"),
            ("reasoning", "completed", "b"),
            ("message", "completed", "c"),
        ],
    ),
    Case(
        "two-parallel-calls",
        [
            chunk({"role": "assistant", "content": None}),
            calls(call(0, id="call_a", name="get_weather", args="")),
            calls(call(0, args='{"ci')),
            calls(call(1, id="call_b", name="lookup", args="")),
            calls(call(0, args='ty":"Paris"}'), call(1, args='{"q":')),
            calls(call(1, args='"x"}')),
            stop("tool_calls"),
        ],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            "output_item.added@1",
            "function_call_arguments.delta@0",
            "function_call_arguments.delta@1",
            "function_call_arguments.delta@1",
            *at(0, CALL_DONE),
            *at(1, CALL_DONE),
            "completed",
        ],
        [
            ("function_call", "completed", None, "get_weather", "call_a", '{"city":"Paris"}'),
            ("function_call", "completed", None, "lookup", "call_b", '{"q":"x"}'),
        ],
    ),
    Case(
        "llama-cpp-python-repeats-id-type-name",
        [llama('{"city"'), llama(':"Pa'), llama('ris"}'), stop("tool_calls")],
        [
            *START,
            "output_item.added@0",
            *repeat("function_call_arguments.delta@0", 3),
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", None, "get_weather", "call_ll", '{"city":"Paris"}')],
    ),
    Case(
        "changing-ids-keep-first-call-id",
        [
            llama('{"city"', call_id="call_first"),
            llama(':"Rome"}', call_id="call_second"),
            stop("tool_calls"),
        ],
        [
            *START,
            "output_item.added@0",
            *repeat("function_call_arguments.delta@0", 2),
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", None, "get_weather", "call_first", '{"city":"Rome"}')],
    ),
    Case(
        "calls-without-ids-get-call-ids",
        [
            calls(call(0, name="lookup", args='{"q":1}', typed=True)),
            calls(call(1, name="lookup", args='{"q":2}', typed=True)),
            stop("tool_calls"),
        ],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            "output_item.added@1",
            "function_call_arguments.delta@1",
            *at(0, CALL_DONE),
            *at(1, CALL_DONE),
            "completed",
        ],
        [
            ("function_call", "completed", None, "lookup", "call_1", '{"q":1}'),
            ("function_call", "completed", None, "lookup", "call_3", '{"q":2}'),
        ],
    ),
    Case(
        "text-then-call",
        [
            text("Let me check."),
            calls(call(0, id="call_a", name="get_weather", args='{"city":"Oslo"}')),
            stop("tool_calls"),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            "output_text.delta@0",
            *at(0, TEXT_DONE),
            "output_item.added@1",
            "function_call_arguments.delta@1",
            *at(1, CALL_DONE),
            "completed",
        ],
        [
            ("message", "completed", "Let me check."),
            ("function_call", "completed", None, "get_weather", "call_a", '{"city":"Oslo"}'),
        ],
    ),
    Case(
        "reasoning-then-call",
        [
            chunk({"reasoning_content": "need weather"}),
            calls(call(0, id="call_a", name="get_weather", args="{}")),
            stop("tool_calls"),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            "output_item.added@1",
            "function_call_arguments.delta@1",
            *at(1, CALL_DONE),
            "completed",
        ],
        [
            ("reasoning", "completed", "need weather"),
            ("function_call", "completed", None, "get_weather", "call_a", "{}"),
        ],
    ),
    Case(
        "namespace-flat-name-split",
        [calls(call(0, id="call_r", name="fs__read", args='{"path":"a"}')), stop("tool_calls")],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", "fs", "read", "call_r", '{"path":"a"}')],
    ),
    Case(
        "name-streamed-in-pieces",
        [
            calls(call(0, id="call_r", name="fs__", args="")),
            calls(call(0, name="read", args="{}")),
            stop("tool_calls"),
        ],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", "fs", "read", "call_r", "{}")],
    ),
    Case(
        "parsed-arguments-object",
        [calls(call(0, id="call_a", name="get_weather", args={"city": "Köln"})), stop()],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", None, "get_weather", "call_a", '{"city": "Köln"}')],
    ),
    Case(
        "max-tool-calls-drops-extra",
        [
            calls(call(0, id="call_a", name="lookup", args='{"q":')),
            calls(call(1, id="call_b", name="lookup", args='{"q":2}')),
            calls(call(0, args="1}"), call(2, id="call_c", name="get_weather", args="{}")),
            calls(call(1, args=" ")),
            stop("tool_calls"),
        ],
        [
            *START,
            "output_item.added@0",
            *repeat("function_call_arguments.delta@0", 2),
            *at(0, CALL_DONE),
            "completed",
        ],
        [("function_call", "completed", None, "lookup", "call_a", '{"q":1}')],
        max_tool_calls=1,
    ),
    Case(
        "length-incomplete",
        [chunk({"reasoning_content": "r"}), text("The answer is"), stop("length")],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            *at(1, OPEN_PART),
            "output_text.delta@1",
            *at(1, TEXT_DONE),
            "incomplete",
        ],
        [("reasoning", "completed", "r"), ("message", "incomplete", "The answer is")],
        status="incomplete",
        incomplete="max_output_tokens",
    ),
    Case(
        "length-inside-call",
        [calls(call(0, id="call_a", name="get_weather", args='{"ci')), stop("length")],
        [
            *START,
            "output_item.added@0",
            "function_call_arguments.delta@0",
            *at(0, CALL_DONE),
            "incomplete",
        ],
        [("function_call", "incomplete", None, "get_weather", "call_a", '{"ci')],
        status="incomplete",
        incomplete="max_output_tokens",
    ),
    Case(
        "content-filter",
        [text("Some"), stop("content_filter")],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "incomplete"],
        [("message", "incomplete", "Some")],
        status="incomplete",
        incomplete="content_filter",
    ),
    Case(
        "no-finish-reason-completed",
        [text("cut short?")],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "completed"],
        [("message", "completed", "cut short?")],
    ),
    Case(
        "refusal-as-text",
        [chunk({"refusal": "I can't."}), stop()],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "completed"],
        [("message", "completed", "I can't.")],
    ),
    Case("empty", [chunk({"role": "assistant"}), stop()], [*START, "completed"], []),
    Case(
        "usage-chunk",
        [text("a"), stop(), USAGE_CHUNK],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "completed"],
        [("message", "completed", "a")],
        usage=USAGE,
    ),
    Case(
        "fail-closes-open-items",
        [
            text("partial"),
            calls(call(0, id="call_a", name="get_weather", args='{"ci')),
            calls(call(1, id="call_b", name="lookup", args="{}")),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            "output_text.delta@0",
            *at(0, TEXT_DONE),
            "output_item.added@1",
            "function_call_arguments.delta@1",
            "output_item.added@2",
            "function_call_arguments.delta@2",
            *at(1, CALL_DONE),
            *at(2, CALL_DONE),
            "failed",
        ],
        [
            ("message", "completed", "partial"),
            ("function_call", "incomplete", None, "get_weather", "call_a", '{"ci'),
            ("function_call", "incomplete", None, "lookup", "call_b", "{}"),
        ],
        status="failed",
        end="fail",
    ),
    Case(
        "fail-before-output",
        [],
        [*START, "failed"],
        [],
        status="failed",
        end="fail",
    ),
    Case(
        "cancel-closes-open-text",
        [chunk({"reasoning_content": "r"}), text("half")],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            *at(1, OPEN_PART),
            "output_text.delta@1",
            *at(1, TEXT_DONE),
            "incomplete",
        ],
        [("reasoning", "completed", "r"), ("message", "incomplete", "half")],
        status="cancelled",
        end="cancel",
    ),
]
CASE_IDS = [c.name for c in CASES]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_event_sequence(case: Case) -> None:
    """Chunks produce the expected event types, output items and final status."""
    builder, events = run(case)
    assert [short(e) for e in events] == case.events
    response = builder.response
    assert summary(response["output"]) == case.output
    assert response["status"] == case.status
    expected_details = {"reason": case.incomplete} if case.incomplete else None
    assert response["incomplete_details"] == expected_details
    assert response["usage"] == case.usage
    assert response["completed_at"] == (CREATED_AT if case.status == "completed" else None)
    if case.status == "failed":
        assert response["error"] == {"code": "server_error", "message": "The upstream went away."}
    else:
        assert response["error"] is None


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_stream_well_formed(case: Case) -> None:
    """Events are numbered 0..N-1, match the output by index and id, and pass the SDK types."""
    builder, events = run(case)
    check_stream(events, builder.response)
    assert builder.output == builder.response["output"]
    assert builder.function_calls() == [
        i for i in builder.response["output"] if i["type"] == "function_call"
    ]


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_sdk_accumulator(case: Case) -> None:
    """The SDK's ResponseStreamState accepts the stream and rebuilds our text and calls."""
    builder, events = run(case)
    check_sdk(events, builder.response)


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_replay(case: Case) -> None:
    """replay_events gives a valid stream the SDK accumulates to the stored output."""
    builder, _ = run(case)
    stored = copy.deepcopy(builder.response)
    events = replay_events(stored)
    assert stored == builder.response
    check_stream(events, stored)
    check_sdk(events, stored)
    assert events[-1]["type"] == {
        "completed": "response.completed",
        "failed": "response.failed",
    }.get(case.status, "response.incomplete")
    assert events[0]["response"]["status"] == "in_progress"
    assert events[0]["response"]["output"] == []


REPLAY_SEQUENCES = [
    (
        "text",
        [text("Hello"), stop()],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "completed"],
    ),
    (
        "reasoning-and-call",
        [
            chunk({"reasoning_content": "hmm"}),
            calls(call(0, id="call_a", name="fs__read", args="{}")),
            stop("tool_calls"),
        ],
        [
            *START,
            *at(0, OPEN_PART),
            "reasoning_text.delta@0",
            *at(0, REASONING_DONE),
            "output_item.added@1",
            "function_call_arguments.delta@1",
            *at(1, CALL_DONE),
            "completed",
        ],
    ),
    (
        "incomplete",
        [text("cut"), stop("length")],
        [*START, *at(0, OPEN_PART), "output_text.delta@0", *at(0, TEXT_DONE), "incomplete"],
    ),
]


@pytest.mark.parametrize(
    ("chunks", "expected"), [c[1:] for c in REPLAY_SEQUENCES], ids=[c[0] for c in REPLAY_SEQUENCES]
)
def test_replay_sequence(chunks: list[dict[str, Any]], expected: list[str]) -> None:
    """A replayed stream has the live stream's shape, one delta per part."""
    builder = make_builder()
    builder.start()
    for c in chunks:
        builder.feed(c)
    builder.finish()
    assert [short(e) for e in replay_events(builder.response)] == expected


# --- feed_completion ---------------------------------------------------------------------


def completion(message: dict[str, Any], finish: str = "stop", usage: Any = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


def full_call(call_id: str, name: str, arguments: Any) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


COMPLETIONS = [
    (
        "text-with-usage",
        completion({"role": "assistant", "content": "Hello world"}, usage=CHAT_USAGE),
        [text("Hello"), text(" world"), stop(), USAGE_CHUNK],
    ),
    (
        "reasoning-and-text",
        completion({"role": "assistant", "reasoning_content": "think", "content": "ok"}),
        [
            chunk({"reasoning_content": "th"}),
            chunk({"reasoning_content": "ink"}),
            text("ok"),
            stop(),
        ],
    ),
    (
        "text-and-two-calls",
        completion(
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    full_call("call_a", "get_weather", '{"city":"Paris"}'),
                    full_call("call_b", "fs__read", '{"path":"x"}'),
                ],
            },
            finish="tool_calls",
        ),
        [
            text("Checking."),
            calls(call(0, id="call_a", name="get_weather", args='{"city":')),
            calls(call(0, args='"Paris"}')),
            calls(call(1, id="call_b", name="fs__read", args='{"path":"x"}')),
            stop("tool_calls"),
        ],
    ),
    (
        "call-without-id-and-parsed-arguments",
        completion(
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"type": "function", "function": {"name": "lookup", "arguments": {}}}
                ],
            },
            finish="tool_calls",
        ),
        [calls(call(0, name="lookup", args={}, typed=True)), stop("tool_calls")],
    ),
    (
        "length",
        completion({"role": "assistant", "content": "cut"}, finish="length"),
        [text("cu"), text("t"), stop("length")],
    ),
]


@pytest.mark.parametrize(
    ("whole", "pieces"), [c[1:] for c in COMPLETIONS], ids=[c[0] for c in COMPLETIONS]
)
def test_feed_completion_matches_stream(
    whole: dict[str, Any], pieces: list[dict[str, Any]]
) -> None:
    """A whole completion gives the same output, status and usage as the equivalent stream."""
    streamed = make_builder()
    events = streamed.start()
    for piece in pieces:
        events += streamed.feed(piece)
    events += streamed.finish()

    single = make_builder()
    whole_events = single.start() + single.feed_completion(whole) + single.finish()
    check_stream(whole_events, single.response)
    check_sdk(whole_events, single.response)
    assert single.response == streamed.response


# --- lifecycle -----------------------------------------------------------------------------


def test_start_queued_then_in_progress() -> None:
    """A background response starts queued; in_progress continues the same sequence."""
    builder = make_builder()
    events = builder.start(queued=True)
    assert [(e["type"], e["response"]["status"]) for e in events] == [
        ("response.created", "queued"),
        ("response.queued", "queued"),
    ]
    events += builder.in_progress()
    assert events[-1]["type"] == "response.in_progress"
    assert events[-1]["response"]["status"] == "in_progress"
    events += builder.feed(text("hi")) + builder.finish()
    check_stream(events, builder.response)
    state, _ = sdk_accumulate(events)
    assert state._completed_response is not None
    assert state._completed_response.output_text == "hi"


def test_start_events_carry_the_initial_response() -> None:
    """response.created and in_progress carry the whole initial object, output empty."""
    builder = make_builder()
    created, in_progress = builder.start()
    for event in (created, in_progress):
        response = event["response"]
        assert response["id"] == "resp_1"
        assert response["created_at"] == CREATED_AT
        assert (response["status"], response["output"], response["usage"]) == (
            "in_progress",
            [],
            None,
        )
        Response.model_validate(response)


def test_events_are_snapshots() -> None:
    """Events already returned do not change when the builder goes on."""
    builder = make_builder()
    events = builder.start() + builder.feed(text("a"))
    frozen = copy.deepcopy(events)
    builder.feed(text("b"))
    builder.feed(calls(call(0, id="call_a", name="lookup", args="{}")))
    builder.finish()
    assert events == frozen
    assert builder.response["output"][0]["content"][0]["text"] == "ab"


def test_cancel_without_output() -> None:
    """cancel() with nothing open ends the stream with the response cancelled."""
    builder = make_builder()
    events = builder.start() + builder.cancel()
    assert [e["type"] for e in events] == [
        "response.created",
        "response.in_progress",
        "response.incomplete",
    ]
    assert builder.response["status"] == "cancelled"
    assert builder.response["completed_at"] is None
    check_stream(events, builder.response)
    check_sdk(events, builder.response)


def test_usage_last_chunk_wins_and_chunk_with_choices() -> None:
    """A usage object on a chunk with choices counts too; a later one replaces it."""
    builder = make_builder()
    early = {**text("a"), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    builder.start()
    builder.feed(early)
    assert builder.usage == usage_from_chat(early["usage"])
    builder.feed(USAGE_CHUNK)
    builder.finish()
    assert builder.response["usage"] == USAGE


@pytest.mark.parametrize(
    "junk",
    [
        {},
        {"choices": None},
        {"choices": []},
        {"choices": ["x"]},
        {"choices": [{"index": 0}]},
        {"choices": [{"delta": {"content": None, "tool_calls": None}}]},
        {"choices": [{"delta": {"tool_calls": ["x"]}}]},
        {"choices": [{"delta": {"content": ""}, "finish_reason": ""}]},
    ],
)
def test_feed_ignores_empty_and_malformed_chunks(junk: dict[str, Any]) -> None:
    """Chunks with nothing usable produce no events and no output."""
    builder = make_builder()
    builder.start()
    assert builder.feed(junk) == []
    assert builder.output == []
    assert builder.finish_reason is None


# --- objects ------------------------------------------------------------------------------

REQUIRED_KEYS = {
    "id",
    "object",
    "created_at",
    "completed_at",
    "status",
    "error",
    "incomplete_details",
    "instructions",
    "model",
    "output",
    "previous_response_id",
    "tools",
    "tool_choice",
    "truncation",
    "parallel_tool_calls",
    "text",
    "top_p",
    "temperature",
    "presence_penalty",
    "frequency_penalty",
    "top_logprobs",
    "reasoning",
    "max_output_tokens",
    "max_tool_calls",
    "usage",
    "store",
    "background",
    "service_tier",
    "metadata",
    "safety_identifier",
    "prompt_cache_key",
}


def test_response_object_defaults() -> None:
    """The initial Response has every key of the API, with the API's defaults."""
    request = parse_create({"input": "hi"}, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    assert set(response) >= REQUIRED_KEYS
    assert response["object"] == "response"
    assert (response["id"], response["model"], response["created_at"]) == (
        "resp_1",
        "m",
        CREATED_AT,
    )
    assert (response["status"], response["output"], response["usage"]) == ("in_progress", [], None)
    assert (response["error"], response["incomplete_details"], response["completed_at"]) == (
        None,
        None,
        None,
    )
    assert (response["temperature"], response["top_p"], response["top_logprobs"]) == (1.0, 1.0, 0)
    assert (response["presence_penalty"], response["frequency_penalty"]) == (0.0, 0.0)
    assert response["text"] == {"format": {"type": "text"}}
    assert response["reasoning"] == {"effort": None, "summary": None}
    assert (response["tool_choice"], response["tools"]) == ("auto", [])
    assert (response["store"], response["background"], response["truncation"]) == (
        True,
        False,
        "disabled",
    )
    assert (response["service_tier"], response["metadata"], response["conversation"]) == (
        "default",
        {},
        None,
    )
    Response.model_validate(response)


def test_response_object_echoes_settings() -> None:
    """Settings are echoed; each function tool shows description, parameters and strict."""
    body = {
        "input": "hi",
        "instructions": "Be brief.",
        "previous_response_id": "resp_0",
        "tools": [WEATHER, LOOKUP, FILES, {"type": "web_search"}],
        "tool_choice": {"type": "function", "name": "lookup"},
        "parallel_tool_calls": False,
        "max_tool_calls": 2,
        "max_output_tokens": 64,
        "temperature": 0.3,
        "top_p": 0.8,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "top_logprobs": 3,
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}, "strict": True}},
        "reasoning": {"effort": "low", "summary": "auto"},
        "truncation": "auto",
        "metadata": {"k": "v"},
        "store": True,
        "background": True,
        "service_tier": "flex",
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "p",
    }
    request = parse_create(body, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    assert response["tools"] == [
        WEATHER,
        {
            "type": "function",
            "name": "lookup",
            "description": None,
            "parameters": None,
            "strict": None,
        },
        {
            "type": "namespace",
            "name": "fs",
            "description": "Files",
            "tools": [
                {
                    "type": "function",
                    "name": "read",
                    "description": "Read a file",
                    "parameters": None,
                    "strict": None,
                }
            ],
        },
        {"type": "web_search"},
    ]
    for key in (
        "instructions",
        "previous_response_id",
        "tool_choice",
        "parallel_tool_calls",
        "max_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "top_logprobs",
        "text",
        "reasoning",
        "truncation",
        "metadata",
        "store",
        "background",
        "service_tier",
        "user",
        "safety_identifier",
        "prompt_cache_key",
    ):
        assert response[key] == body[key], key
    Response.model_validate(response)


def test_response_object_conversation() -> None:
    """A response in a conversation carries {'id': ...} as its conversation."""
    request = parse_create({"conversation": "conv_1"}, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    assert response["conversation"] == {"id": "conv_1"}
    Response.model_validate(response)


@pytest.mark.parametrize(
    ("items", "has_more", "expected"),
    [
        (
            [],
            False,
            {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False},
        ),
        (
            [{"id": "msg_1"}, {"id": "fc_2"}, {"id": "msg_3"}],
            True,
            {
                "object": "list",
                "data": [{"id": "msg_1"}, {"id": "fc_2"}, {"id": "msg_3"}],
                "first_id": "msg_1",
                "last_id": "msg_3",
                "has_more": True,
            },
        ),
    ],
    ids=["empty", "page"],
)
def test_list_page(items: list[Any], has_more: bool, expected: dict[str, Any]) -> None:
    """The list envelope names the first and last ids of the page."""
    assert list_page(items, has_more) == expected


# --- known bugs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "code", "kind"),
    [
        (UpstreamUnavailable("down"), "server_error", "upstream_unavailable"),
        (UpstreamTimeout("slow"), "server_error", "upstream_timeout"),
        (CircuitOpen("open"), "server_error", "circuit_open"),
        (UpstreamStatus(500, b"{}", None), "server_error", "upstream_500"),
        (UpstreamStatus(400, b'{"error": "bad"}', None), "invalid_prompt", None),
        (UpstreamStatus(429, b"{}", None), "rate_limit_exceeded", "upstream_429"),
    ],
)
def test_failure_codes_are_the_apis(exc: Any, code: str, kind: str | None) -> None:
    """A failed response carries one of the API's error codes, lmbridge's own in error.type,
    and its response.failed event is a valid SDK event."""
    own = failures.failure_code(exc)
    assert own == kind or kind is None
    builder = make_builder()
    events = builder.start() + builder.feed(text("x"))
    events += builder.fail(failures.response_error_code(exc, own), exc.message, kind=own)
    validate_event(events[-1])
    assert builder.response["error"]["code"] == code


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "namespace", "name": "fs", "description": "Files", "tools": [{"name": "read"}]},
        {"type": "namespace", "name": "fs", "tools": [{"type": "function", "name": "read"}]},
    ],
    ids=["member-without-type", "namespace-without-description"],
)
def test_namespace_tool_echo_validates(tool: dict[str, Any]) -> None:
    """A namespace tool the request accepted is echoed in the SDK's Tool shape."""
    request = parse_create({"tools": [tool]}, counter_ids())
    response = response_object(request, response_id="resp_1", model="m", created_at=CREATED_AT)
    Response.model_validate(response)


def test_calls_without_index_are_told_apart_by_id() -> None:
    """Deltas without ``index``: a new id starts a new call, a repeated id (or none)
    continues the current one."""
    builder = make_builder()
    builder.start()
    for delta in (
        {"id": "call_a", "function": {"name": "get_weather", "arguments": '{"city":'}},
        {"id": "call_a", "function": {"name": "get_weather", "arguments": ' "Oslo"}'}},
        {"id": "call_b", "function": {"name": "get_weather", "arguments": "{}"}},
        {"function": {"arguments": ""}},
    ):
        builder.feed({"choices": [{"index": 0, "delta": {"tool_calls": [delta]}}]})
    builder.finish()
    calls = [(c["call_id"], c["arguments"]) for c in builder.function_calls()]
    assert calls == [("call_a", '{"city": "Oslo"}'), ("call_b", "{}")]
