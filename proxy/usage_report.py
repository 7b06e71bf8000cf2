"""The usage report: the query of ``GET /v1/lmbridge/usage`` read and checked, the
groups storage summed turned into JSON, and that JSON as the table of ``lmbridge
usage``. Pure: fed values, returns values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from proxy.errors import BadRequest

GROUPS = ("key", "model", "upstream", "day")
_COUNTS = ("requests", "errors", "cancelled", "prompt_tokens", "cached_tokens")
# Without ``since``: the last day.
DEFAULT_WINDOW = 86400.0
# A key is shown as this many hex characters of its owner id (the hash of the key).
KEY_PREFIX = 12


@dataclass(frozen=True, slots=True)
class UsageQuery:
    group_by: str
    since: float
    until: float


def parse_query(query: Mapping[str, str], now: float) -> UsageQuery:
    """``since`` and ``until`` (RFC 3339 date or date-time, or unix seconds) and
    ``group_by``; a 400 naming the parameter for anything else."""
    group_by = query.get("group_by", "model")
    if group_by not in GROUPS:
        raise BadRequest(
            f"'group_by' must be one of {', '.join(GROUPS)}, not {_shown(group_by)}.",
            param="group_by",
        )
    until = parse_time(query["until"], "until") if "until" in query else math.inf
    since = parse_time(query["since"], "since") if "since" in query else now - DEFAULT_WINDOW
    if since > until:
        raise BadRequest("'since' must not be later than 'until'.", param="since")
    return UsageQuery(group_by, since, until)


def parse_time(text: str, param: str) -> float:
    """Unix seconds from unix seconds, ``YYYY-MM-DD`` (midnight UTC) or an RFC 3339
    date-time (``Z`` or an offset; without one, UTC)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        if math.isfinite(seconds) and seconds >= 0:
            return seconds
        raise BadRequest(f"'{param}' must be a time, not {_shown(text)}.", param=param)
    try:
        if len(value) == 10:
            moment = datetime.combine(date.fromisoformat(value), datetime.min.time(), UTC)
        else:
            moment = datetime.fromisoformat(value.replace("z", "Z"))
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
    except ValueError:
        raise BadRequest(
            f"'{param}' must be unix seconds, a date (2025-01-31) or an RFC 3339 time "
            f"(2025-01-31T12:00:00Z), not {_shown(text)}.",
            param=param,
        ) from None
    return moment.timestamp()


def shown_key(owner: str) -> str:
    """A key as the report names it: a prefix of its owner id ("-": no keys)."""
    return owner[:KEY_PREFIX] if owner else "-"


def report(query: UsageQuery, groups: Sequence[Any]) -> dict[str, Any]:
    """The JSON answer: one entry per group (storage's ``UsageGroup``s) and the totals."""
    data = []
    for g in groups:
        entry = {
            "group": shown_key(g.group) if query.group_by == "key" else g.group,
            "requests": g.requests,
            "errors": g.errors,
            "cancelled": g.cancelled,
            "prompt_tokens": g.prompt_tokens,
            "cached_tokens": g.cached_tokens,
            "completion_tokens": g.completion_tokens,
            "reasoning_tokens": g.reasoning_tokens,
            "total_tokens": g.prompt_tokens + g.completion_tokens,
            "latency_p50_ms": _ms(g.p50_ms),
            "latency_p95_ms": _ms(g.p95_ms),
            "ttft_p50_ms": _ms(g.ttft_p50_ms),
        }
        data.append(entry)
    summed = [*_COUNTS, "completion_tokens", "reasoning_tokens", "total_tokens"]
    return {
        "object": "lmbridge.usage",
        "group_by": query.group_by,
        "since": _time(query.since),
        "until": None if math.isinf(query.until) else _time(query.until),
        "data": data,
        "total": {name: sum(entry[name] for entry in data) for name in summed},
    }


_COLUMNS = (
    ("requests", "REQUESTS"),
    ("errors", "ERRORS"),
    ("prompt_tokens", "PROMPT"),
    ("cached_tokens", "CACHED"),
    ("completion_tokens", "COMPLETION"),
    ("reasoning_tokens", "REASONING"),
    ("total_tokens", "TOTAL"),
    ("latency_p50_ms", "P50_MS"),
    ("latency_p95_ms", "P95_MS"),
)


def render_table(answer: Mapping[str, Any]) -> str:
    """The JSON answer as a table, one line per group and a total line."""
    head = (str(answer.get("group_by", "group")).upper(), *(title for _, title in _COLUMNS))
    rows = [head]
    for entry in answer.get("data") or []:
        rows.append((str(entry["group"]), *(_cell(entry.get(name)) for name, _ in _COLUMNS)))
    total = answer.get("total") or {}
    if answer.get("data"):
        rows.append(("TOTAL", *(_cell(total.get(name)) for name, _ in _COLUMNS)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]
    until = answer.get("until") or "now"
    groups = len(answer.get("data") or [])
    lines.append(f"({groups} group(s), {answer.get('since')} to {until})")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat().replace("+00:00", "Z")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 60 else value[:60] + "...")
