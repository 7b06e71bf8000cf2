"""The pure parts of lmbridge's MCP client, as tables: tool names, results as the model
reads them, tool calls written as text, one round of a chat tool loop."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.mcp.names import MAX_LENGTH, ToolDirectory, ToolRef, exposed_name
from proxy.mcp.results import cut, error_output, render_result
from proxy.mcp.rounds import Round
from proxy.model_output.text_calls import TextCall, split
from proxy.model_output.think_tags import THINK
from proxy.profiles import ModelProfile

# --- names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server", "tool", "name"),
    [
        ("time", "get_current_time", "time__get_current_time"),
        ("my.server", "read file", "my_server__read_file"),
        ("files", "dir/list", "files__dir_list"),
        ("ü", "tool", "___tool"),
    ],
)
def test_exposed_names_follow_openais_rules(server, tool, name):
    """Server and tool joined by '__', every other character than [A-Za-z0-9_-] made '_'."""
    assert exposed_name(server, tool) == name


def test_long_names_are_cut_and_stay_distinct():
    """Names over 64 characters are cut with a hash of the full pair."""
    a = exposed_name("server", "t" * 100 + "a")
    b = exposed_name("server", "t" * 100 + "b")
    assert len(a) == len(b) == MAX_LENGTH
    assert a != b


def test_the_directory_routes_by_exposed_name_only():
    """Two tools that clean to the same name get distinct names; each routes back to its
    own server and tool; a bare tool name routes nowhere."""
    directory = ToolDirectory()
    first = directory.add("my.server", "add")
    second = directory.add("my_server", "add")
    assert first == "my_server__add" and second != first
    assert directory.route(first) == ToolRef("my.server", "add")
    assert directory.route(second) == ToolRef("my_server", "add")
    assert directory.add("my.server", "add") == first  # the same pair again
    assert directory.route("add") is None and "add" not in directory


# --- results -------------------------------------------------------------------------

IMAGE = {"type": "image", "data": "aGVsbG8=", "mimeType": "image/png"}


@pytest.mark.parametrize(
    ("result", "images", "text", "error", "image_parts"),
    [
        ({"content": [{"type": "text", "text": "5"}]}, False, "5", False, 0),
        (
            {"content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            False,
            "a\nb",
            False,
            0,
        ),
        ({"content": [], "structuredContent": {"x": 1}}, False, '{"x": 1}', False, 0),
        ({"content": []}, False, "(the tool returned nothing)", False, 0),
        (
            {"content": [{"type": "text", "text": "no"}], "isError": True},
            False,
            "The tool reported an error: no",
            True,
            0,
        ),
        ({"content": [IMAGE]}, True, "[image image/png: shown below]", False, 1),
        (
            {"content": [IMAGE]},
            False,
            "[image image/png, 6 bytes: not shown, the model does not read images]",
            False,
            0,
        ),
        (
            {"content": [{"type": "audio", "mimeType": "audio/wav", "data": ""}]},
            False,
            "[audio audio/wav: not shown]",
            False,
            0,
        ),
        (
            {"content": [{"type": "resource", "resource": {"uri": "file:///a", "text": "hi"}}]},
            False,
            "[resource file:///a]\nhi",
            False,
            0,
        ),
        (
            {"content": [{"type": "resource_link", "name": "a", "uri": "file:///a"}]},
            False,
            "[resource link: a file:///a]",
            False,
            0,
        ),
    ],
)
def test_results_as_the_model_reads_them(result, images, text, error, image_parts):
    """Text stays text, structured content is JSON when there is no text, images are
    parts for models that read them and a note for others, resources a summary."""
    output = render_result(result, images=images, max_chars=1000)
    assert (output.text, output.is_error, len(output.images)) == (text, error, image_parts)


def test_long_results_are_cut_with_a_marker():
    """A result over the limit keeps its head and says how much was cut."""
    assert cut("x" * 10, 10) == "x" * 10
    assert cut("x" * 15, 10) == "x" * 10 + "\n[... 5 more characters cut by lmbridge]"


def test_a_failure_to_run_is_a_protocol_error_result():
    """lmbridge's own failures read as the call's result, marked as not the tool's."""
    output = error_output("timed out")
    assert output.text == "The tool call failed: timed out"
    assert (output.is_error, output.kind) == (True, "protocol")


# --- tool calls written as text -------------------------------------------------------

OFFERED = {"calc__add"}


