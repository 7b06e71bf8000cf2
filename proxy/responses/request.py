"""A ``POST /v1/responses`` body, checked and normalised. Pure: no I/O.

``parse_create`` turns the JSON body into a ``CreateRequest`` or raises
``BadRequest`` with the offending ``param`` (``input[2].content``,
``tools[0].name``, ...). Its input items are normalised by ``input_items``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.chat_output import SWITCHES_FIELD, read_switches
from proxy.errors import BadRequest
from proxy.ids import new_id
from proxy.responses.input_items import normalize_input
from proxy.structured import SchemaProblem, check_schema

TRUNCATION = ("auto", "disabled")
# The closed sets of the API (and of the SDK's Response model, which echoes them).
SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast", "ultrafast")
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "max")
REASONING_SUMMARIES = ("auto", "concise", "detailed")
VERBOSITIES = ("low", "medium", "high")


@dataclass
class CreateRequest:
    """The settings of one ``POST /v1/responses``; ``raw`` keeps the body as sent."""

    raw: dict[str, Any]
    model: str | None
    input: list[dict[str, Any]]
    instructions: str | None
    previous_response_id: str | None
    conversation_id: str | None
    store: bool
    background: bool
    stream: bool
    tools: list[dict[str, Any]]
    tool_choice: Any
    parallel_tool_calls: bool
    max_tool_calls: int | None
    mcp_max_rounds: int | None  # lmbridge's extension: may lower mcp.max_rounds
    max_output_tokens: int | None
    temperature: float | None
    top_p: float | None
    presence_penalty: float | None
    frequency_penalty: float | None
    top_logprobs: int | None
    text: dict[str, Any]
    reasoning: dict[str, Any] | None
    truncation: str
    metadata: dict[str, str]
    user: str | None
    safety_identifier: str | None
    prompt_cache_key: str | None
    service_tier: str | None
    include: list[str] = field(default_factory=list)
    # lmbridge's extension: {"text_tool_calls": false, "think_tags": false} turns off
    # what lmbridge reads out of the model's answer.
    switches: dict[str, bool] = field(default_factory=dict)
    # False: the turn is recorded (input, tools, instructions) and answered without
    # asking the model, so that the next turn continues from it (WebSocket warm-up).
    generate: bool = True


def parse_create(
    body: Mapping[str, Any],
    ids: Callable[[str], str] = new_id,
    *,
    max_input_items: int | None = None,
) -> CreateRequest:
    """Check a create body; raise BadRequest naming the parameter that is wrong."""
    check = _Checker(body)
    model = check.optional_str("model")
    conversation = body.get("conversation")
    conversation_id: str | None
    if conversation is None or isinstance(conversation, str):
        conversation_id = conversation
    elif isinstance(conversation, dict) and isinstance(conversation.get("id"), str):
        conversation_id = conversation["id"]
    else:
        raise BadRequest(
            "'conversation' must be a conversation id or an object with an 'id'.",
            param="conversation",
        )
    previous = check.optional_str("previous_response_id")
    if previous is not None and conversation_id is not None:
        raise BadRequest(
            "'previous_response_id' and 'conversation' cannot be used together: a response "
            "continues either a chain of responses or a conversation.",
            param="previous_response_id",
        )
    if body.get("prompt") is not None:
        raise BadRequest(
            "Prompt templates ('prompt') are not supported by lmbridge; send 'input' and "
            "'instructions' instead.",
            param="prompt",
        )
    instructions = body.get("instructions")
    if isinstance(instructions, list):
        instructions = _instructions_from_items(instructions)
    elif instructions is not None and not isinstance(instructions, str):
        raise BadRequest("'instructions' must be a string.", param="instructions")

    store = check.bool("store", True)
    background = check.bool("background", False)
    if background and not store:
        raise BadRequest(
            "A background response must be stored: 'background': true needs 'store': true "
            "(the default).",
            param="background",
        )
    truncation = body.get("truncation") or "disabled"
    if truncation not in TRUNCATION:
        raise BadRequest("'truncation' must be 'auto' or 'disabled'.", param="truncation")
    text = body.get("text") or {}
    if not isinstance(text, dict):
        raise BadRequest("'text' must be an object.", param="text")
    _check_text_format(text)
    reasoning = body.get("reasoning")
    if reasoning is not None and not isinstance(reasoning, dict):
        raise BadRequest("'reasoning' must be an object.", param="reasoning")
    if reasoning:
        _check_choice(reasoning.get("effort"), REASONING_EFFORTS, "reasoning.effort")
        _check_choice(reasoning.get("summary"), REASONING_SUMMARIES, "reasoning.summary")
    _check_choice(text.get("verbosity"), VERBOSITIES, "text.verbosity")
    _check_choice(body.get("service_tier"), SERVICE_TIERS, "service_tier")
    metadata = body.get("metadata") or {}
    _check_metadata(metadata)
    include = body.get("include") or []
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise BadRequest("'include' must be an array of strings.", param="include")

    tools = body.get("tools") or []
    if not isinstance(tools, list):
        raise BadRequest("'tools' must be an array.", param="tools")
    for index, tool in enumerate(tools):
        _check_tool(tool, f"tools[{index}]")

    return CreateRequest(
        raw=dict(body),
        model=model or None,
        input=normalize_input(body.get("input"), ids, max_items=max_input_items),
        instructions=instructions,
        previous_response_id=previous,
        conversation_id=conversation_id,
        store=store,
        background=background,
        stream=check.bool("stream", False),
        tools=tools,
        tool_choice=_tool_choice(body.get("tool_choice")),
        parallel_tool_calls=check.bool("parallel_tool_calls", True),
        max_tool_calls=check.optional_int("max_tool_calls", minimum=1),
        mcp_max_rounds=check.optional_int("mcp_max_rounds", minimum=1),
        max_output_tokens=check.optional_int("max_output_tokens", minimum=1),
        temperature=check.optional_number("temperature", 0, 2),
        top_p=check.optional_number("top_p", 0, 1),
        presence_penalty=check.optional_number("presence_penalty", -2, 2),
        frequency_penalty=check.optional_number("frequency_penalty", -2, 2),
        top_logprobs=check.optional_int("top_logprobs", minimum=0, maximum=20),
        text=text,
        reasoning=reasoning,
        truncation=truncation,
        metadata=metadata,
        user=check.optional_str("user"),
        safety_identifier=check.optional_str("safety_identifier"),
        prompt_cache_key=check.optional_str("prompt_cache_key"),
        service_tier=check.optional_str("service_tier"),
        include=include,
        generate=check.bool("generate", True),
        switches=_switches(body.get(SWITCHES_FIELD)),
    )


def _switches(value: Any) -> dict[str, bool]:
    try:
        return read_switches(value)
    except ValueError as exc:
        raise BadRequest(str(exc), param=SWITCHES_FIELD) from None


class _Checker:
    def __init__(self, body: Mapping[str, Any]) -> None:
        self.body = body

    def optional_str(self, name: str) -> str | None:
        value = self.body.get(name)
        if value is not None and not isinstance(value, str):
            raise BadRequest(f"'{name}' must be a string.", param=name)
        return value

    def bool(self, name: str, default: bool) -> bool:
        value = self.body.get(name)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"'{name}' must be a boolean.", param=name)
        return value

    def optional_int(
        self, name: str, *, minimum: int | None = None, maximum: int | None = None
    ) -> int | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadRequest(f"'{name}' must be an integer.", param=name)
        if minimum is not None and value < minimum:
            raise BadRequest(f"'{name}' must be at least {minimum}.", param=name)
        if maximum is not None and value > maximum:
            raise BadRequest(f"'{name}' must be at most {maximum}.", param=name)
        return value

    def optional_number(self, name: str, low: float, high: float) -> float | None:
        value = self.body.get(name)
        if value is None:
            return None
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BadRequest(f"'{name}' must be a number.", param=name)
        if not low <= value <= high:
            raise BadRequest(f"'{name}' must be between {low:g} and {high:g}.", param=name)
        return float(value)


def _check_choice(value: Any, choices: tuple[str, ...], param: str) -> None:
    if value is not None and value not in choices:
        raise BadRequest(f"'{param}' must be one of {', '.join(choices)}.", param=param)


def _check_metadata(metadata: Any) -> None:
    if not isinstance(metadata, dict):
        raise BadRequest("'metadata' must be an object of strings.", param="metadata")
    if len(metadata) > 16:
        raise BadRequest("'metadata' may hold at most 16 keys.", param="metadata")
    for key, value in metadata.items():
        if not isinstance(value, str) or len(key) > 64 or len(value) > 512:
            raise BadRequest(
                "'metadata' values must be strings (keys up to 64 characters, values up to 512).",
                param=f"metadata.{key}",
            )


def _check_text_format(text: Mapping[str, Any]) -> None:
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
        raise BadRequest(
            "'text.format.type' must be 'text', 'json_object' or 'json_schema'.",
            param="text.format.type",
        )
    if fmt["type"] == "json_schema":
        if not isinstance(fmt.get("name"), str) or not fmt["name"]:
            raise BadRequest(
                "'text.format.name' is required for json_schema.", param="text.format.name"
            )
        if not isinstance(fmt.get("schema"), dict):
            raise BadRequest(
                "'text.format.schema' must be a JSON schema object.", param="text.format.schema"
            )
        try:
            check_schema(fmt["schema"], "text.format.schema")
        except SchemaProblem as exc:
            raise BadRequest(str(exc), param=exc.param) from None


def _check_tool(tool: Any, where: str) -> None:
    if not isinstance(tool, dict) or not isinstance(tool.get("type"), str):
        raise BadRequest("Each tool must be an object with a 'type'.", param=f"{where}.type")
    kind = tool["type"]
    if kind == "mcp":
        _check_mcp_tool(tool, where)
    elif kind == "function":
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequest("A function tool needs a 'name'.", param=f"{where}.name")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise BadRequest(
                "'parameters' must be a JSON schema object.", param=f"{where}.parameters"
            )
    elif kind == "namespace":
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise BadRequest("A namespace tool needs a 'name'.", param=f"{where}.name")
        inner = tool.get("tools")
        if not isinstance(inner, list):
            raise BadRequest("A namespace tool needs a 'tools' array.", param=f"{where}.tools")
        for index, member in enumerate(inner):
            if not isinstance(member, dict) or member.get("type", "function") != "function":
                raise BadRequest(
                    "A namespace holds function tools only.", param=f"{where}.tools[{index}].type"
                )
            _check_tool({**member, "type": "function"}, f"{where}.tools[{index}]")


def _check_mcp_tool(tool: dict[str, Any], where: str) -> None:
    label = tool.get("server_label")
    if not isinstance(label, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", label):
        raise BadRequest(
            "An mcp tool needs a 'server_label' of 1-64 letters, digits, '_', '-' or '.'.",
            param=f"{where}.server_label",
        )
    if tool.get("connector_id") is not None:
        raise BadRequest(
            "OpenAI's connectors are not available through lmbridge; use "
            "'server_url' or a server of lmbridge's configuration.",
            param=f"{where}.connector_id",
        )
    url = tool.get("server_url")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://", url)):
        raise BadRequest(
            "'server_url' must be an http:// or https:// URL.", param=f"{where}.server_url"
        )
    headers = tool.get("headers")
    if headers is not None and (
        not isinstance(headers, dict)
        or not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items())
    ):
        raise BadRequest("'headers' must be an object of strings.", param=f"{where}.headers")
    if tool.get("authorization") is not None and not isinstance(tool["authorization"], str):
        raise BadRequest("'authorization' must be a string.", param=f"{where}.authorization")
    allowed = tool.get("allowed_tools")
    if allowed is not None and not (
        (isinstance(allowed, list) and all(isinstance(n, str) for n in allowed))
        or (isinstance(allowed, dict) and _is_tool_filter(allowed))
    ):
        raise BadRequest(
            "'allowed_tools' must be a list of tool names or an object with 'tool_names' "
            "and/or 'read_only'.",
            param=f"{where}.allowed_tools",
        )
    approval = tool.get("require_approval")
    if (
        approval is not None
        and approval not in ("always", "never")
        and not (
            isinstance(approval, dict)
            and set(approval) <= {"always", "never"}
            and all(isinstance(v, dict) and _is_tool_filter(v) for v in approval.values())
        )
    ):
        raise BadRequest(
            "'require_approval' must be 'always', 'never' or an object with "
            "'always' and/or 'never' tool filters.",
            param=f"{where}.require_approval",
        )


def _is_tool_filter(value: dict[str, Any]) -> bool:
    names = value.get("tool_names")
    read_only = value.get("read_only")
    return (
        set(value) <= {"tool_names", "read_only"}
        and (names is None or (isinstance(names, list) and all(isinstance(n, str) for n in names)))
        and (read_only is None or isinstance(read_only, bool))
    )


def _tool_choice(value: Any) -> Any:
    if value is None:
        return "auto"
    if value in ("auto", "none", "required"):
        return value
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return value
    raise BadRequest(
        "'tool_choice' must be 'auto', 'none', 'required' or an object naming a tool.",
        param="tool_choice",
    )


def _instructions_from_items(items: list[Any]) -> str:
    """Instructions given as input items: their text, joined."""
    texts: list[str] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest(
                "Each instruction item must be an object.", param=f"instructions[{index}]"
            )
        content = item.get("content")
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            texts += [p.get("text", "") for p in content if isinstance(p, dict)]
    return "\n\n".join(t for t in texts if t)
