"""Responses -> chat completions: items to messages, tools, settings. Pure: no I/O.

The rendering of a turn is stored with it and sent again, unchanged, on every
later turn of the chain, so the upstream sees the same prompt prefix and can
reuse its cache. Anything that changes here changes what new turns look like,
never what stored ones look like.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from proxy.errors import BadRequest
from proxy.jsontext import dumps
from proxy.mcp.names import exposed_name
from proxy.responses.request import CreateRequest

log = logging.getLogger("lmbridge.responses")
# Hosted tool types already reported as dropped (a bounded set: HOSTED_TOOL_TYPES).
_REPORTED_DROPS: set[str] = set()

NAMESPACE_SEPARATOR = "__"
# Tool types a chat completion upstream cannot run (OpenAI runs them server-side).
HOSTED_TOOL_TYPES = frozenset(
    {
        "web_search",
        "web_search_preview",
        "web_search_2025_08_26",
        "web_search_preview_2025_03_11",
        "file_search",
        "local_shell",
        "shell",
        "apply_patch",
        "image_generation",
        "code_interpreter",
        "computer",
        "computer_use",
        "computer_use_preview",
        "custom",
        "tool_search",
    }
)
COMPACTION_PREFIX = "Summary of the conversation so far:\n"


@dataclass
class ToolNames:
    """Flat chat tool names <-> (namespace, name) of the Responses tools."""

    to_flat: dict[tuple[str | None, str], str] = field(default_factory=dict)
    from_flat: dict[str, tuple[str | None, str]] = field(default_factory=dict)

    def add(self, namespace: str | None, name: str) -> str:
        flat = f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name
        self.to_flat[(namespace, name)] = flat
        self.from_flat[flat] = (namespace, name)
        return flat

    def flat(self, namespace: str | None, name: str) -> str:
        known = self.to_flat.get((namespace, name))
        if known is not None:
            return known
        return f"{namespace}{NAMESPACE_SEPARATOR}{name}" if namespace else name

    def split(self, flat: str) -> tuple[str | None, str]:
        return self.from_flat.get(flat, (None, flat))


@dataclass
class ChatTools:
    tools: list[dict[str, Any]]
    tool_choice: Any
    names: ToolNames
    dropped: list[str]


def convert_tools(request: CreateRequest, *, reject_unsupported: bool = False) -> ChatTools:
    """Function and namespace tools become chat tools; hosted tools are dropped (logged)
    or rejected; ``mcp`` tools are left to the service, which connects their servers."""
    names = ToolNames()
    tools: list[dict[str, Any]] = []
    dropped: list[str] = []
    for index, tool in enumerate(request.tools):
        kind = tool["type"]
        if kind == "function":
            tools.append(_chat_function(tool, names.add(None, tool["name"])))
        elif kind == "namespace":
            for member in tool["tools"]:
                description = member.get("description") or tool.get("description")
                flat = names.add(tool["name"], member["name"])
                tools.append(_chat_function({**member, "description": description}, flat))
        elif kind == "mcp":
            continue  # the service connects the servers (proxy/responses/mcp_tools.py)
        elif reject_unsupported or kind not in HOSTED_TOOL_TYPES:
            raise BadRequest(
                f"Tool type {kind!r} cannot be served by a chat completions upstream; "
                "lmbridge accepts 'function' and 'namespace' tools.",
                param=f"tools[{index}].type",
            )
        else:
            dropped.append(kind)
    if unreported := [kind for kind in dropped if kind not in _REPORTED_DROPS]:
        # Once per type: Codex CLI offers web_search with every request.
        _REPORTED_DROPS.update(unreported)
        log.warning(
            "dropped tool types the upstream cannot serve: %s (said once per type; "
            'responses.unsupported_tools = "reject" refuses them instead)',
            ", ".join(sorted(set(unreported))),
        )
    choice = _chat_tool_choice(request.tool_choice, names, tools)
    if isinstance(choice, tuple):
        allowed, choice = choice
        tools = [t for t in tools if t["function"]["name"] in allowed]
    return ChatTools(tools, choice, names, dropped)


def _chat_function(tool: Mapping[str, Any], name: str) -> dict[str, Any]:
    function: dict[str, Any] = {
        "name": name,
        "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
    }
    if tool.get("description"):
        function["description"] = tool["description"]
    if tool.get("strict") is not None:
        function["strict"] = tool["strict"]
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: Any, names: ToolNames, tools: list[dict[str, Any]]) -> Any:
    if not tools:
        return None
    if isinstance(choice, str):
        return choice
    kind = choice.get("type")
    if kind == "function":
        if not isinstance(choice.get("name"), str):
            raise BadRequest("'tool_choice.name' is required.", param="tool_choice.name")
        flat = names.flat(choice.get("namespace"), choice["name"])
        if flat not in names.from_flat:
            raise BadRequest(
                f"'tool_choice' names the function {choice['name']!r}, which is not in 'tools'.",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": flat}}
    if kind == "allowed_tools":
        allowed: set[str] = set()
        for entry in choice.get("tools") or []:
            if isinstance(entry, dict) and entry.get("type") == "function" and entry.get("name"):
                allowed.add(names.flat(entry.get("namespace"), entry["name"]))
        mode = choice.get("mode", "auto")
        if mode not in ("auto", "required"):
            raise BadRequest(
                "'tool_choice.mode' must be 'auto' or 'required'.", param="tool_choice.mode"
            )
        return (allowed, mode)
    if kind == "mcp":
        return "auto"  # set by the service once it knows the server's tools
    # A hosted tool was chosen but cannot run here: let the model decide.
    return "auto"


# --- items -> messages -------------------------------------------------------


IMAGE_PLACEHOLDER = "[image omitted: the model does not read images]"


def render_items(
    items: Iterable[Mapping[str, Any]],
    names: ToolNames,
    *,
    images: bool = True,
    reasoning: bool = False,
) -> list[dict[str, Any]]:
    """Chat messages for a run of items, in order. An assistant message and the function
    calls that follow it become one assistant message with ``tool_calls``. With
    ``images=False`` (a model known to read text only) images become a short note, so
    that the upstream does not fail the whole request. With ``reasoning`` (the model's
    template reads it) reasoning items become the ``reasoning_content`` of the assistant
    message they precede; otherwise they stay in state only."""
    messages: list[dict[str, Any]] = []
    # Results of MCP calls wait until every call of the same assistant turn is in it.
    results: list[dict[str, Any]] = []
    thought: list[str] = []  # reasoning waiting for the assistant message it precedes
    for item in items:
        kind = item.get("type")
        if kind == "reasoning":
            if reasoning:
                thought.append(reasoning_text(item))
            continue
        call = _as_call(item, names)
        if call is not None:
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
                if last.get("content") == "":
                    last["content"] = None
                _add_reasoning(last, thought)
            else:
                messages += results
                results.clear()
                message = {"role": "assistant", "content": None, "tool_calls": [call]}
                messages.append(_add_reasoning(message, thought))
            if kind == "mcp_call":
                results.append(
                    {"role": "tool", "tool_call_id": item["id"], "content": mcp_call_text(item)}
                )
            continue
        messages += results
        results.clear()
        if kind == "message":
            rendered = _render_message(item, images)
            if rendered is not None and rendered["role"] == "assistant":
                _add_reasoning(rendered, thought)
            thought.clear()  # reasoning is the assistant's: none goes before a user message
            if rendered is not None:
                messages.append(rendered)
            continue
        if kind == "function_call_output":
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _tool_output_text(item["output"]),
                }
            )
        elif kind == "mcp_call":  # an approved call: its request was the assistant's call
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["approval_request_id"],
                    "content": mcp_call_text(item),
                }
            )
        elif kind == "mcp_approval_response" and not item.get("approve"):
            reason = f" Reason: {item['reason']}" if item.get("reason") else ""
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["approval_request_id"],
                    "content": f"The user denied this tool call.{reason}",
                }
            )
        elif kind == "compaction":
            messages.append(
                {"role": "user", "content": COMPACTION_PREFIX + decode_compaction(item)}
            )
        # mcp_list_tools, an approval given: kept in state, not sent upstream.
    messages += results
    return messages


def reasoning_text(item: Mapping[str, Any]) -> str:
    """A reasoning item's text: its reasoning_text parts, else its summary."""
    for key in ("content", "summary"):
        parts = item.get(key)
        if isinstance(parts, list):
            text = "".join(
                str(p.get("text", "")) for p in parts if isinstance(p, dict) and p.get("text")
            )
            if text:
                return text
    return ""