@pytest.mark.parametrize(
    ("content", "calls", "rest"),
    [
        (
            '<tool_call>{"name": "calc__add", "arguments": {"a": 1}}</tool_call>',
            [TextCall("calc__add", '{"a": 1}')],
            "",
        ),
        (
            'Let me add.\n<tool_call>\n{"name": "calc__add", "arguments": "{\\"a\\": 1}"}\n'
            "</tool_call>",
            [TextCall("calc__add", '{"a": 1}')],
            "Let me add.\n",  # the round strips what is left (test_text_calls_in_a_round)
        ),
        ('{"name": "calc__add", "parameters": {"a": 2}}', [TextCall("calc__add", '{"a": 2}')], ""),
        ('```json\n{"name": "calc__add", "arguments": {}}\n```', [TextCall("calc__add", "{}")], ""),
        ('{"name": "rm_rf", "arguments": {}}', [], '{"name": "rm_rf", "arguments": {}}'),
        ("<tool_call>not json</tool_call>", [], "<tool_call>not json</tool_call>"),
        (
            'The answer is {"name": "calc__add"} in prose.',
            [],
            'The answer is {"name": "calc__add"} in prose.',
        ),
        ("Plain answer.", [], "Plain answer."),
    ],
)
def test_calls_written_as_text(content, calls, rest):
    """Only offered names and whole JSON objects count; anything else stays text."""
    assert split(content, OFFERED) == (calls, rest)


# --- one round of the chat loop --------------------------------------------------------


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return {"id": "c1", "object": "chat.completion.chunk", "choices": [choice], **extra}


def call_delta(index: int, call_id: str = "", name: str = "", args: str = "") -> dict:
    function = {k: v for k, v in (("name", name), ("arguments", args)) if v}
    delta: dict[str, Any] = {"index": index, "function": function}
    if call_id:
        delta["id"] = call_id
    return {"tool_calls": [delta]}


def test_a_round_holds_back_mcp_calls_and_relays_the_rest():
    """Content passes at once; an MCP call's deltas are held (lmbridge runs it); a client
    call is relayed renumbered from 0; the finish reason and usage wait for the end."""
    reply = Round({"calc__add"}, client_tools={"lookup"})
    assert reply.feed(chunk({"role": "assistant", "content": "Adding"})) != []
    assert reply.feed(chunk(call_delta(0, "m1", "calc__add", '{"a":'))) == []
    assert reply.feed(chunk(call_delta(0, args=" 1}"))) == []
    relayed = reply.feed(chunk(call_delta(1, "k1", "lookup", "{}")))
    assert relayed[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert reply.feed(chunk({}, "tool_calls")) == []
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    assert reply.feed({"id": "c1", "choices": [], "usage": usage}) == []
    reply.finish()
    assert [(c.id, c.name, c.arguments_text) for c in reply.mcp_calls] == [
        ("m1", "calc__add", '{"a": 1}')
    ]
    assert [c.name for c in reply.client_calls] == ["lookup"]
    assert reply.finish_reason == "tool_calls"
    assert reply.usage is not None and reply.usage["total_tokens"] == 5
    message = reply.assistant_message(include_client_calls=False)
    assert message["content"] == "Adding"
    assert [c["id"] for c in message["tool_calls"]] == ["m1"]


def test_a_round_of_a_whole_completion():
    """A non-streamed reply is read the same way, calls decided by the calls, not by a
    finish reason of 'stop'."""
    reply = Round({"calc__add"})
    call = {"id": "m1", "type": "function", "function": {"name": "calc__add", "arguments": "{}"}}
    message = {"role": "assistant", "content": None, "tool_calls": [call]}
    reply.feed_completion({"id": "c2", "choices": [{"finish_reason": "stop", "message": message}]})
    reply.finish()
    assert [c.id for c in reply.mcp_calls] == ["m1"]


@pytest.mark.parametrize(("enabled", "found"), [(True, 1), (False, 0)])
def test_text_calls_only_when_enabled(enabled, found):
    """With mcp.text_tool_calls, a reply that is only a call written as text is a call."""
    reply = Round({"calc__add"}, text_tool_calls=enabled)
    reply.feed(chunk({"content": '{"name": "calc__add", "arguments": {"a": 1}}'}))
    reply.finish()
    assert len(reply.mcp_calls) == found
    assert ("".join(reply.content) == "") is enabled


def test_text_calls_in_a_round():
    """Text written around calls stays the assistant's content, without the whitespace
    that separated it from them; calls to tools that are not MCP tools stay text."""
    reply = Round({"calc__add"}, text_tool_calls=True)
    content = (
        'Let me add.\n<tool_call>\n{"name": "calc__add", "arguments": {"a": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'
    )
    reply.feed(chunk({"content": content}))
    reply.finish()
    assert [(c.name, c.arguments_text) for c in reply.mcp_calls] == [("calc__add", '{"a": 1}')]
    lookup = '<tool_call>\n{"name": "lookup", "arguments": {}}\n</tool_call>'
    assert reply.content == [f"Let me add.\n{lookup}"]


# --- the chat loop, driven by scripted replies and a scripted tool ----------------------


def completion(content: str | None = None, *calls: tuple[str, str, str]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in calls
        ]
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    return {"id": "c", "choices": [{"message": message, "finish_reason": "stop"}], "usage": usage}


async def run_loop(replies: list[dict[str, Any]], **limits: Any) -> tuple[Any, list, list]:
    from proxy.mcp.loop import ToolLoop
    from proxy.mcp.results import ToolOutput

    directory = ToolDirectory()
    directory.add("calc", "add")
    sent: list[dict[str, Any]] = []
    ran: list[tuple[ToolRef, dict[str, Any]]] = []

    async def complete(body: dict[str, Any]) -> dict[str, Any]:
        sent.append(body)
        return replies.pop(0)

    async def call_tool(ref: ToolRef, arguments: dict[str, Any]) -> ToolOutput:
        ran.append((ref, arguments))
        return ToolOutput(str(sum(arguments.values())))

    loop = ToolLoop(
        directory,
        call_tool,
        client_tools={"lookup"},
        max_rounds=limits.get("max_rounds", 5),
        max_tool_calls=limits.get("max_tool_calls", 5),
        text_tool_calls=limits.get("text_tool_calls", False),
        keep_reasoning=limits.get("keep_reasoning", False),
        describe_tools=limits.get("describe_tools", False),
    )
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "2+3?"}]}
    if "tools" in limits:
        body["tools"] = limits["tools"]
    return await loop.run(body, complete=complete), sent, ran


