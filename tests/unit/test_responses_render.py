"""render: Responses tools, settings and items -> a chat completions request."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Callable
from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.profiles import ModelProfile
from proxy.responses.render import (
    COMPACTION_PREFIX,
    IMAGE_PLACEHOLDER,
    ChatTools,
    ToolNames,
    chat_body_bytes,
    chat_settings,
    convert_tools,
    decode_compaction,
    encode_compaction,
    join_message_arrays,
    render_items,
)
from proxy.responses.request import CreateRequest, parse_create


def counter_ids() -> Callable[[str], str]:
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


def parse(body: dict[str, Any]) -> CreateRequest:
    return parse_create(body, counter_ids())


def b64(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


PARAMS = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Weather for a city",
    "parameters": PARAMS,
    "strict": True,
}
FILES = {
    "type": "namespace",
    "name": "fs",
    "description": "Files",
    "tools": [
        {"type": "function", "name": "read", "parameters": PARAMS},
        {"name": "write", "description": "Write a file"},
    ],
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": PARAMS,
        "description": "Weather for a city",
        "strict": True,
    },
}
CHAT_READ = {
    "type": "function",
    "function": {"name": "fs__read", "parameters": PARAMS, "description": "Files"},
}
CHAT_WRITE = {
    "type": "function",
    "function": {
        "name": "fs__write",
        "parameters": {"type": "object", "properties": {}},
        "description": "Write a file",
    },
}


def tools_for(body: dict[str, Any], **kwargs: Any) -> ChatTools:
    return convert_tools(parse(body), **kwargs)


# --- tools ---------------------------------------------------------------------


def test_function_and_namespace_tools() -> None:
    """Function tools become chat functions; namespace members become <namespace>__<name>."""
    tools = tools_for({"tools": [WEATHER, FILES]})
    assert tools.tools == [CHAT_WEATHER, CHAT_READ, CHAT_WRITE]
    assert tools.tool_choice == "auto"
    assert tools.dropped == []


def test_function_tool_minimal() -> None:
    """A function tool without parameters gets an empty object schema and no description."""
    tools = tools_for({"tools": [{"type": "function", "name": "ping"}]})
    assert tools.tools == [
        {
            "type": "function",
            "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}},
        }
    ]


def test_tool_names_map_back() -> None:
    """ToolNames maps flat chat names back to (namespace, name) and knows unknown names."""
    names = tools_for({"tools": [WEATHER, FILES]}).names
    assert names.split("fs__read") == ("fs", "read")
    assert names.split("fs__write") == ("fs", "write")
    assert names.split("get_weather") == (None, "get_weather")
    assert names.split("other__thing") == (None, "other__thing")
    assert names.flat("fs", "read") == "fs__read"
    assert names.flat(None, "get_weather") == "get_weather"
    assert names.flat("other", "x") == "other__x"
    assert names.from_flat == {
        "get_weather": (None, "get_weather"),
        "fs__read": ("fs", "read"),
        "fs__write": ("fs", "write"),
    }


HOSTED = [
    {"type": "web_search"},
    {"type": "web_search_preview"},
    {"type": "file_search", "vector_store_ids": ["vs_1"]},
    {"type": "local_shell"},
    {"type": "shell"},
    {"type": "apply_patch"},
    {"type": "image_generation"},
    {"type": "code_interpreter", "container": {"type": "auto"}},
    {"type": "computer_use_preview", "display_width": 1, "display_height": 1},
    {"type": "custom", "name": "c"},
    {"type": "tool_search"},
]


def test_hosted_tools_dropped_by_default() -> None:
    """Tools only OpenAI can run are dropped (and listed) unless rejection is asked for."""
    tools = tools_for({"tools": [*HOSTED, WEATHER]})
    assert tools.tools == [CHAT_WEATHER]
    assert tools.dropped == [t["type"] for t in HOSTED]


def test_a_dropped_tool_type_is_logged_once(caplog, monkeypatch) -> None:
    """Codex CLI offers web_search with every request: one warning, not one a request."""
    from proxy.responses import render

    monkeypatch.setattr(render, "_REPORTED_DROPS", set())
    for _ in range(3):
        tools_for({"tools": [{"type": "web_search"}, WEATHER]})
    tools_for({"tools": [{"type": "local_shell"}]})
    warnings = [r.getMessage() for r in caplog.records if "dropped tool types" in r.getMessage()]
    assert len(warnings) == 2
    assert "web_search" in warnings[0] and "local_shell" in warnings[1]


def test_only_hosted_tools_leave_no_tool_choice() -> None:
    """When every tool was dropped there is no chat tool and no tool_choice."""
    tools = tools_for({"tools": [{"type": "web_search"}], "tool_choice": "required"})
    assert (tools.tools, tools.tool_choice) == ([], None)


@pytest.mark.parametrize("hosted", HOSTED, ids=[t["type"] for t in HOSTED])
def test_hosted_tools_rejected_when_asked(hosted: dict[str, Any]) -> None:
    """With reject_unsupported=True a hosted tool is a 400 naming tools[i].type."""
    with pytest.raises(BadRequest) as info:
        tools_for({"tools": [WEATHER, hosted]}, reject_unsupported=True)
    assert info.value.param == "tools[1].type"


@pytest.mark.parametrize("reject", [False, True])
def test_unknown_tools_refused(reject: bool) -> None:
    """An unknown tool type is a 400 on tools[i].type in either mode."""
    with pytest.raises(BadRequest) as info:
        tools_for({"tools": [WEATHER, FILES, {"type": "bogus_tool"}]}, reject_unsupported=reject)
    assert info.value.param == "tools[2].type"


def test_mcp_tools_are_left_to_the_service() -> None:
    """An 'mcp' tool becomes no chat tool here: the service connects its server."""
    tools = tools_for({"tools": [WEATHER, {"type": "mcp", "server_label": "x"}]})
    assert [t["function"]["name"] for t in tools.tools] == ["get_weather"]


# (name, tool_choice, chat tool_choice, chat tool names left)
ALL_NAMES = ["get_weather", "fs__read", "fs__write"]
TOOL_CHOICES: list[tuple[str, Any, Any, list[str]]] = [
    ("absent", None, "auto", ALL_NAMES),
    ("auto", "auto", "auto", ALL_NAMES),
    ("none", "none", "none", ALL_NAMES),
    ("required", "required", "required", ALL_NAMES),
    (
        "function",
        {"type": "function", "name": "get_weather"},
        {"type": "function", "function": {"name": "get_weather"}},
        ALL_NAMES,
    ),
    (
        "namespaced-function",
        {"type": "function", "name": "read", "namespace": "fs"},
        {"type": "function", "function": {"name": "fs__read"}},
        ALL_NAMES,
    ),
    (
        "allowed-tools-required",
        {
            "type": "allowed_tools",
            "mode": "required",
            "tools": [
                {"type": "function", "name": "get_weather"},
                {"type": "function", "name": "write", "namespace": "fs"},
            ],
        },
        "required",
        ["get_weather", "fs__write"],
    ),
    (
        "allowed-tools-default-mode",
        {
            "type": "allowed_tools",
            "tools": [{"type": "function", "name": "read", "namespace": "fs"}],
        },
        "auto",
        ["fs__read"],
    ),
    (
        "allowed-tools-ignores-hosted-entries",
        {
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "web_search"}, {"type": "function", "name": "get_weather"}],
        },
        "auto",
        ["get_weather"],
    ),
    ("hosted-tool-chosen", {"type": "web_search_preview"}, "auto", ALL_NAMES),
]


@pytest.mark.parametrize(
    ("choice", "expected", "names"),
    [c[1:] for c in TOOL_CHOICES],
    ids=[c[0] for c in TOOL_CHOICES],
)
def test_tool_choice_mapping(choice: Any, expected: Any, names: list[str]) -> None:
    """tool_choice maps to the chat form; allowed_tools filters the tools and gives its mode."""
    tools = tools_for({"tools": [WEATHER, FILES], "tool_choice": choice})
    assert tools.tool_choice == expected
    assert [t["function"]["name"] for t in tools.tools] == names


@pytest.mark.parametrize(
    ("choice", "param"),
    [
        ({"type": "function", "name": "nope"}, "tool_choice.name"),
        ({"type": "function"}, "tool_choice.name"),
        ({"type": "function", "name": "read"}, "tool_choice.name"),
        ({"type": "function", "name": "read", "namespace": "other"}, "tool_choice.name"),
        ({"type": "allowed_tools", "mode": "none", "tools": []}, "tool_choice.mode"),
    ],
)
def test_tool_choice_errors(choice: Any, param: str) -> None:
    """A tool_choice naming a function that is not in tools (or an unusable mode) is a 400."""
    with pytest.raises(BadRequest) as info:
        tools_for({"tools": [WEATHER, FILES], "tool_choice": choice})
    assert info.value.param == param


# --- settings ------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "string"}}}
SETTINGS: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    ("empty", {}, {"model": "m"}),
    ("max-output-tokens", {"max_output_tokens": 100}, {"model": "m", "max_tokens": 100}),
    (
        "sampling-and-user",
        {
            "temperature": 0.2,
            "top_p": 0.9,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "user": "u1",
        },
        {
            "model": "m",
            "temperature": 0.2,
            "top_p": 0.9,
            "presence_penalty": 0.5,
            "frequency_penalty": -0.5,
            "user": "u1",
        },
    ),
    ("zero-temperature-kept", {"temperature": 0}, {"model": "m", "temperature": 0.0}),
    ("top-logprobs", {"top_logprobs": 5}, {"model": "m", "logprobs": True, "top_logprobs": 5}),
    ("top-logprobs-zero", {"top_logprobs": 0}, {"model": "m"}),
    (
        "reasoning-effort",
        {"reasoning": {"effort": "high"}},
        {"model": "m", "reasoning_effort": "high"},
    ),
    ("reasoning-summary-only", {"reasoning": {"summary": "auto"}}, {"model": "m"}),
    ("text-format-text", {"text": {"format": {"type": "text"}}}, {"model": "m"}),
    (
        "json-object",
        {"text": {"format": {"type": "json_object"}}},
        {"model": "m", "response_format": {"type": "json_object"}},
    ),
    (
        "json-schema",
        {"text": {"format": {"type": "json_schema", "name": "out", "schema": SCHEMA}}},
        {
            "model": "m",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "out", "schema": SCHEMA},
            },
        },
    ),
    (
        "json-schema-strict-description",
        {
            "text": {
                "format": {
                    "type": "json_schema",
                    "name": "out",
                    "schema": SCHEMA,
                    "strict": True,
                    "description": "The answer",
                }
            }
        },
        {
            "model": "m",
            "response_format": {
                "type": "json_schema",
                "json_schema": {
                    "name": "out",
                    "schema": SCHEMA,
                    "strict": True,
                    "description": "The answer",
                },
            },
        },
    ),
    (
        "tools-parallel-false",
        {"tools": [WEATHER], "parallel_tool_calls": False},
        {
            "model": "m",
            "tools": [CHAT_WEATHER],
            "tool_choice": "auto",
            "parallel_tool_calls": False,
        },
    ),
    (
        "tools-parallel-default",
        {"tools": [WEATHER], "tool_choice": "required"},
        {"model": "m", "tools": [CHAT_WEATHER], "tool_choice": "required"},
    ),
    ("parallel-false-without-tools", {"parallel_tool_calls": False}, {"model": "m"}),
    (
        "parallel-false-only-hosted-tools",
        {"tools": [{"type": "web_search"}], "parallel_tool_calls": False},
        {"model": "m"},
    ),
    (
        "not-forwarded",
        {
            "metadata": {"k": "v"},
            "safety_identifier": "s",
            "prompt_cache_key": "p",
            "store": False,
            "truncation": "auto",
            "instructions": "sys",
        },
        {"model": "m"},
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in SETTINGS], ids=[c[0] for c in SETTINGS]
)
def test_chat_settings(body: dict[str, Any], expected: dict[str, Any]) -> None:
    """Responses settings map to chat completion settings (and nothing else is sent)."""
    request = parse(body)
    assert chat_settings(request, "m", convert_tools(request)) == expected


# --- items -> messages ---------------------------------------------------------


def fc(call_id: str, name: str, arguments: str = "{}", **extra: Any) -> dict[str, Any]:
    return {
        "type": "function_call",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        **extra,
    }


def fco(call_id: str, output: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": output}


def tool_call(call_id: str, name: str, arguments: str = "{}") -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


IMAGE_URL = "data:image/png;base64,iVBORw0KGgo="
RENDER: list[tuple[str, list[Any], list[dict[str, Any]]]] = [
    ("user-string", [{"role": "user", "content": "hi"}], [{"role": "user", "content": "hi"}]),
    (
        "system-string",
        [{"role": "system", "content": "be brief"}],
        [{"role": "system", "content": "be brief"}],
    ),
    (
        "developer-becomes-system",
        [{"role": "developer", "content": "rules"}],
        [{"role": "system", "content": "rules"}],
    ),
    (
        "text-parts-joined",
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Hello, "},
                    {"type": "input_text", "text": "world"},
                ],
            }
        ],
        [{"role": "user", "content": "Hello, \nworld"}],
    ),
    (
        "image-makes-a-part-list",
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "what is this?"},
                    {"type": "input_image", "image_url": IMAGE_URL, "detail": "high"},
                    {"type": "input_image", "image_url": "https://example.com/a.png"},
                    {"type": "input_image", "image_url": IMAGE_URL, "detail": "auto"},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": IMAGE_URL, "detail": "high"}},
                    {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
                    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                ],
            }
        ],
    ),
    (
        "file-wrapped",
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Summarise:\n"},
                    {"type": "input_file", "filename": "notes.txt", "file_data": b64("héllo")},
                ],
            }
        ],
        [{"role": "user", "content": 'Summarise:\n\n<file name="notes.txt">\nhéllo\n</file>'}],
    ),
    (
        "file-data-url-without-name",
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_file", "file_data": "data:text/plain;base64," + b64("a,b")}
                ],
            }
        ],
        [{"role": "user", "content": '<file name="file">\na,b\n</file>'}],
    ),
    (
        "file-next-to-image",
        [
            {
                "role": "user",
                "content": [
                    {"type": "input_file", "filename": "x.md", "file_data": b64("# x")},
                    {"type": "input_image", "image_url": IMAGE_URL},
                ],
            }
        ],
        [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": '<file name="x.md">\n# x\n</file>'},
                    {"type": "image_url", "image_url": {"url": IMAGE_URL}},
                ],
            }
        ],
    ),
    (
        "assistant-string",
        [{"role": "assistant", "content": "done", "phase": "final_answer"}],
        [{"role": "assistant", "content": "done"}],
    ),
    (
        "assistant-output-text-and-refusal",
        [
            {
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": "I can't "},
                    {"type": "refusal", "refusal": "do that"},
                ],
            }
        ],
        [{"role": "assistant", "content": "I can't do that"}],
    ),
    (
        "assistant-then-calls-merged",
        [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": "Let me check."},
            fc("call_a", "get_weather", '{"city":"Paris"}'),
            fc("call_b", "get_weather", '{"city":"Lyon"}'),
        ],
        [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    tool_call("call_a", "get_weather", '{"city":"Paris"}'),
                    tool_call("call_b", "get_weather", '{"city":"Lyon"}'),
                ],
            },
        ],
    ),
    (
        "empty-assistant-then-call-content-none",
        [{"role": "assistant", "content": ""}, fc("call_a", "get_weather")],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_a", "get_weather")],
            }
        ],
    ),
    (
        "call-alone",
        [{"role": "user", "content": "go"}, fc("call_a", "get_weather")],
        [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_a", "get_weather")],
            },
        ],
    ),
    (
        "call-after-tool-message-starts-new-assistant",
        [
            fc("call_a", "get_weather"),
            fco("call_a", "sunny"),
            fc("call_b", "get_weather"),
            fco("call_b", "rain"),
            {"role": "assistant", "content": "Sunny, then rain."},
        ],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_a", "get_weather")],
            },
            {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_b", "get_weather")],
            },
            {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
            {"role": "assistant", "content": "Sunny, then rain."},
        ],
    ),
    (
        "tool-output-parts",
        [
            fco(
                "call_a",
                [
                    {"type": "input_text", "text": "line 1"},
                    {"type": "input_image", "image_url": IMAGE_URL},
                    {"type": "input_file", "filename": "r.csv", "file_data": b64("x")},
                    {"type": "input_file", "file_data": b64("x")},
                ],
            )
        ],
        [
            {
                "role": "tool",
                "tool_call_id": "call_a",
                "content": "line 1\n[image]\n[file r.csv]\n[file]",
            }
        ],
    ),
    (
        "namespace-call-flat-name",
        [fc("call_a", "read", '{"p":"x"}', namespace="fs")],
        [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [tool_call("call_a", "fs__read", '{"p":"x"}')],
            }
        ],
    ),
    (
        "reasoning-skipped-and-does-not-split-merge",
        [
            {"role": "user", "content": "q"},
            {"type": "reasoning", "summary": [], "encrypted_content": "opaque"},
            {"role": "assistant", "content": "Checking."},
            {"type": "reasoning", "summary": []},
            fc("call_a", "get_weather"),
        ],
        [
            {"role": "user", "content": "q"},
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [tool_call("call_a", "get_weather")],
            },
        ],
    ),
    (
        "compaction-as-user-message",
        [{"type": "compaction", "encrypted_content": encode_compaction("We said hello.")}],
        [{"role": "user", "content": COMPACTION_PREFIX + "We said hello."}],
    ),
]


@pytest.mark.parametrize(("items", "expected"), [c[1:] for c in RENDER], ids=[c[0] for c in RENDER])
def test_render_items(items: list[Any], expected: list[dict[str, Any]]) -> None:
    """Normalised input items render to chat messages in order."""
    request = parse({"input": items, "tools": [WEATHER, FILES]})
    messages = render_items(request.input, convert_tools(request).names)
    assert messages == expected
    json.dumps(messages)  # always serialisable: it is stored and sent again


def test_images_off_become_a_note() -> None:
    """With images=False each image becomes a short text note and content stays a string."""
    request = parse(
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "what is this? "},
                        {"type": "input_image", "image_url": IMAGE_URL, "detail": "high"},
                    ],
                },
                {"role": "user", "content": [{"type": "input_image", "image_url": IMAGE_URL}]},
            ]
        }
    )
    assert render_items(request.input, ToolNames(), images=False) == [
        {"role": "user", "content": "what is this? \n" + IMAGE_PLACEHOLDER},
        {"role": "user", "content": IMAGE_PLACEHOLDER},
    ]


def test_render_items_uses_flat_name_from_tool_names() -> None:
    """A call's flat name comes from the ToolNames of the request when known."""
    names = ToolNames()
    names.add("fs", "read")
    messages = render_items([fc("c", "read", namespace="fs")], names)
    assert messages[0]["tool_calls"][0]["function"]["name"] == "fs__read"