def _add_reasoning(message: dict[str, Any], thought: list[str]) -> dict[str, Any]:
    text = "".join(thought)
    thought.clear()
    if text:
        message["reasoning_content"] = message.get("reasoning_content", "") + text
    return message


def _as_call(item: Mapping[str, Any], names: ToolNames) -> dict[str, Any] | None:
    """The assistant tool call an item stands for, if it is one."""
    kind = item.get("type")
    if kind == "function_call":
        name, call_id = names.flat(item.get("namespace"), item["name"]), item["call_id"]
    elif kind == "mcp_approval_request" or (
        kind == "mcp_call" and not item.get("approval_request_id")
    ):
        name, call_id = exposed_name(item["server_label"], item["name"]), item["id"]
    else:
        return None
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": item.get("arguments") or "{}"},
    }


def mcp_call_text(item: Mapping[str, Any]) -> str:
    """What the model read back from an MCP call."""
    if isinstance(item.get("output"), str):
        return str(item["output"])
    error = item.get("error")
    if isinstance(error, dict):
        content = error.get("content")
        texts = (
            [b.get("text", "") for b in content if isinstance(b, dict)]
            if isinstance(content, list)
            else []
        )
        detail = error.get("message") or "\n".join(texts) or json.dumps(content)
        return str(detail) if texts else f"The tool call failed: {detail}"
    return f"The tool call failed: {error}" if error else "(no result)"