async def test_the_loop_runs_calls_until_an_answer():
    """Model -> tool -> model: the result goes back with the call's id, usage is summed."""
    result, sent, ran = await run_loop(
        [
            completion(None, ("c1", "calc__add", '{"a": 2, "b": 3}')),
            completion("5"),
        ]
    )
    assert ran == [(ToolRef("calc", "add"), {"a": 2, "b": 3})]
    assert sent[1]["messages"][-1] == {"role": "tool", "tool_call_id": "c1", "content": "5"}
    assert result.completion["choices"][0]["message"]["content"] == "5"
    assert result.completion["usage"]["total_tokens"] == 14
    assert result.rounds == 2


def thought(reply: dict[str, Any], reasoning: str) -> dict[str, Any]:
    reply["choices"][0]["message"]["reasoning_content"] = reasoning
    return reply


@pytest.mark.parametrize("keep", [False, True])
async def test_reasoning_goes_back_only_when_the_profile_keeps_it(keep):
    """The reasoning before an MCP call goes back upstream with the call when the
    model's template reads it (keep), not otherwise."""
    replies = [
        thought(completion(None, ("c1", "calc__add", '{"a": 2}')), "Add them."),
        completion("2"),
    ]
    _, sent, _ = await run_loop(replies, keep_reasoning=keep)
    assistant = sent[1]["messages"][1]
    assert assistant["role"] == "assistant"
    assert ("reasoning_content" in assistant) is keep
    if keep:
        assert assistant["reasoning_content"] == "Add them."


async def test_tools_described_in_each_round_for_a_template_without_tools():
    """describe_tools: every round's request describes the tools in the system message
    (no tools field), the earlier call and result as text; the call written as text
    runs."""
    tool = {"type": "function", "function": {"name": "calc__add", "parameters": {}}}
    written = '<tool_call>\n{"name": "calc__add", "arguments": {"a": 2, "b": 3}}\n</tool_call>'
    _, sent, ran = await run_loop(
        [completion(written), completion("5")],
        tools=[tool],
        text_tool_calls=True,
        describe_tools=True,
    )
    assert ran == [(ToolRef("calc", "add"), {"a": 2, "b": 3})]
    assert all("tools" not in body for body in sent)
    assert sent[0]["messages"][0]["role"] == "system"
    assert "calc__add" in sent[0]["messages"][0]["content"]
    roles = [m["role"] for m in sent[1]["messages"]]
    assert roles == ["system", "user", "assistant", "user"]
    assert "<tool_call>" in sent[1]["messages"][2]["content"]
    assert sent[1]["messages"][3]["content"].startswith("<tool_response>")


