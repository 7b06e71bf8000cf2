"""``POST /v1/responses/compact``: the conversation so far summarised by the model into
one compaction item, which a later turn sends instead of the turns it replaces. Pure:
the request to send and the object to answer."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.jsontext import dumps, loads
from proxy.responses import render
from proxy.responses.builder import ResponseBuilder
from proxy.responses.render import ToolNames
from proxy.responses.runs import Prepared
from proxy.responses.upstream_turn import fit_history
from proxy.usage import usage_from_chat

# The summary's length when the client sets none: a small model may never stop, and the
# client sees nothing until the summary ends (Codex and the Open Responses suite set none).
SUMMARY_MAX_TOKENS = 2048

INSTRUCTION = (
    "Summarise the conversation below so that it can be continued from the summary "
    "alone: keep the user's goals, decisions, facts, names, open questions and the state "
    "of any task. Write the summary only."
)


def request_body(prepared: Prepared) -> bytes:
    """The chat request that asks for the summary: the turns as one transcript, without
    the tools and formats of the conversation."""
    transcript = render.join_message_arrays([*fit_history(prepared), dumps(prepared.new_messages)])
    messages = [
        {"role": "system", "content": INSTRUCTION},
        {"role": "user", "content": _transcript(transcript)},
    ]
    settings = {
        k: v
        for k, v in prepared.settings.items()
        if k not in ("tools", "tool_choice", "response_format")
    }
    settings.setdefault("max_tokens", SUMMARY_MAX_TOKENS)
    return render.chat_body_bytes(settings, dumps(messages), stream=False)


def compaction_object(
    completion: dict[str, Any], *, ids: Callable[[str], str], clock: Callable[[], float]
) -> dict[str, Any]:
    """The API's ``response.compaction`` object around the model's summary."""
    builder = ResponseBuilder({}, ToolNames(), ids=ids, clock=clock)
    builder.feed_completion(completion)
    summary = "".join(
        part.get("text", "")
        for item in builder.output
        if item["type"] == "message"
        for part in item["content"]
    )
    return {
        "id": ids("cmp"),
        "object": "response.compaction",
        "created_at": int(clock()),
        "output": [
            {
                "id": ids("cmp"),
                "type": "compaction",
                "encrypted_content": render.encode_compaction(summary.strip()),
            }
        ],
        "usage": builder.usage or usage_from_chat({}),
    }


def _transcript(messages_json: str) -> str:
    lines = []
    for message in loads(messages_json):
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if message.get("tool_calls"):
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})"
                for c in message["tool_calls"]
            )
            content = f"{content or ''} [called {calls}]".strip()
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines)