def _render_message(item: Mapping[str, Any], images: bool) -> dict[str, Any] | None:
    role = item["role"]
    parts = item.get("content") or []
    if role == "assistant":
        text = "".join(
            p.get("refusal", "") if p.get("type") == "refusal" else p.get("text", "") for p in parts
        )
        return {"role": "assistant", "content": text}
    chat_role = "system" if role == "developer" else role
    rendered: list[dict[str, Any]] = []
    for part in parts:
        kind = part.get("type")
        if kind in ("input_text", "output_text"):
            rendered.append({"type": "text", "text": part["text"]})
        elif kind == "input_image" and not images:
            rendered.append({"type": "text", "text": IMAGE_PLACEHOLDER})
        elif kind == "input_image":
            image: dict[str, Any] = {"url": part["image_url"]}
            if part.get("detail") in ("low", "high"):
                image["detail"] = part["detail"]
            rendered.append({"type": "image_url", "image_url": image})
        elif kind == "input_file":
            rendered.append({"type": "text", "text": _file_text(part)})
    if all(p["type"] == "text" for p in rendered):
        # Separate parts are separate paragraphs (Codex sends its context and the
        # request as two parts); glued together they would run words into each other.
        return {"role": chat_role, "content": "\n".join(p["text"] for p in rendered)}
    return {"role": chat_role, "content": rendered}


def _file_text(part: Mapping[str, Any]) -> str:
    data = part["file_data"]
    if data.startswith("data:"):
        data = data.split(",", 1)[-1]
    name = part.get("filename") or "file"
    try:
        text = base64.b64decode(data, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"The file {name!r} is not base64-encoded UTF-8 text; lmbridge passes text files "
            "to the model (no PDF or binary extraction).",
            param="input",
        ) from None
    return f"<file name={json.dumps(name)}>\n{text}\n</file>"


