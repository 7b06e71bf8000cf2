"""Usage over HTTP: ``GET /v1/lmbridge/usage``, and the quota check the middleware runs
on every request that calls a model, before its handler.

Who reads what: without client keys, the report covers everyone (there is no one to
tell apart); with keys, a key reads its own usage, and the keys of ``usage.admin_keys``
read every key's. The route is a GET with no side effect, behind the same Host, Origin
and key checks as every /v1 route (docs/operations.md, "Security model").
"""

from __future__ import annotations

from datetime import UTC, datetime

from aiohttp import web

from proxy.errors import QuotaExceeded
from proxy.keys import API_KEYS, METRICS, OWNER, QUOTAS, RELAYED, STORE, USAGE, USAGE_ADMINS
from proxy.usage_report import parse_query, report

# The routes that call a model; GET /v1/responses is the WebSocket mode's upgrade.
MODEL_CALLS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
        "/v1/responses/compact",
        "/v1/responses/input_tokens",
    }
)


async def get_usage(request: web.Request) -> web.Response:
    app = request.app
    query = parse_query(request.query, app[USAGE].clock())
    owner = request[OWNER]
    scope = None if not app[API_KEYS] or owner in app[USAGE_ADMINS] else owner
    groups = await app[STORE].usage_report(query.group_by, query.since, query.until, scope)
    return web.json_response(report(query, groups))


def check_quota(request: web.Request) -> None:
    """Refuse a request that calls a model when its key is over a quota (429
    ``quota_exceeded``, with Retry-After and the reset time in the message)."""
    quotas = request.app[QUOTAS]
    if not quotas.quotas:
        return
    if RELAYED not in request and (
        request.path not in MODEL_CALLS or request.method not in ("POST", "GET")
    ):
        return
    now = request.app[USAGE].clock()
    refusal = quotas.admit(request[OWNER], now)
    if refusal is None:
        return
    request.app[METRICS].quota_refusals.labels(refusal.kind).inc()
    reset = datetime.fromtimestamp(refusal.reset_at, UTC).isoformat(timespec="seconds")
    reset = reset.replace("+00:00", "Z")
    if refusal.kind == "tokens_per_day":
        what = f"its quota of {refusal.limit} tokens for today (UTC)"
    else:
        what = f"its quota of {refusal.limit} requests per minute"
    raise QuotaExceeded(
        f"This API key has used {what}; it resets at {reset}.",
        retry_after=refusal.retry_after(now),
        retry=refusal.kind == "requests_per_minute",
    )
