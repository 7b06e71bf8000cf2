"""Usage accounting through the real app, the fake upstream and the openai SDK: what is
recorded equals what the upstream reported, the report's groups, its bad queries, who
reads what, and the quotas (429 quota_exceeded, Retry-After, a restart keeps the day)."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp.test_utils import TestClient
from openai import AsyncOpenAI, RateLimitError

from proxy.keys import QUOTAS, USAGE
from proxy.owners import owner_of
from tests.clock import FakeClock
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk, text_stream
from tests.integration.test_mcp_chat import CALC_SERVER, tool_calls

U = "/v1/lmbridge/usage"
ALICE, BOB, ADMIN = "sk-alice", "sk-bob", "sk-admin"
KEYS = {"auth__api_keys": [ALICE, BOB, ADMIN], "usage__admin_keys": [ADMIN]}


def usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }


def sdk(proxy: TestClient, key: str = "unused") -> AsyncOpenAI:
    return AsyncOpenAI(base_url=str(proxy.make_url("/v1")), api_key=key, max_retries=0)


async def flushed(proxy: TestClient) -> None:
    """Every record made so far is in the database (the recorder's flush hook)."""
    await proxy.app[USAGE].flush()


async def report(proxy: TestClient, key: str | None = None, **query: Any) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    query.setdefault("since", "0")
    resp = await proxy.get(U, params=query, headers=headers)
    assert resp.status == 200, await resp.text()
    return dict(await resp.json())


async def test_recorded_totals_equal_the_upstream_usage(make_proxy, fake_upstream):
    """Streamed and plain chat, completions, embeddings, and a Responses turn of two
    upstream calls (an MCP tool round): the recorded sums are the upstream's."""
    proxy = await make_proxy(mcp__servers={"calc": CALC_SERVER})
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(usage=usage(11, 3, 4, 2))))
    stream = [*text_stream("a", "b"), chunk(choices=False, usage=usage(7, 2, 1))]
    fake_upstream.add_reply(CHAT, Reply(stream=stream))
    first = tool_calls(("c1", "calc__add", '{"a": 2, "b": 3}'))
    first["usage"] = usage(20, 5, 0, 1)
    fake_upstream.add_reply(CHAT, Reply(json=first))
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("5", usage=usage(30, 4, 16))))
    async with sdk(proxy) as client:
        await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "hi"}]
        )
        chunks = await client.chat.completions.create(
            model="test-model",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        async for _ in chunks:
            pass
        await client.completions.create(model="test-model", prompt="hi")  # 1 + 1
        await client.embeddings.create(model="test-model", input="hi")  # 2 + 0
        response = await client.responses.create(
            model="test-model",
            input="2+3?",
            tools=[{"type": "mcp", "server_label": "calc", "require_approval": "never"}],  # type: ignore[list-item]
        )
    assert response.usage is not None and response.usage.input_tokens == 50
    await flushed(proxy)
    answer = await report(proxy, group_by="model")
    [group] = answer["data"]
    assert group["requests"] == 5 and group["errors"] == 0
    assert group["prompt_tokens"] == 11 + 7 + 1 + 2 + 50
    assert group["completion_tokens"] == 3 + 2 + 1 + 0 + 9
    assert group["cached_tokens"] == 4 + 1 + 16
    assert group["reasoning_tokens"] == 2 + 1
    assert group["latency_p50_ms"] > 0 and group["ttft_p50_ms"] is not None
    assert answer["total"]["total_tokens"] == group["prompt_tokens"] + group["completion_tokens"]


async def test_errors_and_background_responses_are_recorded(proxy, fake_upstream):
    """An upstream error is an error of its code; a background response is recorded when
    it ends, after its request did."""
    fake_upstream.add_reply(CHAT, Reply(status=400, json={"error": {"message": "no"}}))
    resp = await proxy.post(CHAT, json={"model": "test-model", "messages": []})
    assert resp.status == 400
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(usage=usage(9, 1))))
    resp = await proxy.post(
        "/v1/responses", json={"model": "test-model", "input": "hi", "background": True}
    )
    created = await resp.json()
    for _ in range(200):
        got = await (await proxy.get(f"/v1/responses/{created['id']}")).json()
        if got["status"] == "completed":
            break
    await flushed(proxy)
    answer = await report(proxy, group_by="upstream")
    [group] = answer["data"]
    assert (group["group"], group["requests"], group["errors"]) == ("default", 2, 1)
    assert (group["prompt_tokens"], group["completion_tokens"]) == (9, 1)


async def test_grouping_by_key_and_scopes(make_proxy, fake_upstream):
    """A key reads its own usage; an admin key reads everyone's, grouped by key prefix."""
    proxy = await make_proxy(**KEYS)
    for key in (ALICE, BOB, BOB):
        resp = await proxy.post(
            CHAT,
            json={"model": "test-model", "messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert resp.status == 200
    await flushed(proxy)
    everyone = await report(proxy, ADMIN, group_by="key")
    shown = {g["group"]: g["requests"] for g in everyone["data"]}
    assert shown == {owner_of(ALICE.encode())[:12]: 1, owner_of(BOB.encode())[:12]: 2}
    bob = await report(proxy, BOB, group_by="key")
    assert [(g["group"], g["requests"]) for g in bob["data"]] == [(owner_of(b"sk-bob")[:12], 2)]
    assert (await report(proxy, ADMIN, group_by="day"))["total"]["requests"] == 3
    resp = await proxy.get(U)
    assert resp.status == 401


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"group_by": "owner"}, "group_by"),
        ({"since": "yesterday"}, "since"),
        ({"until": "2025-13-01"}, "until"),
        ({"since": "-5"}, "since"),
        ({"since": "nan"}, "since"),
        ({"since": "2025-02-01", "until": "2025-01-01"}, "since"),
    ],
)
async def test_bad_queries_are_400_naming_the_parameter(proxy, query, param):
    """A bad group_by, time or window is a 400 invalid_request_error with its param."""
    resp = await proxy.get(U, params=query)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