def _tool_output_text(output: Any) -> str:
    if isinstance(output, str):
        return output
    texts = []
    for part in output:
        if isinstance(part, dict):
            if part.get("type") in ("input_text", "output_text", "text"):
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "input_image":
                texts.append("[image]")
            elif part.get("type") == "input_file":
                texts.append(f"[file {part.get('filename') or ''}]".replace(" ]", "]"))
    return "\n".join(texts)


def encode_compaction(summary: str) -> str:
    """What lmbridge puts in a compaction item: the summary, base64 (it is not encrypted:
    a local daemon has nobody to hide it from)."""
    return base64.b64encode(json.dumps({"summary": summary}).encode()).decode()


def decode_compaction(item: Mapping[str, Any]) -> str:
    try:
        data = json.loads(base64.b64decode(item["encrypted_content"], validate=True))
        return str(data["summary"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise BadRequest(
            "This compaction item was not made by lmbridge (its content cannot be read).",
            param="input",
        ) from None


# --- the chat request --------------------------------------------------------


def chat_settings(request: CreateRequest, model: str, tools: ChatTools) -> dict[str, Any]:
    """The chat completion body without ``messages``."""
    body: dict[str, Any] = {"model": model}
    if tools.tools:
        body["tools"] = tools.tools
        if tools.tool_choice is not None:
            body["tool_choice"] = tools.tool_choice
        if not request.parallel_tool_calls:
            body["parallel_tool_calls"] = False
    if request.max_output_tokens is not None:
        body["max_tokens"] = request.max_output_tokens
    for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty", "user"):
        value = getattr(request, name)
        if value is not None:
            body[name] = value
    if request.top_logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = request.top_logprobs
    effort = (request.reasoning or {}).get("effort")
    if isinstance(effort, str):
        body["reasoning_effort"] = effort
    response_format = _response_format(request.text.get("format"))
    if response_format is not None:
        body["response_format"] = response_format
    return body


def _response_format(fmt: Mapping[str, Any] | None) -> dict[str, Any] | None:
    if not fmt or fmt.get("type") == "text":
        return None
    if fmt["type"] == "json_object":
        return {"type": "json_object"}
    schema: dict[str, Any] = {"name": fmt["name"], "schema": fmt["schema"]}
    if fmt.get("strict") is not None:
        schema["strict"] = fmt["strict"]
    if fmt.get("description"):
        schema["description"] = fmt["description"]
    return {"type": "json_schema", "json_schema": schema}


def system_messages(request: CreateRequest) -> list[dict[str, Any]]:
    """``instructions`` apply to this turn only: they are never stored with the chain."""
    return [{"role": "system", "content": request.instructions}] if request.instructions else []


def join_message_arrays(arrays: Iterable[str]) -> str:
    """Concatenate JSON array texts (``[a,b]``, ``[c]``) into one array text, without
    parsing them: stored turns go upstream exactly as they were rendered."""
    inner = [a.strip()[1:-1].strip() for a in arrays]
    return "[" + ",".join(i for i in inner if i) + "]"


def chat_body_bytes(settings: Mapping[str, Any], messages_json: str, *, stream: bool) -> bytes:
    """The upstream request body: settings plus the already-serialised messages."""
    head = dict(settings)
    if stream:
        head["stream"] = True
        head["stream_options"] = {"include_usage": True}
    head["messages"] = None  # a placeholder keeps the splice below valid for any settings
    text = dumps(head)
    assert text.endswith('"messages":null}')
    return (text[: -len("null}")] + messages_json + "}").encode()


def estimate_tokens(text: str) -> int:
    """A rough token count (about four characters a token) for truncation decisions."""
    return len(text) // 4 + 1
