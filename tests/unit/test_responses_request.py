"""parse_create and normalize_input: a POST /v1/responses body, checked and normalised."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest

from proxy.errors import BadRequest
from proxy.responses.input_items import normalize_input, normalize_item
from proxy.responses.request import parse_create

Ids = Callable[[str], str]


def counter_ids() -> Ids:
    """Deterministic ids: ``msg_1``, ``fc_2``, ... in the order they are asked for."""
    counter = itertools.count(1)
    return lambda prefix: f"{prefix}_{next(counter)}"


def parse(body: dict[str, Any]) -> Any:
    return parse_create(body, counter_ids())


def bad_param(body: dict[str, Any]) -> str | None:
    with pytest.raises(BadRequest) as info:
        parse(body)
    assert info.value.status == 400
    assert info.value.error_type == "invalid_request_error"
    return info.value.param


TEXT_PART = {"type": "input_text", "text": "look"}
IMAGE_PART = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
FILE_PART = {"type": "input_file", "file_data": "aGVsbG8=", "filename": "a.txt"}


def test_string_input_is_one_user_message() -> None:
    """A string input becomes one completed user message with one input_text part and an id."""
    request = parse({"input": "Hello there"})
    assert request.input == [
        {
            "type": "message",
            "id": "msg_1",
            "role": "user",
            "content": [{"type": "input_text", "text": "Hello there"}],
            "status": "completed",
        }
    ]


def test_no_input_is_an_empty_list() -> None:
    """A body without input parses to an empty item list."""
    assert parse({}).input == []
    assert normalize_input(None, counter_ids()) == []


# (name, item as sent, item as normalised with the first counter id)
ITEM_CASES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "user-string",
        {"role": "user", "content": "hi"},
        {
            "type": "message",
            "id": "msg_1",
            "role": "user",
            "content": [{"type": "input_text", "text": "hi"}],
            "status": "completed",
        },
    ),
    (
        "system-string",
        {"type": "message", "role": "system", "content": "be brief"},
        {
            "type": "message",
            "id": "msg_1",
            "role": "system",
            "content": [{"type": "input_text", "text": "be brief"}],
            "status": "completed",
        },
    ),
    (
        "developer-parts",
        {"role": "developer", "content": [{"type": "input_text", "text": "rules"}]},
        {
            "type": "message",
            "id": "msg_1",
            "role": "developer",
            "content": [{"type": "input_text", "text": "rules"}],
            "status": "completed",
        },
    ),
    (
        "assistant-string-with-phase",
        {"role": "assistant", "content": "done", "phase": "final_answer"},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "done", "annotations": []}],
            "status": "completed",
            "phase": "final_answer",
        },
    ),
    (
        "assistant-output-parts-commentary",
        {
            "type": "message",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "x"}, {"type": "refusal", "refusal": "no"}],
            "phase": "commentary",
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [
                {"type": "output_text", "text": "x", "annotations": []},
                {"type": "refusal", "refusal": "no"},
            ],
            "status": "completed",
            "phase": "commentary",
        },
    ),
    (
        "user-text-image-file-and-bare-string",
        {"role": "user", "content": [TEXT_PART, IMAGE_PART, FILE_PART, "plain"]},
        {
            "type": "message",
            "id": "msg_1",
            "role": "user",
            "content": [TEXT_PART, IMAGE_PART, FILE_PART, {"type": "input_text", "text": "plain"}],
            "status": "completed",
        },
    ),
    (
        "message-status-kept",
        {"role": "assistant", "content": "cut", "status": "incomplete"},
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "content": [{"type": "output_text", "text": "cut", "annotations": []}],
            "status": "incomplete",
        },
    ),
    (
        "function-call",
        {"type": "function_call", "call_id": "call_9", "name": "f", "arguments": "{}"},
        {
            "type": "function_call",
            "call_id": "call_9",
            "name": "f",
            "arguments": "{}",
            "status": "completed",
            "id": "fc_1",
        },
    ),
    (
        "function-call-namespaced",
        {
            "type": "function_call",
            "call_id": "call_9",
            "name": "read",
            "namespace": "fs",
            "arguments": '{"p":1}',
        },
        {
            "type": "function_call",
            "call_id": "call_9",
            "name": "read",
            "namespace": "fs",
            "arguments": '{"p":1}',
            "status": "completed",
            "id": "fc_1",
        },
    ),
    (
        "function-call-output-string",
        {"type": "function_call_output", "call_id": "call_9", "output": "sunny"},
        {
            "type": "function_call_output",
            "call_id": "call_9",
            "output": "sunny",
            "status": "completed",
            "id": "fco_1",
        },
    ),
    (
        "function-call-output-parts",
        {"type": "function_call_output", "call_id": "call_9", "output": [TEXT_PART]},
        {
            "type": "function_call_output",
            "call_id": "call_9",
            "output": [TEXT_PART],
            "status": "completed",
            "id": "fco_1",
        },
    ),
    (
        "reasoning-encrypted",
        {"type": "reasoning", "encrypted_content": "opaque"},
        {"type": "reasoning", "encrypted_content": "opaque", "summary": [], "id": "rs_1"},
    ),
    (
        "reasoning-summary-kept",
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "s"}], "id": "rs_1"},
    ),
    (
        "item-reference",
        {"type": "item_reference", "id": "msg_old"},
        {"type": "item_reference", "id": "msg_old"},
    ),
    (
        "compaction",
        {"type": "compaction", "encrypted_content": "e30="},
        {"type": "compaction", "encrypted_content": "e30=", "id": "cmp_1"},
    ),
]


@pytest.mark.parametrize(
    ("item", "expected"), [c[1:] for c in ITEM_CASES], ids=[c[0] for c in ITEM_CASES]
)
def test_input_item_normalised(item: dict[str, Any], expected: dict[str, Any]) -> None:
    """Each accepted input item comes out complete: type, id, status, content as parts."""
    assert parse({"input": [item]}).input == [expected]


@pytest.mark.parametrize(
    ("item", "prefix"),
    [
        ({"role": "user", "content": "x"}, "msg"),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": ""}, "fc"),
        ({"type": "function_call_output", "call_id": "c", "output": ""}, "fco"),
        ({"type": "reasoning", "summary": []}, "rs"),
        ({"type": "compaction", "encrypted_content": "x"}, "cmp"),
    ],
)
def test_missing_or_empty_id_assigned_with_prefix(item: dict[str, Any], prefix: str) -> None:
    """An item without an id (or with an empty one) gets a new id with its type's prefix."""
    seen: list[str] = []

    def ids(p: str) -> str:
        seen.append(p)
        return f"{p}_new"

    assert normalize_item(item, "input[0]", ids)["id"] == f"{prefix}_new"
    assert normalize_item({**item, "id": ""}, "input[0]", ids)["id"] == f"{prefix}_new"
    assert seen == [prefix, prefix]


