"""The JSON objects of the Responses and Conversations APIs. Pure: no I/O."""

from __future__ import annotations

from typing import Any

from proxy.responses.request import CreateRequest


def tools_echo(request: CreateRequest) -> list[dict[str, Any]]:
    """The request's tools as the Response object shows them (every function tool with
    its description, parameters and strict)."""
    out: list[dict[str, Any]] = []
    for tool in request.tools:
        if tool.get("type") == "function":
            out.append(
                {
                    "type": "function",
                    "name": tool["name"],
                    "description": tool.get("description"),
                    "parameters": tool.get("parameters"),
                    "strict": tool.get("strict"),
                }
            )
        elif tool.get("type") == "namespace":
            out.append(
                {
                    "type": "namespace",
                    "name": tool["name"],
                    "description": tool.get("description") or "",
                    "tools": [
                        {
                            "type": "function",
                            "name": m["name"],
                            "description": m.get("description"),
                            "parameters": m.get("parameters"),
                            "strict": m.get("strict"),
                        }
                        for m in tool["tools"]
                    ],
                }
            )
        else:
            out.append(dict(tool))
    return out


def response_object(
    request: CreateRequest,
    *,
    response_id: str,
    model: str,
    created_at: int,
) -> dict[str, Any]:
    """A Response in its initial state, every field of the API present."""
    text = dict(request.text) if request.text else {}
    text.setdefault("format", {"type": "text"})
    reasoning = request.reasoning or {}
    conversation = {"id": request.conversation_id} if request.conversation_id is not None else None
    return {
        "id": response_id,
        "object": "response",
        "created_at": created_at,
        "status": "in_progress",
        "background": request.background,
        "completed_at": None,
        "conversation": conversation,
        "error": None,
        "incomplete_details": None,
        "instructions": request.instructions,
        "max_output_tokens": request.max_output_tokens,
        "max_tool_calls": request.max_tool_calls,
        "metadata": request.metadata,
        "model": model,
        "output": [],
        "parallel_tool_calls": request.parallel_tool_calls,
        "previous_response_id": request.previous_response_id,
        "prompt": None,
        "prompt_cache_key": request.prompt_cache_key,
        "reasoning": {"effort": reasoning.get("effort"), "summary": reasoning.get("summary")},
        "safety_identifier": request.safety_identifier,
        "service_tier": request.service_tier or "default",
        "store": request.store,
        "temperature": request.temperature if request.temperature is not None else 1.0,
        "text": text,
        "tool_choice": request.tool_choice,
        "tools": tools_echo(request),
        "top_logprobs": request.top_logprobs if request.top_logprobs is not None else 0,
        "top_p": request.top_p if request.top_p is not None else 1.0,
        "presence_penalty": request.presence_penalty or 0.0,
        "frequency_penalty": request.frequency_penalty or 0.0,
        "truncation": request.truncation,
        "usage": None,
        "user": request.user,
    }


def list_page(items: list[Any], has_more: bool) -> dict[str, Any]:
    """The list envelope of input items and conversation items."""
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": has_more,
    }


def conversation_object(conversation_id: str, created_at: int, metadata: Any) -> dict[str, Any]:
    return {
        "id": conversation_id,
        "object": "conversation",
        "created_at": created_at,
        "metadata": metadata,
    }


def deleted(object_id: str, kind: str) -> dict[str, Any]:
    return {"id": object_id, "object": kind, "deleted": True}
