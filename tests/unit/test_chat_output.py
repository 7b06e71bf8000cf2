"""Chat completions rewritten for what local models write (proxy/chat_output): text calls
and thinking in tags, whole and streamed, and byte for byte what needs no change."""

from __future__ import annotations

import json
from typing import Any

import pytest

from proxy.chat_output import (
    ChatOutput,
    ChatStreamRewriter,
    normalise_completion,
    output_for,
    read_switches,
)
from proxy.chat_stream_editor import ChatStreamEditor
from proxy.model_output.think_tags import THINK, ThinkTags
from proxy.profiles import ModelProfile, with_switches
from proxy.sse import SSEParser, encode_event
from tests.fake_upstream import chat_completion, chunk
from tests.model_outputs import expected, load

FIXTURES = [f for f in load() if not (f.get("think") or {}).get("opened")]
IDS = [f["id"] for f in FIXTURES]


def _ids(prefix: str) -> str:
    return f"{prefix}_test"


def output_of(fixture: dict[str, Any]) -> ChatOutput:
    return ChatOutput(frozenset(fixture["offered"]), THINK)


def sse(events: list[Any], *, done: bool = True) -> bytes:
    body = b"".join(encode_event(e) for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def stream_of(content: str, step: int, *, finish: str = "stop") -> list[Any]:
    events: list[Any] = [chunk(role="assistant", content="")]
    events += [chunk(content[i : i + step]) for i in range(0, len(content), step)]
    events.append(chunk(finish=finish))
    events.append(
        chunk(choices=False, usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3})
    )
    return events


def edit(output: ChatOutput, raw: bytes, cut: int) -> bytes:
    editor = ChatStreamEditor(ChatStreamRewriter(output, ids=_ids))
    out = b"".join(editor.feed(raw[i : i + cut]) for i in range(0, len(raw), cut))
    return out + editor.finish()


def assemble(raw: bytes) -> dict[str, Any]:
    """What a client makes of a stream: content, reasoning, calls, finish, usage, done."""
    parser = SSEParser()
    result: dict[str, Any] = {"content": "", "reasoning": "", "calls": {}, "finish": None}
    result["done"] = False
    for event in [*parser.feed(raw), *parser.finish()]:
        if event.is_done:
            result["done"] = True
            continue
        data = json.loads(event.data)
        if data.get("usage"):
            result["usage"] = data["usage"]
        for choice in data["choices"]:
            delta = choice["delta"]
            result["content"] += delta.get("content") or ""
            result["reasoning"] += delta.get("reasoning_content") or ""
            for call in delta.get("tool_calls") or []:
                entry = result["calls"].setdefault(call["index"], {"name": "", "arguments": ""})
                entry["id"] = call.get("id", entry.get("id"))
                entry["name"] += call.get("function", {}).get("name") or ""
                entry["arguments"] += call.get("function", {}).get("arguments") or ""
            if choice.get("finish_reason"):
                result["finish"] = choice["finish_reason"]
    return result


def calls_of(result: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(c["name"], json.loads(c["arguments"])) for _, c in sorted(result["calls"].items())]


