"""The pure parts of usage accounting, by tables: token counts of every API's usage
form, outcomes, quotas on a fake clock, the report's query and its table."""

from __future__ import annotations

import math

import pytest

from proxy.accounting import Metered, outcome_of, responses_outcome, tokens_of, usage_in_body
from proxy.errors import BadRequest
from proxy.quotas import DAY, Quota, QuotaBook
from proxy.usage_report import parse_query, parse_time, render_table, report

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z


@pytest.mark.parametrize(
    ("usage", "tokens"),
    [
        (None, (0, 0, 0, 0)),
        ("5", (0, 0, 0, 0)),
        ({"prompt_tokens": 5, "completion_tokens": 2}, (5, 0, 2, 0)),
        (
            {
                "prompt_tokens": 9,
                "completion_tokens": 4,
                "prompt_tokens_details": {"cached_tokens": 3},
                "completion_tokens_details": {"reasoning_tokens": 1},
            },
            (9, 3, 4, 1),
        ),
        (
            {
                "input_tokens": 8,
                "output_tokens": 3,
                "input_tokens_details": {"cached_tokens": 2},
                "output_tokens_details": {"reasoning_tokens": 2},
            },
            (8, 2, 3, 2),
        ),
        # Anthropic: the cache is counted apart from input_tokens.
        (
            {
                "input_tokens": 4,
                "output_tokens": 6,
                "cache_read_input_tokens": 10,
                "cache_creation_input_tokens": 5,
            },
            (19, 10, 6, 0),
        ),
        (
            {"prompt_tokens": True, "completion_tokens": -3, "prompt_tokens_details": None},
            (0, 0, 0, 0),
        ),
    ],
)
def test_tokens_of_every_usage_form(usage, tokens):
    """Chat, Responses and Anthropic usage; malformed counts are 0."""
    assert tokens_of(usage) == tokens


@pytest.mark.parametrize(
    ("body", "usage"),
    [
        (
            b'{"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}',
            {"prompt_tokens": 3, "completion_tokens": 1},
        ),
        (
            b'{"text":"\\"usage\\": {\\"prompt_tokens\\": 99}","usage":{"prompt_tokens":1}}',
            {"prompt_tokens": 1},
        ),
        (b'{"choices":[]}', None),
        (b'{"usage": null}', None),
        (b'{"usage": {"prompt', None),
        (b'\xff"usage": {}', {}),
    ],
)
def test_usage_in_body(body, usage):
    """The last top-level usage object; text quoting the key is not it."""
    assert usage_in_body(body) == usage


def test_metered_sums_the_calls_of_a_loop():
    """Usage added twice is summed; the first token is kept."""
    metered = Metered("chat")
    metered.add({"prompt_tokens": 2, "completion_tokens": 1})
    metered.add({"input_tokens": 3, "output_tokens": 4})
    metered.add(None)
    metered.first_token(0.5)
    metered.first_token(0.9)
    assert (metered.tokens, metered.ttft) == ((5, 0, 5, 0), 0.5)


@pytest.mark.parametrize(
    ("status", "code", "outcome"),
    [
        (200, None, ("ok", None)),
        (200, "stream_error", ("error", "stream_error")),
        (499, None, ("cancelled", "client_gone")),
        (502, "upstream_error", ("error", "upstream_error")),
        (404, None, ("error", "http_404")),
    ],
)
def test_outcome_of(status, code, outcome):
    assert outcome_of(status, code) == outcome


@pytest.mark.parametrize(
    ("response", "outcome"),
    [
        ({"status": "completed"}, ("ok", None)),
        ({"status": "incomplete"}, ("ok", None)),
        ({"status": "cancelled"}, ("cancelled", "cancelled")),
        ({"status": "failed", "error": {"code": "server_error"}}, ("error", "server_error")),
        ({"status": "failed", "error": None}, ("error", "failed")),
    ],
)
def test_responses_outcome(response, outcome):
    assert responses_outcome(response) == outcome