async def test_times_in_every_accepted_form(proxy):
    """Unix seconds, a date and RFC 3339 times with Z or an offset are accepted."""
    for since in (
        "1700000000",
        "1700000000.5",
        "2025-01-31",
        "2025-01-31T12:00:00Z",
        "2025-01-31T12:00:00+02:00",
    ):
        answer = await report(proxy, since=since, until="2030-01-01")
        assert answer["data"] == [] and answer["until"] == "2030-01-01T00:00:00Z"


async def test_the_report_refuses_other_origins_and_hosts(make_proxy):
    """A web page of another origin, or a rebound DNS name, cannot read the report."""
    proxy = await make_proxy(**KEYS)
    auth = {"Authorization": f"Bearer {ADMIN}"}
    resp = await proxy.get(U, headers={**auth, "Origin": "https://evil.example"})
    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await proxy.get(U, headers={**auth, "Host": "evil.example"})
    assert resp.status == 403
    resp = await proxy.post(U, headers=auth, data="since=0")
    assert resp.status in (405, 415)


async def test_requests_per_minute(make_proxy, fake_upstream):
    """The quota's requests pass, the next is 429 quota_exceeded with Retry-After until the
    oldest leaves the sliding minute; other keys are not limited."""
    proxy = await make_proxy(**KEYS, usage__quotas=[{"key": ALICE, "requests_per_minute": 2}])
    clock = FakeClock(1_700_000_000)
    proxy.app[USAGE].clock = clock
    body = {"model": "test-model", "messages": [{"role": "user", "content": "x"}]}
    alice = {"Authorization": f"Bearer {ALICE}"}
    for _ in range(2):
        assert (await proxy.post(CHAT, json=body, headers=alice)).status == 200
        clock.advance(10)
    resp = await proxy.post(CHAT, json=body, headers=alice)
    assert resp.status == 429
    assert resp.headers["Retry-After"] == "40"
    error = (await resp.json())["error"]
    assert (error["code"], error["type"]) == ("quota_exceeded", "rate_limit_error")
    assert "2023-11-14T22:14:20Z" in error["message"]
    assert (
        await proxy.post(CHAT, json=body, headers={"Authorization": f"Bearer {BOB}"})
    ).status == 200
    assert len(fake_upstream.requests_to(CHAT)) == 3
    clock.advance(40)
    assert (await proxy.post(CHAT, json=body, headers=alice)).status == 200
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_quota_refused_total{kind="requests_per_minute"} 1.0' in metrics


async def test_tokens_per_day_survive_a_restart(make_config, make_proxy, fake_upstream):
    """Over the day's tokens the SDK gets RateLimitError quota_exceeded with the reset at
    midnight UTC; a daemon started again on the same file still refuses; the next day
    passes."""
    config = make_config(**KEYS, usage__quotas=[{"key": ALICE, "tokens_per_day": 10}])
    proxy = await make_proxy(config)
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(usage=usage(8, 4))))
    async with sdk(proxy, ALICE) as client:
        await client.chat.completions.create(
            model="test-model", messages=[{"role": "user", "content": "x"}]
        )
        with pytest.raises(RateLimitError) as refused:
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "x"}]
            )
    assert refused.value.code == "quota_exceeded"
    assert refused.value.response.headers["x-should-retry"] == "false"
    assert "T00:00:00Z" in refused.value.message
    await flushed(proxy)
    await proxy.close()

    again = await make_proxy(config)
    alice = {"Authorization": f"Bearer {ALICE}"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "x"}]}
    assert again.app[QUOTAS].spent_today(owner_of(ALICE.encode()), again.app[USAGE].clock()) == 12
    assert (await again.post(CHAT, json=body, headers=alice)).status == 429
    clock = FakeClock(again.app[USAGE].clock() + 86400)
    again.app[USAGE].clock = clock
    assert (await again.post(CHAT, json=body, headers=alice)).status == 200


async def test_a_streamed_text_completion_is_counted_without_usage_asked(proxy, fake_upstream):
    """A streamed /v1/completions whose client asked no usage: lmbridge asks for it
    upstream, counts it, and keeps the usage-only event from the client."""

    def piece(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "model": "test-model",
            "choices": [choice],
        }

    events = [piece("Once"), piece(" upon", "stop")]
    events.append({**piece(""), "choices": [], "usage": usage(6, 2)})
    fake_upstream.add_reply("/v1/completions", Reply(stream=events))
    resp = await proxy.post(
        "/v1/completions", json={"model": "test-model", "prompt": "hi", "stream": True}
    )
    raw = await resp.read()
    assert resp.status == 200
    assert b'"usage"' not in raw and raw.rstrip().endswith(b"data: [DONE]")
    assert b"Once" in raw and b" upon" in raw
    sent = fake_upstream.requests_to("/v1/completions")[0].body
    assert sent["stream_options"] == {"include_usage": True}
    await flushed(proxy)
    total = (await report(proxy))["total"]
    assert (total["prompt_tokens"], total["completion_tokens"]) == (6, 2)
