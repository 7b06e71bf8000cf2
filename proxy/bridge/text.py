"""The daemon's answers as tool results: pure functions, no I/O."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FINAL_STATUSES = frozenset({"completed", "failed", "incomplete", "cancelled"})


@dataclass(frozen=True, slots=True)
class Step:
    """One MCP tool call of a delegated task, as the trace shows it."""

    server: str
    tool: str
    ok: bool
    ms: float | None  # None when the call was not watched as it ran
    error: str | None = None

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "server": self.server,
            "tool": self.tool,
            "outcome": "ok" if self.ok else "error",
        }
        if self.ms is not None:
            out["ms"] = round(self.ms)
        if self.error:
            out["error"] = self.error
        return out


def models(listing: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for model in listing.get("data") or []:
        if not isinstance(model, dict) or "alias_for" in model:
            continue
        rows.append(
            {
                "id": model.get("id"),
                "type": model.get("type", "unknown"),
                "state": model.get("state", "unknown"),
                "context_length": model.get("max_context_length"),
            }
        )
    aliases = {
        m["id"]: m["alias_for"]
        for m in listing.get("data") or []
        if isinstance(m, dict) and "alias_for" in m
    }
    return {"models": rows, **({"aliases": aliases} if aliases else {})}


def output_text(response: dict[str, Any]) -> str:
    """The text of a Response object's message items (what the SDK calls output_text)."""
    parts = []
    for item in response.get("output") or []:
        if isinstance(item, dict) and item.get("type") == "message":
            for part in item.get("content") or []:
                if isinstance(part, dict) and part.get("type") == "output_text":
                    parts.append(str(part.get("text", "")))
    return "".join(parts)


def steps_of(response: dict[str, Any]) -> list[Step]:
    """The trace of a finished response read from its items (no durations: those are
    only known to whoever watched the calls run)."""
    return [
        Step(
            item.get("server_label", "?"),
            item.get("name", "?"),
            item.get("error") is None,
            None,
            error_summary(item.get("error")),
        )
        for item in response.get("output") or []
        if isinstance(item, dict) and item.get("type") == "mcp_call"
    ]


def error_summary(error: Any) -> str | None:
    if error is None:
        return None
    if isinstance(error, str):
        text = error
    elif isinstance(error, dict):
        text = str(error.get("message") or "")
        for part in error.get("content") or []:
            if isinstance(part, dict) and part.get("text"):
                text = str(part["text"])
                break
    else:
        text = str(error)
    return text[:200] if text else "failed"


def pending_approvals(response: dict[str, Any]) -> list[str]:
    return [
        f"{item.get('server_label')}.{item.get('name')}"
        for item in response.get("output") or []
        if isinstance(item, dict) and item.get("type") == "mcp_approval_request"
    ]


def cut(text: str, max_chars: int, offset: int, rest_hint: str) -> tuple[str, int | None]:
    """``text`` from ``offset``, at most ``max_chars`` of it with a marker when more
    remains; the offset of the rest, if any."""
    piece = text[offset : offset + max_chars]
    rest = offset + len(piece)
    if rest >= len(text):
        return piece, None
    marker = f"\n[... {len(text) - rest} more characters: {rest_hint.format(offset=rest)}]"
    return piece + marker, rest


def response_result(
    response: dict[str, Any],
    steps: list[Step] | None,
    *,
    max_chars: int,
    offset: int = 0,
) -> dict[str, Any]:
    """A stored or finished response as a tool result: status, text (cut), trace."""
    response_id = str(response.get("id"))
    status = str(response.get("status"))
    result: dict[str, Any] = {"response_id": response_id, "status": status}
    if status in FINAL_STATUSES:
        hint = f"call get_response(response_id={response_id!r}, offset={{offset}}) for the rest"
        text, rest = cut(output_text(response), max_chars, offset, hint)
        result["text"] = text
        if rest is not None:
            result["next_offset"] = rest
    else:
        result["note"] = (
            f"still running: call get_response(response_id={response_id!r}) again later"
        )
    if steps is None:
        steps = steps_of(response)
    if steps:
        result["trace"] = [step.as_json() for step in steps]
    error = response.get("error")
    if isinstance(error, dict) and error.get("message"):
        result["error"] = error["message"]
    incomplete = response.get("incomplete_details")
    if isinstance(incomplete, dict) and incomplete.get("reason"):
        result["incomplete_reason"] = incomplete["reason"]
    waiting = pending_approvals(response)
    if waiting:
        result["waiting_for_approval"] = waiting
        result["note"] = (
            "the task stopped at calls that need approval (require_approval on those "
            "servers); delegate cannot approve: continue it through /v1/responses with "
            "mcp_approval_response items, or configure those servers without approval"
        )
    return result


def embeddings(body: dict[str, Any], max_chars: int) -> dict[str, Any]:
    vectors = [d.get("embedding") for d in body.get("data") or [] if isinstance(d, dict)]
    dimensions = len(vectors[0]) if vectors and isinstance(vectors[0], list) else 0
    result: dict[str, Any] = {
        "model": body.get("model"),
        "count": len(vectors),
        "dimensions": dimensions,
    }
    # About 20 characters a number once serialised.
    if len(vectors) * dimensions * 20 <= max_chars:
        result["vectors"] = vectors
    else:
        result["vectors_omitted"] = (
            f"{len(vectors)} x {dimensions} numbers are more than this tool returns "
            f"(bridge.result_max_chars = {max_chars}); the first 8 of each are in 'preview'. "
            "Call /v1/embeddings on the daemon for the full vectors."
        )
        result["preview"] = [v[:8] if isinstance(v, list) else v for v in vectors]
    return result