@pytest.mark.parametrize(
    "file_data",
    [
        b64(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"),
        b64(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n"),
        "data:application/octet-stream;base64," + b64(b"\xff\xfe\xfd"),
        "not base64 at all!",
    ],
    ids=["png", "pdf", "binary-data-url", "not-base64"],
)
def test_binary_file_refused(file_data: str) -> None:
    """A file that is not base64 UTF-8 text is a 400 (no PDF or binary extraction)."""
    request = parse(
        {"input": [{"role": "user", "content": [{"type": "input_file", "file_data": file_data}]}]}
    )
    with pytest.raises(BadRequest) as info:
        render_items(request.input, ToolNames())
    assert info.value.param == "input"


@pytest.mark.parametrize(
    "summary",
    ["", "We said hello.", 'quotes " and \\ and\nnewlines', "Zusammenfassung: äöü — 日本語 🙂"],
)
def test_compaction_round_trip(summary: str) -> None:
    """decode_compaction(encode_compaction(s)) gives s back."""
    encoded = encode_compaction(summary)
    assert isinstance(encoded, str)
    assert decode_compaction({"type": "compaction", "encrypted_content": encoded}) == summary


@pytest.mark.parametrize(
    "content",
    [
        "gAAAAABoX1_foreign_encrypted_content==",
        b64("not json"),
        b64(json.dumps({"other": "x"})),
        b64(json.dumps(["summary"])),
        b64(b"\xff\xfe"),
        "",
    ],
    ids=["openai-encrypted", "not-json", "no-summary", "json-array", "not-utf8", "empty"],
)
def test_foreign_compaction_refused(content: str) -> None:
    """A compaction item lmbridge did not make is a 400, also when rendered."""
    item = {"type": "compaction", "encrypted_content": content}
    with pytest.raises(BadRequest) as info:
        decode_compaction(item)
    assert info.value.param == "input"
    with pytest.raises(BadRequest):
        render_items([{**item, "id": "cmp_1"}], ToolNames())


@pytest.mark.parametrize(
    "content",
    [[{"type": "input_text", "text": "Earlier answer."}], ["Earlier answer."]],
    ids=["input-text-part", "bare-string-part"],
)
def test_assistant_input_text_parts_kept(content: list[Any]) -> None:
    """An assistant message whose parts are input_text keeps its text."""
    request = parse({"input": [{"role": "assistant", "content": content}]})
    assert render_items(request.input, ToolNames()) == [
        {"role": "assistant", "content": "Earlier answer."}
    ]


# --- the chat body ---------------------------------------------------------------

JOIN: list[tuple[str, list[str], str]] = [
    ("none", [], "[]"),
    ("all-empty", ["[]", "[ ]", " [\n] "], "[]"),
    ("one", ['[{"role":"user","content":"x"}]'], '[{"role":"user","content":"x"}]'),
    (
        "kept-exactly",
        [
            '[{"role":"system","content":"s"}]',
            "[]",
            '[ {"role" : "user", "content": "\\u00e9", "n": 1e2} ]',
            '[{"z":1,"a":2},{"b":[]}]\n',
        ],
        '[{"role":"system","content":"s"},{"role" : "user", "content": "\\u00e9", "n": 1e2},'
        '{"z":1,"a":2},{"b":[]}]',
    ),
]


@pytest.mark.parametrize(("arrays", "expected"), [c[1:] for c in JOIN], ids=[c[0] for c in JOIN])
def test_join_message_arrays(arrays: list[str], expected: str) -> None:
    """Array texts are concatenated as they are (no re-serialisation); empty ones vanish."""
    joined = join_message_arrays(arrays)
    assert joined == expected
    assert json.loads(joined) == [m for a in arrays for m in json.loads(a)]


MESSAGES_JSON = '[{"role":"system","content":"s"},{"role" : "user", "content": "h\\u00e9 ü"}]'


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "settings",
    [
        {"model": "m"},
        {"model": "qwen/qwen3", "temperature": 0.5, "tools": [CHAT_WEATHER], "tool_choice": "auto"},
    ],
    ids=["model-only", "with-tools"],
)
def test_chat_body_bytes(settings: dict[str, Any], stream: bool) -> None:
    """The body is valid JSON: settings, messages verbatim, stream options when streaming."""
    before = json.loads(json.dumps(settings))
    body = chat_body_bytes(settings, MESSAGES_JSON, stream=stream)
    assert isinstance(body, bytes)
    data = json.loads(body)
    assert data["messages"] == json.loads(MESSAGES_JSON)
    assert MESSAGES_JSON.encode() in body
    expected = {**settings, "messages": data["messages"]}
    if stream:
        expected |= {"stream": True, "stream_options": {"include_usage": True}}
    assert data == expected
    assert settings == before  # the prepared settings are reused for every call


def test_chat_body_bytes_end_to_end() -> None:
    """chat_settings + rendered items + join + chat_body_bytes give the expected request."""
    request = parse(
        {
            "input": [{"role": "user", "content": "weather in Paris?"}],
            "tools": [WEATHER],
            "max_output_tokens": 50,
        }
    )
    tools = convert_tools(request)
    messages = join_message_arrays(
        [
            '[{"role":"system","content":"sys"}]',
            json.dumps(render_items(request.input, tools.names)),
        ]
    )
    data = json.loads(chat_body_bytes(chat_settings(request, "m", tools), messages, stream=True))
    assert data == {
        "model": "m",
        "tools": [CHAT_WEATHER],
        "tool_choice": "auto",
        "max_tokens": 50,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [
            {"role": "system", "content": "sys"},
            {"role": "user", "content": "weather in Paris?"},
        ],
    }


def test_chat_body_bytes_empty_settings() -> None:
    """Empty settings still give valid JSON with only the messages."""
    assert json.loads(chat_body_bytes({}, "[]", stream=False)) == {"messages": []}


@pytest.mark.parametrize(
    "inputs",
    [
        [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi"}]}],
        [{"type": "message", "role": "developer", "content": "Be brief."}],
        # An assistant message last: the output's call joins it, so both render together.
        [
            {"type": "message", "role": "user", "content": "Hi"},
            {
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": "Let me look."}],
            },
        ],
        # A function call's output last.
        [
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
        [],
    ],
)
def test_a_turn_renders_as_its_input_and_output_together(inputs):
    """The stored turn reuses the input's rendering where nothing can merge across."""
    from types import SimpleNamespace

    from proxy.responses.input_items import normalize_item
    from proxy.responses.recorder import _turn_messages

    items = [normalize_item(item, f"input[{i}]") for i, item in enumerate(inputs)]
    names = ToolNames()
    output = [
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": []},
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "c2",
            "name": "g",
            "arguments": "{}",
            "status": "completed",
        },
    ]
    prepared = SimpleNamespace(
        model=SimpleNamespace(vision=None),
        input_items=items,
        new_messages=render_items(items, names),
        tools=SimpleNamespace(names=names),
        profile=ModelProfile(),
    )
    assert _turn_messages(prepared, output) == render_items([*items, *output], names)