@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_whole_completion_of_each_fixture(fixture):
    """A completion's content gives its expected calls, reasoning and text, and
    finish_reason tool_calls when it held a call."""
    completion = chat_completion(fixture["content"])
    truncated = (fixture.get("think") or {}).get("truncated")
    if truncated:
        completion["choices"][0]["finish_reason"] = "length"
    wanted = expected(fixture)
    normalise_completion(completion, output_of(fixture), ids=_ids)
    choice = completion["choices"][0]
    message = choice["message"]
    calls = [
        (c["function"]["name"], json.loads(c["function"]["arguments"]))
        for c in message.get("tool_calls", [])
    ]
    assert calls == wanted.calls
    assert (message["content"] or "").strip() == wanted.text.strip()
    assert message.get("reasoning_content", "") == wanted.reasoning
    if wanted.calls:
        assert all(
            c["id"] == "call_test" and c["type"] == "function" for c in message["tool_calls"]
        )
        assert choice["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("step,cut", [(1, 7), (3, 1), (5, 64), (11, 4096)])
@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_streamed_fixture_in_small_deltas(fixture, step, cut):
    """Streamed in deltas of a few characters and read in pieces of any size, a fixture
    gives the same calls, reasoning and text as whole; usage and [DONE] pass."""
    truncated = (fixture.get("think") or {}).get("truncated")
    raw = sse(stream_of(fixture["content"], step, finish="length" if truncated else "stop"))
    result = assemble(edit(output_of(fixture), raw, cut))
    wanted = expected(fixture)
    assert calls_of(result) == wanted.calls
    assert result["content"].strip() == wanted.text.strip()
    assert result["reasoning"] == wanted.reasoning
    assert result["done"] and result["usage"]["total_tokens"] == 3
    if wanted.calls:
        assert result["finish"] == "tool_calls"
        assert all(c["id"] == "call_test" for c in result["calls"].values())
    else:
        assert result["finish"] == ("length" if truncated else "stop")


@pytest.mark.parametrize("step", [1, 4])
@pytest.mark.parametrize("fixture", FIXTURES, ids=IDS)
def test_streamed_fixture_read_event_by_event(fixture, step):
    """Each read one whole event, as most upstreams write them: the same calls, reasoning
    and text as whole (the quick checks of plain events see every delta)."""
    truncated = (fixture.get("think") or {}).get("truncated")
    events = stream_of(fixture["content"], step, finish="length" if truncated else "stop")
    editor = ChatStreamEditor(ChatStreamRewriter(output_of(fixture), ids=_ids))
    out = b"".join(editor.feed(encode_event(e)) for e in events)
    out += editor.feed(b"data: [DONE]\n\n") + editor.finish()
    result = assemble(out)
    wanted = expected(fixture)
    assert calls_of(result) == wanted.calls
    assert result["content"].strip() == wanted.text.strip()
    assert result["reasoning"] == wanted.reasoning
    assert result["done"] and result["usage"]["total_tokens"] == 3


def test_a_null_finish_reason_spaced_otherwise_is_not_an_end():
    """``"finish_reason" : null`` is read as no finish reason: a call written after it is
    still found."""
    events = [chunk(role="assistant", content="Let me look. ")]
    events += [
        chunk(piece) for piece in ("Sure. ", '<tool_call>{"name": "f", ', '"arguments": {}}')
    ]
    events += [chunk("</tool_call>"), chunk(finish="stop")]
    raw = [
        encode_event(e).replace(b'"finish_reason": null', b'"finish_reason" : null') for e in events
    ]
    editor = ChatStreamEditor(ChatStreamRewriter(ChatOutput(frozenset({"f"})), ids=_ids))
    out = b"".join(editor.feed(r) for r in raw) + editor.finish()
    result = assemble(out)
    assert calls_of(result) == [("f", {})]
    assert result["content"] == "Let me look. Sure. "


def test_plain_events_keep_their_bytes_and_the_last_ends_the_reading():
    """Read event by event, plain deltas and the one that ends the answer go out as they
    came, and nothing after it is parsed."""
    events = stream_of("The weather is fine today.", 3)
    editor = ChatStreamEditor(ChatStreamRewriter(ChatOutput(frozenset({"f"}), THINK)))
    raws = [encode_event(e) for e in events]
    assert [editor.feed(r) for r in raws[:-1]] == raws[:-1]
    assert editor.relaying
    assert editor.feed(b"data: garbage\n\n") == b"data: garbage\n\n"


def test_plain_stream_is_byte_for_byte_and_then_relayed():
    """Plain content with tags looked for: the bytes come out as they went in, and once
    the answer began nothing more is parsed."""
    raw = sse(stream_of("Hello there, how are you?", 4))
    editor = ChatStreamEditor(ChatStreamRewriter(ChatOutput(think=THINK)))
    pieces = [raw[i : i + 9] for i in range(0, len(raw), 9)]
    out = b""
    for piece in pieces:
        out += editor.feed(piece)
    assert editor.relaying
    assert out + editor.finish() == raw


def test_plain_stream_with_tools_offered_keeps_its_bytes():
    """Plain content with tools offered: unchanged chunks keep their bytes."""
    raw = sse(stream_of("The weather is fine today.", 3))
    output = ChatOutput(frozenset({"get_weather"}), THINK)
    assert edit(output, raw, 50) == raw


def test_structured_calls_pass_unchanged():
    """Calls the upstream parsed itself pass as they came; the text is not searched."""
    call = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "f", "arguments": "{}"},
    }
    events = [
        chunk(role="assistant", content=""),
        chunk(tool_calls=[call]),
        chunk(finish="tool_calls"),
    ]
    raw = sse(events)
    assert edit(ChatOutput(frozenset({"f"}), THINK), raw, 13) == raw


