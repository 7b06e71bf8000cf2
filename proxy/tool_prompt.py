"""Tools described in the system message, for a model whose chat template cannot render
tools (llama.cpp's ``/props`` says ``supports_tools: false``: SmolLM2's template, which
drops ``tools`` so that the model never sees them).

``describe_tools`` rewrites a chat request: the offered function tools go into the system
message with the instruction to call them as ``<tool_call>{...}</tool_call>`` blocks (the
Hermes form, which Qwen's templates write, and which ``proxy/model_output`` reads back),
and the calls and results of earlier turns become text in the same form, since such a
template may not render them either. Pure: no I/O.
"""

from __future__ import annotations

import json
from typing import Any

_INTRO = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_HOW = (
    "\n</tools>\n\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)
# Fields of a chat request that only a template with tools can use.
_TOOL_FIELDS = ("tools", "tool_choice", "parallel_tool_calls")


def tools_text(functions: list[dict[str, Any]]) -> str:
    """The system message's description of ``functions`` (chat tools' ``function``)."""
    lines = "\n".join(json.dumps(f, ensure_ascii=False) for f in functions)
    return _INTRO + lines + _HOW


def describe_tools(body: dict[str, Any]) -> bool:
    """Rewrite ``body`` in place, its function tools described as text; whether it
    changed (not when it offers none, or says ``tool_choice: "none"``)."""
    tools = body.get("tools")
    if not isinstance(tools, list) or body.get("tool_choice") == "none":
        return False
    functions = [
        t["function"]
        for t in tools
        if isinstance(t, dict) and isinstance(t.get("function"), dict) and t["function"].get("name")
    ]
    if not functions:
        return False
    for key in _TOOL_FIELDS:
        body.pop(key, None)
    messages = [_as_text(m) for m in body.get("messages") or []]
    description = tools_text(functions)
    first = messages[0] if messages else None
    if isinstance(first, dict) and first.get("role") in ("system", "developer"):
        text = _text(first.get("content"))
        messages[0] = {**first, "content": f"{text}\n\n{description}" if text else description}
    else:
        messages.insert(0, {"role": "system", "content": description})
    body["messages"] = messages
    return True


def _as_text(message: Any) -> Any:
    """A message of an earlier tool round as text: an assistant's calls as
    ``<tool_call>`` blocks after its content, a tool result as a user message in
    ``<tool_response>`` tags."""
    if not isinstance(message, dict):
        return message
    role = message.get("role")
    if role == "assistant" and message.get("tool_calls"):
        blocks = []
        for call in message["tool_calls"]:
            function = call.get("function") if isinstance(call, dict) else None
            if not isinstance(function, dict):
                continue
            arguments = function.get("arguments")
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
            except ValueError:
                parsed = arguments
            call_json = json.dumps(
                {"name": function.get("name"), "arguments": parsed}, ensure_ascii=False
            )
            blocks.append(f"<tool_call>\n{call_json}\n</tool_call>")
        text = _text(message.get("content"))
        rest = {k: v for k, v in message.items() if k not in ("tool_calls", "content")}
        return {**rest, "content": "\n".join([text, *blocks] if text else blocks)}
    if role == "tool":
        text = _text(message.get("content"))
        return {"role": "user", "content": f"<tool_response>\n{text}\n</tool_response>"}
    return message


def _text(content: Any) -> str:
    """A message's content as text (the text parts of a list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""
