"""The pure parts of `lmbridge mcp`: daemon answers turned into tool results."""

from __future__ import annotations

from proxy.bridge import text
from proxy.bridge.text import Step


def message(content: str) -> dict:
    return {
        "type": "message",
        "role": "assistant",
        "content": [{"type": "output_text", "text": content, "annotations": []}],
    }


def test_models_table_skips_alias_entries_and_lists_them_apart():
    listing = {
        "data": [
            {"id": "qwen3", "type": "llm", "state": "loaded", "max_context_length": 32768},
            {"id": "embed", "type": "embeddings"},
            {"id": "fast", "alias_for": "qwen3"},
        ]
    }
    result = text.models(listing)
    assert result["models"] == [
        {"id": "qwen3", "type": "llm", "state": "loaded", "context_length": 32768},
        {"id": "embed", "type": "embeddings", "state": "unknown", "context_length": None},
    ]
    assert result["aliases"] == {"fast": "qwen3"}


def test_cut_pages_through_a_text_without_losing_a_character():
    whole = "abcdefghij" * 10
    pieces, offset = [], 0
    while offset is not None:
        piece, offset_next = text.cut(whole, 30, offset, "offset={offset}")
        pieces.append(piece.split("\n[...")[0])
        if offset_next is not None:
            assert f"offset={offset_next}" in piece and "more characters" in piece
        offset = offset_next
    assert "".join(pieces) == whole and len(pieces) == 4


def test_finished_response_with_trace_error_and_incomplete_reason():
    response = {
        "id": "resp_1",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "output": [
            {"type": "mcp_call", "server_label": "files", "name": "read", "error": None},
            {
                "type": "mcp_call",
                "server_label": "files",
                "name": "write",
                "error": {
                    "type": "mcp_tool_execution_error",
                    "content": [{"type": "text", "text": "read-only file system"}],
                },
            },
            message("Partial answer"),
        ],
    }
    result = text.response_result(response, None, max_chars=1000)
    assert result["text"] == "Partial answer"
    assert result["incomplete_reason"] == "max_output_tokens"
    assert result["trace"] == [
        {"server": "files", "tool": "read", "outcome": "ok"},
        {"server": "files", "tool": "write", "outcome": "error", "error": "read-only file system"},
    ]


def test_watched_steps_carry_durations():
    steps = [Step("calc", "add", True, 12.4)]
    result = text.response_result(
        {"id": "r", "status": "completed", "output": []}, steps, max_chars=100
    )
    assert result["trace"] == [{"server": "calc", "tool": "add", "outcome": "ok", "ms": 12}]


def test_running_response_says_to_come_back():
    result = text.response_result({"id": "resp_2", "status": "in_progress"}, [], max_chars=10)
    assert "text" not in result and "get_response(response_id='resp_2')" in result["note"]


def test_approval_requests_are_named():
    response = {
        "id": "r",
        "status": "completed",
        "output": [{"type": "mcp_approval_request", "server_label": "git", "name": "commit"}],
    }
    result = text.response_result(response, [], max_chars=100)
    assert result["waiting_for_approval"] == ["git.commit"]
    assert "cannot approve" in result["note"]


def test_failed_response_reports_its_error():
    response = {
        "id": "r",
        "status": "failed",
        "output": [],
        "error": {"code": "server_error", "message": "upstream went away"},
    }
    assert text.response_result(response, [], max_chars=100)["error"] == "upstream went away"


def test_embeddings_small_in_full_large_as_preview():
    small = {"model": "e", "data": [{"embedding": [0.1, 0.2]}]}
    assert text.embeddings(small, 1000)["vectors"] == [[0.1, 0.2]]
    large = {"model": "e", "data": [{"embedding": [0.0] * 100}] * 3}
    result = text.embeddings(large, 1000)
    assert result["count"] == 3 and result["dimensions"] == 100
    assert "vectors" not in result and len(result["preview"][0]) == 8


def test_error_summaries():
    assert text.error_summary(None) is None
    assert text.error_summary("plain") == "plain"
    assert text.error_summary({"type": "mcp_protocol_error", "message": "timed out"}) == (
        "timed out"
    )
    assert len(text.error_summary("x" * 1000) or "") == 200