def test_tokens_per_day_reset_at_midnight_utc():
    """Refused once the day's count reaches the limit, until the next UTC day; spending
    of a day already over does not count."""
    book = QuotaBook({"a": Quota(tokens_per_day=100)})
    book.seed(NOW - NOW % DAY, {"a": 90, "other": 5})
    assert book.admit("a", NOW) is None
    book.spend("a", NOW, 10)
    refusal = book.admit("a", NOW)
    assert refusal is not None and refusal.kind == "tokens_per_day"
    assert refusal.reset_at == NOW - NOW % DAY + DAY
    assert refusal.retry_after(NOW) == refusal.reset_at - NOW
    book.spend("a", NOW - DAY, 1000)
    assert book.spent_today("a", NOW) == 100
    assert book.admit("a", NOW + DAY) is None
    book.spend("a", NOW + DAY, 7)
    assert book.spent_today("a", NOW + DAY) == 7
    assert book.admit("nobody", NOW) is None


def test_requests_per_minute_slide():
    """At most N requests in any 60 s; the oldest leaving lets the next in."""
    book = QuotaBook({"a": Quota(requests_per_minute=3)})
    for t in (0.0, 20.0, 40.0):
        assert book.admit("a", NOW + t) is None
    refusal = book.admit("a", NOW + 59)
    assert refusal is not None and (refusal.kind, refusal.reset_at) == (
        "requests_per_minute",
        NOW + 60,
    )
    assert refusal.retry_after(NOW + 59.9) == 1.0  # never under a second
    assert book.admit("a", NOW + 60) is None
    assert book.admit("a", NOW + 61) is not None


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1700000000", NOW),
        (" 1700000000.5 ", NOW + 0.5),
        ("2023-11-14", NOW - 22 * 3600 - 13 * 60 - 20),
        ("2023-11-14T22:13:20Z", NOW),
        ("2023-11-14T22:13:20z", NOW),
        ("2023-11-14T23:13:20+01:00", NOW),
        ("2023-11-14T22:13:20", NOW),
    ],
)
def test_times(text, seconds):
    assert parse_time(text, "since") == seconds


@pytest.mark.parametrize("text", ["", "soon", "inf", "-1", "2023-02-30", "14/11/2023"])
def test_bad_times(text):
    with pytest.raises(BadRequest) as refused:
        parse_time(text, "until")
    assert refused.value.param == "until"


def test_query_defaults():
    """Without since: the last day; without until: no end; grouped by model."""
    query = parse_query({}, NOW)
    assert (query.group_by, query.since, query.until) == ("model", NOW - DAY, math.inf)


def test_report_and_its_table():
    """Key groups show the owner prefix; totals sum the groups; the table has a total line."""

    class Group:
        def __init__(self, group: str, requests: int, p50: float | None) -> None:
            self.group, self.requests, self.errors, self.cancelled = group, requests, 1, 0
            self.prompt_tokens, self.cached_tokens = 10 * requests, 0
            self.completion_tokens, self.reasoning_tokens = requests, 0
            self.p50_ms, self.p95_ms, self.ttft_p50_ms = p50, p50, None

    query = parse_query({"group_by": "key", "since": "0", "until": "1700000000"}, NOW)
    answer = report(query, [Group("0123456789abcdef", 2, 12.345), Group("", 1, None)])
    assert [g["group"] for g in answer["data"]] == ["0123456789ab", "-"]
    assert answer["data"][0]["latency_p50_ms"] == 12.3
    assert answer["total"]["total_tokens"] == 33 and answer["total"]["errors"] == 2
    assert (answer["since"], answer["until"]) == ("1970-01-01T00:00:00Z", "2023-11-14T22:13:20Z")
    lines = render_table(answer).splitlines()
    assert lines[0].split() == [
        "KEY",
        "REQUESTS",
        "ERRORS",
        "PROMPT",
        "CACHED",
        "COMPLETION",
        "REASONING",
        "TOTAL",
        "P50_MS",
        "P95_MS",
    ]
    assert lines[2].split() == ["-", "1", "1", "10", "0", "1", "0", "11", "-", "-"]
    assert lines[3].split()[:2] == ["TOTAL", "3"]
    assert lines[4].startswith("(2 group(s), 1970-01-01T00:00:00Z to ")