async def test_a_client_call_ends_the_loop_after_the_mcp_calls_of_its_round():
    """A call to the client's own tool goes back to the client; the MCP call beside it
    ran first."""
    result, sent, ran = await run_loop(
        [
            completion(None, ("c1", "calc__add", '{"a": 1}'), ("k1", "lookup", "{}")),
        ]
    )
    assert len(ran) == 1 and len(sent) == 1
    assert result.completion["choices"][0]["finish_reason"] == "tool_calls"
    assert [c["id"] for c in result.completion["choices"][0]["message"]["tool_calls"]] == ["k1"]
    assert result.ended_mid_round


async def test_at_the_limit_the_answer_is_asked_for():
    """After max_rounds rounds with calls, one more request with tool_choice none."""
    result, sent, ran = await run_loop(
        [
            completion(None, ("c1", "calc__add", '{"a": 1}')),
            completion(None, ("c2", "calc__add", '{"a": 2}')),
            completion("done"),
        ],
        max_rounds=2,
    )
    assert len(ran) == 2 and sent[2]["tool_choice"] == "none"
    assert result.completion["choices"][0]["message"]["content"] == "done"


def test_text_calls_to_client_tools_in_a_whole_reply():
    """A whole reply's text call to one of the client's own tools is a client call."""
    content = '<tool_call>\n{"name": "lookup", "arguments": {"q": 1}}\n</tool_call>'
    reply = Round({"calc__add"}, text_tool_calls=True, client_tools={"lookup"})
    message = {"role": "assistant", "content": content}
    reply.feed_completion({"id": "c1", "choices": [{"finish_reason": "stop", "message": message}]})
    reply.finish()
    assert [(c.name, c.arguments_text) for c in reply.client_calls] == [("lookup", '{"q": 1}')]
    assert reply.mcp_calls == [] and reply.content == []


def _streamed(reply: Round, content: str, step: int, finish: str | None = "stop") -> list[dict]:
    """``content`` fed in deltas of ``step`` characters; the chunks relayed."""
    relayed = []
    for i in range(0, len(content), step):
        relayed += reply.feed(chunk({"content": content[i : i + step]}))
    if finish is not None:
        relayed += reply.feed(chunk({}, finish))
    else:
        relayed += reply.end_of_stream()
    reply.finish()
    return relayed


def _relayed_text(relayed: list[dict], key: str = "content") -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in relayed)


@pytest.mark.parametrize("step", [1, 3, 1000])
def test_streamed_text_calls_are_held_back_and_become_calls(step):
    """In a stream, a call written as text never reaches the client as text: an MCP
    call is held for the loop to run, a call to the client's tool goes out as a
    structured call; the text around them streams."""
    content = (
        'Let me check. <tool_call>{"name": "calc__add", "arguments": {"a": 1}}</tool_call>'
        '<tool_call>{"name": "lookup", "arguments": {"q": 2}}</tool_call>'
    )
    reply = Round({"calc__add"}, text_tool_calls=True, client_tools={"lookup"})
    relayed = _streamed(reply, content, step)
    assert _relayed_text(relayed) == "Let me check. "
    sent_calls = [c for r in relayed for c in r["choices"][0]["delta"].get("tool_calls") or []]
    assert [
        (c["index"], c["function"]["name"], c["function"]["arguments"]) for c in sent_calls
    ] == [(0, "lookup", '{"q": 2}')]
    assert [(c.name, c.arguments_text) for c in reply.mcp_calls] == [("calc__add", '{"a": 1}')]
    assert [c.id for c in reply.client_calls] == [sent_calls[0]["id"]]
    message = reply.assistant_message(include_client_calls=False)
    assert message["content"] == "Let me check."
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["calc__add"]


@pytest.mark.parametrize("step", [1, 4])
def test_streamed_thinking_in_tags_is_reasoning(step):
    """<think> at the start of a round's content streams as reasoning_content; the
    content keeps the answer only."""
    reply = Round({"calc__add"}, text_tool_calls=True, profile=ModelProfile(think_tags=(THINK,)))
    relayed = _streamed(reply, "<think>Add them.</think>\n\nThe sum is 3.", step)
    assert _relayed_text(relayed, "reasoning_content") == "Add them."
    assert _relayed_text(relayed) == "The sum is 3."
    assert "".join(reply.reasoning) == "Add them."


@pytest.mark.parametrize("step", [1, 5])
def test_streamed_text_that_is_no_call_is_released_unchanged(step):
    """A tag naming a tool nobody offered, and a held tag at a stream's abrupt end, go
    out as the text they were."""
    content = 'Use <tool_call>{"name": "nope", "arguments": {}}</tool_call> then <tool'
    reply = Round({"calc__add"}, text_tool_calls=True, client_tools={"lookup"})
    relayed = _streamed(reply, content, step, finish=None)
    assert _relayed_text(relayed) == content
    assert reply.mcp_calls == [] and reply.client_calls == []