@pytest.mark.parametrize(
    "item",
    [
        {"role": "user", "content": "x", "id": "msg_given"},
        {"type": "function_call", "call_id": "c", "name": "f", "arguments": "", "id": "fc_given"},
        {"type": "function_call_output", "call_id": "c", "output": "", "id": "fco_given"},
        {"type": "reasoning", "summary": [], "id": "rs_given"},
        {"type": "compaction", "encrypted_content": "x", "id": "cmp_given"},
        {"type": "item_reference", "id": "msg_ref"},
    ],
)
def test_given_id_kept(item: dict[str, Any]) -> None:
    """An item that carries an id keeps it and asks for no new one."""

    def ids(prefix: str) -> str:
        raise AssertionError(f"no id should be generated, asked for {prefix}")

    assert normalize_item(item, "input[0]", ids)["id"] == item["id"]


def test_ids_distinct_across_items() -> None:
    """Several items without ids get distinct ids, each with its own prefix, in order."""
    request = parse(
        {
            "input": [
                {"role": "user", "content": "a"},
                {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c1", "output": "r"},
                {"type": "reasoning", "summary": []},
                {"role": "assistant", "content": "b"},
            ]
        }
    )
    assert [item["id"] for item in request.input] == ["msg_1", "fc_2", "fco_3", "rs_4", "msg_5"]


def test_input_not_mutated() -> None:
    """Normalising does not change the body's own items."""
    item = {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}
    body = {"input": [item]}
    parse(body)
    assert item == {"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"}


def test_defaults() -> None:
    """An empty body gets the API's defaults."""
    request = parse({})
    assert request.model is None
    assert request.instructions is None
    assert request.previous_response_id is None
    assert request.conversation_id is None
    assert (request.store, request.background, request.stream) == (True, False, False)
    assert request.tools == []
    assert request.tool_choice == "auto"
    assert request.parallel_tool_calls is True
    assert request.truncation == "disabled"
    assert request.text == {}
    assert request.metadata == {}
    assert request.include == []
    for name in (
        "max_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "presence_penalty",
        "frequency_penalty",
        "top_logprobs",
        "reasoning",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
    ):
        assert getattr(request, name) is None, name


def test_settings_kept() -> None:
    """Valid settings come through with their values (numbers as floats)."""
    body = {
        "model": "qwen",
        "instructions": "Be brief.",
        "previous_response_id": "resp_0",
        "store": False,
        "stream": True,
        "parallel_tool_calls": False,
        "max_tool_calls": 3,
        "max_output_tokens": 100,
        "temperature": 0,
        "top_p": 1,
        "presence_penalty": -2,
        "frequency_penalty": 2,
        "top_logprobs": 20,
        "text": {"format": {"type": "json_schema", "name": "n", "schema": {}}},
        "reasoning": {"effort": "low"},
        "truncation": "auto",
        "metadata": {"k": "v"},
        "include": ["reasoning.encrypted_content"],
        "user": "u",
        "safety_identifier": "s",
        "prompt_cache_key": "p",
        "service_tier": "auto",
        "tool_choice": {"type": "function", "name": "f"},
        "tools": [{"type": "function", "name": "f"}],
    }
    request = parse(body)
    assert request.raw == body
    assert request.model == "qwen"
    assert request.instructions == "Be brief."
    assert request.previous_response_id == "resp_0"
    assert (request.store, request.stream, request.parallel_tool_calls) == (False, True, False)
    assert (request.max_tool_calls, request.max_output_tokens, request.top_logprobs) == (3, 100, 20)
    assert (request.temperature, request.top_p) == (0.0, 1.0)
    assert isinstance(request.temperature, float)
    assert (request.presence_penalty, request.frequency_penalty) == (-2.0, 2.0)
    assert request.text == body["text"]
    assert request.reasoning == {"effort": "low"}
    assert request.truncation == "auto"
    assert request.metadata == {"k": "v"}
    assert request.include == ["reasoning.encrypted_content"]
    assert (request.user, request.safety_identifier) == ("u", "s")
    assert (request.prompt_cache_key, request.service_tier) == ("p", "auto")
    assert request.tool_choice == {"type": "function", "name": "f"}
    assert request.tools == [{"type": "function", "name": "f"}]


@pytest.mark.parametrize(
    ("conversation", "expected"),
    [("conv_1", "conv_1"), ({"id": "conv_2"}, "conv_2"), (None, None)],
)
def test_conversation_id_or_object(conversation: Any, expected: str | None) -> None:
    """'conversation' is a conversation id or an object with an id."""
    assert parse({"conversation": conversation}).conversation_id == expected


def test_background_with_store_default() -> None:
    """A background response is allowed when store is left at its default (true)."""
    request = parse({"background": True})
    assert (request.background, request.store) == (True, True)


def test_instructions_as_items_joined() -> None:
    """Instructions given as input items become their texts joined by blank lines."""
    request = parse(
        {
            "instructions": [
                {"role": "developer", "content": "One."},
                {"role": "system", "content": [{"type": "input_text", "text": "Two."}]},
                {"role": "developer", "content": ""},
            ]
        }
    )
    assert request.instructions == "One.\n\nTwo."


def _part_body(part: Any, role: str = "user") -> dict[str, Any]:
    return {"input": [{"role": role, "content": [part]}]}


def _wrong_types() -> list[tuple[str, dict[str, Any], str]]:
    """Every scalar setting given a value of the wrong JSON type."""
    cases: list[tuple[str, dict[str, Any], str]] = []
    for name in ("store", "background", "stream", "parallel_tool_calls"):
        for value in ("true", 1, 0):
            cases.append((f"{name}={value!r}", {name: value}, name))
    for name in ("max_tool_calls", "max_output_tokens", "top_logprobs"):
        for value in ("3", 1.5, True, [1]):
            cases.append((f"{name}={value!r}", {name: value}, name))
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        for value in ("0.5", True, {}):
            cases.append((f"{name}={value!r}", {name: value}, name))
    for name in (
        "model",
        "previous_response_id",
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "service_tier",
    ):
        for value in (5, True, ["x"]):
            cases.append((f"{name}={value!r}", {name: value}, name))
    return cases


OUT_OF_RANGE: list[tuple[str, dict[str, Any], str]] = [
    ("temperature-high", {"temperature": 2.01}, "temperature"),
    ("temperature-negative", {"temperature": -0.1}, "temperature"),
    ("top_p-high", {"top_p": 1.5}, "top_p"),
    ("top_p-negative", {"top_p": -0.5}, "top_p"),
    ("presence-high", {"presence_penalty": 2.5}, "presence_penalty"),
    ("presence-low", {"presence_penalty": -2.1}, "presence_penalty"),
    ("frequency-high", {"frequency_penalty": 3}, "frequency_penalty"),
    ("frequency-low", {"frequency_penalty": -3}, "frequency_penalty"),
    ("top_logprobs-high", {"top_logprobs": 21}, "top_logprobs"),
    ("top_logprobs-negative", {"top_logprobs": -1}, "top_logprobs"),
    ("max_output_tokens-zero", {"max_output_tokens": 0}, "max_output_tokens"),
    ("max_tool_calls-zero", {"max_tool_calls": 0}, "max_tool_calls"),
    ("temperature-nan", {"temperature": float("nan")}, "temperature"),
]

BAD_BODIES: list[tuple[str, dict[str, Any], str]] = [
    # input and its items
    ("input-number", {"input": 5}, "input"),
    ("input-object", {"input": {"role": "user"}}, "input"),
    ("item-not-object", {"input": [5]}, "input[0]"),
    (
        "role-unknown",
        {"input": [{"role": "user", "content": "a"}, {"role": "tool", "content": "x"}]},
        "input[1].role",
    ),
    ("role-missing", {"input": [{"type": "message", "content": "x"}]}, "input[0].role"),
    ("content-number", {"input": [{"role": "user", "content": 5}]}, "input[0].content"),
    ("content-missing", {"input": [{"role": "user"}]}, "input[0].content"),
    (
        "part-type-unknown",
        {
            "input": [
                {
                    "role": "user",
                    "content": [TEXT_PART, TEXT_PART, {"type": "input_audio", "data": "x"}],
                }
            ]
        },
        "input[0].content[2].type",
    ),
    ("part-not-object", _part_body(7), "input[0].content[0].type"),
    ("part-without-type", _part_body({"text": "x"}), "input[0].content[0].type"),
    ("input-text-without-text", _part_body({"type": "input_text"}), "input[0].content[0].text"),
    (
        "output-text-text-not-string",
        _part_body({"type": "output_text", "text": 1}, "assistant"),
        "input[0].content[0].text",
    ),
    (
        "refusal-without-refusal",
        _part_body({"type": "refusal"}, "assistant"),
        "input[0].content[0].refusal",
    ),
    (
        "image-file-id-refused",
        _part_body({"type": "input_image", "file_id": "file_1"}),
        "input[0].content[0].file_id",
    ),
    (
        "image-without-url",
        _part_body({"type": "input_image", "detail": "auto"}),
        "input[0].content[0].image_url",
    ),
    (
        "file-url-refused",
        _part_body({"type": "input_file", "file_url": "https://example.com/a.pdf"}),
        "input[0].content[0].file_url",
    ),
    (
        "file-id-refused",
        _part_body({"type": "input_file", "file_id": "file_1"}),
        "input[0].content[0].file_id",
    ),
    (
        "file-without-data",
        _part_body({"type": "input_file", "filename": "a.txt"}),
        "input[0].content[0].file_data",
    ),
    (
        "phase-unknown",
        {"input": [{"role": "assistant", "content": "x", "phase": "thinking"}]},
        "input[0].phase",
    ),
    ("item-type-unknown", {"input": [{"type": "web_search_call", "id": "ws"}]}, "input[0].type"),
    ("item-without-type-or-role", {"input": [{"content": "x"}]}, "input[0].type"),
    (
        "function-call-without-call-id",
        {"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]},
        "input[0].call_id",
    ),
    (
        "function-call-name-not-string",
        {"input": [{"type": "function_call", "call_id": "c", "name": 1, "arguments": "{}"}]},
        "input[0].name",
    ),
    (
        "function-call-arguments-object",
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": {}}]},
        "input[0].arguments",
    ),
    (
        "function-call-output-without-call-id",
        {"input": [{"type": "function_call_output", "output": "x"}]},
        "input[0].call_id",
    ),
    (
        "function-call-output-number",
        {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
        "input[0].output",
    ),
    (
        "compaction-without-content",
        {"input": [{"type": "compaction"}]},
        "input[0].encrypted_content",
    ),
    (
        "reasoning-summary-string",
        {"input": [{"type": "reasoning", "summary": "x"}]},
        "input[0].summary",
    ),
    ("item-reference-without-id", {"input": [{"type": "item_reference"}]}, "input[0].id"),
    # request-level settings
    ("conversation-number", {"conversation": 5}, "conversation"),
    ("conversation-object-without-id", {"conversation": {"name": "x"}}, "conversation"),
    (
        "conversation-and-previous",
        {"conversation": "conv_1", "previous_response_id": "resp_1"},
        "previous_response_id",
    ),
    (
        "conversation-object-and-previous",
        {"conversation": {"id": "conv_1"}, "previous_response_id": "resp_1"},
        "previous_response_id",
    ),
    ("prompt-template", {"prompt": {"id": "pmpt_1"}}, "prompt"),
    ("instructions-number", {"instructions": 5}, "instructions"),
    ("instructions-item-not-object", {"instructions": ["x"]}, "instructions[0]"),
    ("background-without-store", {"background": True, "store": False}, "background"),
    ("truncation-unknown", {"truncation": "sometimes"}, "truncation"),
    ("truncation-object", {"truncation": {"type": "auto"}}, "truncation"),
    ("text-string", {"text": "json"}, "text"),
    ("text-format-string", {"text": {"format": "json"}}, "text.format.type"),
    ("text-format-unknown", {"text": {"format": {"type": "xml"}}}, "text.format.type"),
    (
        "json-schema-without-name",
        {"text": {"format": {"type": "json_schema", "schema": {}}}},
        "text.format.name",
    ),
    (
        "json-schema-empty-name",
        {"text": {"format": {"type": "json_schema", "name": "", "schema": {}}}},
        "text.format.name",
    ),
    (
        "json-schema-without-schema",
        {"text": {"format": {"type": "json_schema", "name": "n"}}},
        "text.format.schema",
    ),
    ("reasoning-string", {"reasoning": "high"}, "reasoning"),
    ("metadata-array", {"metadata": ["k"]}, "metadata"),
    ("metadata-value-number", {"metadata": {"k": 1}}, "metadata.k"),
    ("metadata-value-too-long", {"metadata": {"k": "v" * 513}}, "metadata.k"),
    ("metadata-key-too-long", {"metadata": {"k" * 65: "v"}}, "metadata." + "k" * 65),
    ("metadata-too-many-keys", {"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata"),
    ("include-string", {"include": "x"}, "include"),
    ("include-number-entry", {"include": [1]}, "include"),
    # tools and tool_choice
    ("tools-object", {"tools": {"type": "function"}}, "tools"),
    ("tool-not-object", {"tools": [5]}, "tools[0].type"),
    ("tool-without-type", {"tools": [{"name": "f"}]}, "tools[0].type"),
    ("function-without-name", {"tools": [{"type": "function"}]}, "tools[0].name"),
    ("function-empty-name", {"tools": [{"type": "function", "name": ""}]}, "tools[0].name"),
    (
        "function-parameters-array",
        {
            "tools": [
                {"type": "function", "name": "f"},
                {"type": "function", "name": "g", "parameters": []},
            ]
        },
        "tools[1].parameters",
    ),
    (
        "namespace-without-name",
        {"tools": [{"type": "namespace", "tools": []}]},
        "tools[0].name",
    ),
    (
        "namespace-without-tools",
        {"tools": [{"type": "namespace", "name": "ns"}]},
        "tools[0].tools",
    ),
    (
        "namespace-member-not-function",
        {
            "tools": [
                {"type": "namespace", "name": "ns", "tools": [{"type": "custom", "name": "c"}]}
            ]
        },
        "tools[0].tools[0].type",
    ),
    (
        "namespace-member-not-object",
        {"tools": [{"type": "namespace", "name": "ns", "tools": ["f"]}]},
        "tools[0].tools[0].type",
    ),
    (
        "namespace-member-without-name",
        {
            "tools": [
                {"type": "namespace", "name": "ns", "tools": [{"name": "a"}, {"type": "function"}]}
            ]
        },
        "tools[0].tools[1].name",
    ),
    ("tool-choice-unknown-string", {"tool_choice": "sometimes"}, "tool_choice"),
    ("tool-choice-number", {"tool_choice": 1}, "tool_choice"),
    ("tool-choice-without-type", {"tool_choice": {"name": "f"}}, "tool_choice"),
    ("tool-choice-array", {"tool_choice": ["auto"]}, "tool_choice"),
]

ALL_BAD = BAD_BODIES + _wrong_types() + OUT_OF_RANGE


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in ALL_BAD], ids=[c[0] for c in ALL_BAD])
def test_bad_request_names_param(body: dict[str, Any], param: str) -> None:
    """A body that is wrong raises BadRequest whose param names exactly what is wrong."""
    assert bad_param(body) == param


@pytest.mark.parametrize(
    "body",
    [
        {"temperature": 2, "top_p": 0, "presence_penalty": 2, "frequency_penalty": -2},
        {"temperature": 0.0, "top_p": 1.0, "top_logprobs": 0, "max_output_tokens": 1},
        {"max_tool_calls": 1, "metadata": {f"k{i}": "v" * 512 for i in range(16)}},
        {"metadata": {"k" * 64: ""}},
        {"tool_choice": "none"},
        {"tool_choice": "required"},
        {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": []}},
        {"text": {"format": {"type": "text"}}},
        {"text": {"format": {"type": "json_object"}}},
        {"tools": [{"type": "namespace", "name": "ns", "tools": [{"name": "a"}]}]},
        {"tools": [{"type": "web_search"}, {"type": "mcp", "server_label": "x"}]},
        {"input": [{"role": "user", "content": []}]},
    ],
)
def test_boundary_values_accepted(body: dict[str, Any]) -> None:
    """Values at the edge of their range, and tool kinds refused only later, parse."""
    parse(body)


@pytest.mark.parametrize("item", [{"id": "msg_old"}, {"type": None, "id": "msg_old"}])
def test_item_reference_type_optional(item: dict[str, Any]) -> None:
    """An input item with only an 'id' is an item_reference."""
    assert parse({"input": [item]}).input == [{"type": "item_reference", "id": "msg_old"}]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"service_tier": "bogus"}, "service_tier"),
        ({"reasoning": {"effort": "bogus"}}, "reasoning.effort"),
        ({"reasoning": {"summary": "bogus"}}, "reasoning.summary"),
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
    ],
)
def test_enum_settings_checked(body: dict[str, Any], param: str) -> None:
    """Settings with a closed set of values refuse anything else with their param."""
    assert bad_param(body) == param


def test_more_input_items_than_the_limit_are_refused_naming_the_setting() -> None:
    """An input longer than max_input_items is a 400 on 'input' that names
    responses.max_input_items; one at the limit is read."""
    items = [{"role": "user", "content": "hi"}] * 4
    assert len(parse_create({"input": items[:3]}, counter_ids(), max_input_items=3).input) == 3
    with pytest.raises(BadRequest) as info:
        parse_create({"input": items}, counter_ids(), max_input_items=3)
    assert (info.value.param, info.value.code) == ("input", "too_many_items")
    assert "responses.max_input_items" in info.value.message
