"""Token usage in both APIs' forms, and its sum over the calls of a tool loop."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.usage import add_usage, chat_usage, usage_from_chat
from tests.unit.test_responses_builder import CHAT_USAGE, USAGE

# --- usage --------------------------------------------------------------------------------

ZERO_DETAILS = {"cached_tokens": 0, "cache_write_tokens": 0}
USAGE_CASES = [
    ("none", None, None),
    ("not-an-object", "12", None),
    ("full", CHAT_USAGE, USAGE),
    (
        "no-details",
        {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        {
            "input_tokens": 5,
            "input_tokens_details": ZERO_DETAILS,
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        },
    ),
    (
        "no-total",
        {"prompt_tokens": 5, "completion_tokens": 7, "prompt_tokens_details": None},
        {
            "input_tokens": 5,
            "input_tokens_details": ZERO_DETAILS,
            "output_tokens": 7,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 12,
        },
    ),
    (
        "junk-values",
        {"prompt_tokens": "5", "completion_tokens": True, "total_tokens": None},
        {
            "input_tokens": 0,
            "input_tokens_details": ZERO_DETAILS,
            "output_tokens": 0,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": 0,
        },
    ),
]


@pytest.mark.parametrize(
    ("chat", "expected"), [c[1:] for c in USAGE_CASES], ids=[c[0] for c in USAGE_CASES]
)
def test_usage_from_chat(chat: Any, expected: dict[str, Any] | None) -> None:
    """Chat usage maps to Responses usage (input/cached/output/reasoning/total tokens)."""
    assert usage_from_chat(chat) == expected


def test_add_usage() -> None:
    """Usage of several upstream calls is summed; a missing side leaves the other."""
    other = usage_from_chat(
        {
            "prompt_tokens": 10,
            "completion_tokens": 2,
            "total_tokens": 12,
            "prompt_tokens_details": {"cached_tokens": 3},
            "completion_tokens_details": {"reasoning_tokens": 1},
        }
    )
    assert add_usage(None, None) is None
    assert add_usage(USAGE, None) == USAGE
    assert add_usage(None, USAGE) == USAGE
    assert add_usage(USAGE, other) == {
        "input_tokens": 130,
        "input_tokens_details": {"cached_tokens": 103, "cache_write_tokens": 0},
        "output_tokens": 32,
        "output_tokens_details": {"reasoning_tokens": 13},
        "total_tokens": 162,
    }


def test_chat_usage_is_the_chat_form_again() -> None:
    """Responses-form usage goes back to the chat form a client of chat completions
    reads, details included; nothing is nothing."""
    assert chat_usage(None) is None
    assert chat_usage(usage_from_chat(CHAT_USAGE)) == CHAT_USAGE