def test_text_call_then_structured_call_are_numbered_apart():
    """A text call and a later structured call do not share an index."""
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    call = {
        "index": 0,
        "id": "c1",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    events = [chunk(text), chunk(tool_calls=[call]), chunk(finish="tool_calls")]
    result = assemble(edit(ChatOutput(frozenset({"f", "g"})), sse(events), 1000))
    assert [c["name"] for _, c in sorted(result["calls"].items())] == ["f", "g"]


def test_upstream_reasoning_leaves_the_content_alone():
    """A stream that carries reasoning_content: <think> in its content stays text."""
    first = chunk()
    first["choices"][0]["delta"]["reasoning_content"] = "hmm"
    raw = sse([first, chunk("<think>x</think>y"), chunk(finish="stop")])
    assert assemble(edit(ChatOutput(think=THINK), raw, 1000))["content"] == "<think>x</think>y"


def test_a_stream_without_finish_reason_gives_what_was_held():
    """A stream that ends without a finish_reason still gets what was held back."""
    raw = sse([chunk("Answer: <tool"), chunk("_cal")], done=False)
    result = assemble(edit(ChatOutput(frozenset({"f"})), raw, 5))
    assert result["content"] == "Answer: <tool_cal"


def test_reasoning_is_a_delta_field():
    """Thinking streams as delta.reasoning_content, before the answer's content."""
    raw = sse(stream_of("<think>Let me see.</think>\n\nFour.", 2))
    result = assemble(edit(ChatOutput(think=THINK), raw, 10))
    assert (result["reasoning"], result["content"]) == ("Let me see.", "Four.")


def test_switches_and_settings():
    """The lmbridge object turns each part off; the profile turns it off for the model."""
    tools = [{"type": "function", "function": {"name": "f"}}]
    both = output_for(tools, ModelProfile())
    assert both == ChatOutput(frozenset({"f"}), (THINK,))
    off = output_for(
        tools, with_switches(ModelProfile(), {"text_tool_calls": False, "think_tags": False})
    )
    assert not off.active
    assert not output_for(tools, ModelProfile(text_tool_calls=False, think_tags=())).active
    assert read_switches({"think_tags": False}) == {"think_tags": False}
    for bad in ([], {"x": True}, {"think_tags": "no"}):
        with pytest.raises(ValueError):
            read_switches(bad)


def test_escaped_tags_are_read():
    """A server that escapes < as \\u003c (Go's JSON, Ollama) still has its calls and
    thinking read: plain-looking bytes are never taken for plain content."""
    content = '<think>Hm.</think><tool_call>{"name": "f", "arguments": {}}</tool_call>'
    events = stream_of(content, 5)
    raw = b"".join(
        b"data: " + json.dumps(e).replace("<", "\\u003c").encode() + b"\n\n" for e in events
    )
    result = assemble(edit(ChatOutput(frozenset({"f"}), THINK), raw + b"data: [DONE]\n\n", 4096))
    assert (result["reasoning"], calls_of(result), result["content"]) == ("Hm.", [("f", {})], "")


def test_plain_events_after_a_fence_are_still_read():
    """Once a fenced block opened, later deltas are read (a call inside it stays text)."""
    content = 'Use:\n```\n<tool_call>{"name": "f", "arguments": {}}</tool_call>\n```\nDone.'
    result = assemble(edit(ChatOutput(frozenset({"f"})), sse(stream_of(content, 3)), 64))
    assert result["content"] == content and result["calls"] == {}


def _event_by_event(output: ChatOutput, events: list[Any]) -> dict[str, Any]:
    editor = ChatStreamEditor(ChatStreamRewriter(output, ids=_ids))
    out = b"".join(editor.feed(encode_event(e)) for e in events) + editor.finish()
    return assemble(out)


def test_a_plain_first_delta_is_read_from_its_bytes():
    """The first delta, plain, is not parsed but still starts the answer: a ``<think>``
    after it is content, and a call written later is still found."""
    events = [chunk(role="assistant", content=None), chunk("Sure. "), chunk("<think>no</think> ")]
    events += [chunk('<tool_call>{"name": "f", "arguments": {}}</tool_call>')]
    events += [chunk(finish="stop")]
    result = _event_by_event(ChatOutput(frozenset({"f"}), THINK), events)
    assert result["content"] == "Sure. <think>no</think> "
    assert result["reasoning"] == ""
    assert calls_of(result) == [("f", {})]
    assert result["finish"] == "tool_calls"


@pytest.mark.parametrize(
    "first",
    [
        [chunk(role="assistant", content=None), chunk("<think>hm</think>Answer")],
        [chunk(role="assistant", content=""), chunk("<think>hm"), chunk("</think>Answer")],
        [chunk(role="assistant"), chunk("  "), chunk("<think>hm</think>Answer")],
    ],
    ids=["null-content", "empty-content", "no-content-then-space"],
)
def test_thinking_after_an_event_without_content_is_split(first):
    result = _event_by_event(ChatOutput(think=THINK), [*first, chunk(finish="stop")])
    assert (result["reasoning"], result["content"]) == ("hm", "Answer")


def test_a_bare_call_after_leading_space_is_found():
    """A first delta that starts with a space is read, not passed from its bytes: the
    bare JSON call after it counts."""
    events = [chunk(role="assistant", content=" "), chunk('{"name": "f", "arguments": {"a": 1}}')]
    result = _event_by_event(ChatOutput(frozenset({"f"}), THINK), [*events, chunk(finish="stop")])
    assert calls_of(result) == [("f", {"a": 1})]
    assert result["content"] == ""


@pytest.mark.parametrize(
    "tags", [ThinkTags("◁think▷", "◁/think▷"), ThinkTags("Thought:", "Answer:")], ids=str
)
def test_tags_that_open_with_another_character_are_still_split(tags):
    """Variants that begin with neither ``<`` nor ``[`` (Kimi's, or one an operator
    configured): a first delta that opens them is read, not passed from its bytes."""
    events = [chunk(role="assistant", content=None), chunk(f"{tags.open}hm{tags.close}")]
    events += [chunk("Done"), chunk(finish="stop")]
    result = _event_by_event(ChatOutput(think=(THINK, tags)), events)
    assert (result["reasoning"], result["content"]) == ("hm", "Done")


def test_thinking_looked_for_alone_stops_reading_after_a_plain_first_delta():
    """Without tools, a plain first delta (read from its bytes) ends the reading: every
    later byte passes without being looked at."""
    events = [chunk(role="assistant", content=None), chunk("Hello"), chunk(" <think>")]
    editor = ChatStreamEditor(ChatStreamRewriter(ChatOutput(think=THINK)))
    raws = [encode_event(e) for e in events]
    assert [editor.feed(r) for r in raws[:2]] == raws[:2]
    assert editor.relaying
    assert editor.feed(raws[2]) == raws[2]
