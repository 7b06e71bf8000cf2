"""Token usage: the chat completions form, the Responses form, and sums over the
upstream calls of a tool loop. Pure; imported by every API that reports usage."""

from __future__ import annotations

from typing import Any


def usage_from_chat(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """A chat completion's ``usage`` in the Responses form (missing counts are 0)."""
    if not isinstance(usage, dict):
        return None
    prompt = _int(usage.get("prompt_tokens"))
    completion = _int(usage.get("completion_tokens"))
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": _int(prompt_details.get("cached_tokens")),
            "cache_write_tokens": 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": _int(completion_details.get("reasoning_tokens")),
        },
        "total_tokens": _int(usage.get("total_tokens")) or prompt + completion,
    }


def add_usage(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Responses-form usage summed over several upstream calls (tool loops)."""
    if a is None or b is None:
        return a or b
    return {
        "input_tokens": a["input_tokens"] + b["input_tokens"],
        "input_tokens_details": {
            "cached_tokens": a["input_tokens_details"]["cached_tokens"]
            + b["input_tokens_details"]["cached_tokens"],
            "cache_write_tokens": 0,
        },
        "output_tokens": a["output_tokens"] + b["output_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": a["output_tokens_details"]["reasoning_tokens"]
            + b["output_tokens_details"]["reasoning_tokens"]
        },
        "total_tokens": a["total_tokens"] + b["total_tokens"],
    }


def chat_usage(usage: dict[str, Any] | None) -> dict[str, Any] | None:
    """Responses-form usage back in the chat completions form."""
    if usage is None:
        return None
    return {
        "prompt_tokens": usage["input_tokens"],
        "completion_tokens": usage["output_tokens"],
        "total_tokens": usage["total_tokens"],
        "prompt_tokens_details": {"cached_tokens": usage["input_tokens_details"]["cached_tokens"]},
        "completion_tokens_details": {
            "reasoning_tokens": usage["output_tokens_details"]["reasoning_tokens"]
        },
    }


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
