"""Upstream failures: retries, timeouts, the circuit breaker, an upstream that is down."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest
from aioresponses import aioresponses

from proxy.keys import UPSTREAM
from tests.clock import FakeClock
from tests.fake_upstream import CHAT, Reply, chat_completion
from tests.integration.test_background import until

REQUEST = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}


def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def metric(proxy, name: str) -> float:
    text = await (await proxy.get("/metrics")).text()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_upstream_down_is_502_with_instructions(make_proxy, tmp_path):
    """With nothing listening upstream, requests get 502 naming the URL and how to fix it."""
    url = f"http://127.0.0.1:{closed_port()}"
    proxy = await make_proxy(upstream__url=url, upstream__retry_attempts=2)
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_unavailable"
    assert url in error["message"]
    assert "lms server start" in error["message"]
    assert "--upstream" in error["message"]
    assert await metric(proxy, "lmbridge_upstream_retries_total") >= 1


async def test_a_stopped_upstream_never_opens_the_circuit(make_proxy):
    """An upstream that refuses connections (not running) gets the 502 with instructions
    on every request, never a 503 circuit_open whose Retry-After makes clients wait."""
    proxy = await make_proxy(
        upstream__url=f"http://127.0.0.1:{closed_port()}",
        upstream__retry_attempts=3,
        upstream__retry_backoff=0.001,
        upstream__circuit_failure_threshold=2,
    )
    for _ in range(6):
        resp = await proxy.post(CHAT, json=REQUEST)
        assert resp.status == 502
        assert "Retry-After" not in resp.headers
        assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert await metric(proxy, "lmbridge_circuit_state") == 0
    assert await metric(proxy, 'lmbridge_upstream_failures_total{reason="refused"}') == 18
    assert (await proxy.get("/readyz")).status == 503  # readiness still says it is down


async def test_retries_of_one_request_count_once_towards_the_circuit(make_proxy, fake_upstream):
    """A request whose three attempts all fail is one failure for the breaker: with a
    threshold of 2 the circuit opens after the second such request, not inside the first."""
    proxy = await make_proxy(
        upstream__retry_attempts=3,
        upstream__retry_backoff=0.001,
        upstream__circuit_failure_threshold=2,
        upstream__circuit_cooldown=5,
    )
    await proxy.get("/v1/models")
    fake_upstream.add_reply(CHAT, Reply(status=502, json={"error": {"message": "bad"}}), times=6)
    for _ in range(2):
        assert (await proxy.post(CHAT, json=REQUEST)).status == 502
    assert len(fake_upstream.requests_to(CHAT)) == 6
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 503
    # Never longer than the cool-down: the upstream is tried again by then.
    assert 1 <= int(resp.headers["Retry-After"]) <= 5


async def test_503_is_retried_then_succeeds(proxy, fake_upstream):
    """A 503 before anything was sent to the client is retried transparently."""
    fake_upstream.add_reply(CHAT, Reply(status=503, json={"error": {"message": "busy"}}))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 200
    assert len(fake_upstream.requests_to(CHAT)) == 2
    assert await metric(proxy, 'lmbridge_upstream_retries_total{reason="status_503"}') == 1


async def test_dropped_connection_is_retried(proxy, fake_upstream):
    """An upstream that closes the connection without answering is retried."""
    fake_upstream.add_reply(CHAT, Reply(drop=True))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 200
    assert len(fake_upstream.requests_to(CHAT)) == 2


async def test_retries_give_up_with_the_last_status(make_proxy, fake_upstream):
    """After retry_attempts, the upstream's 503 comes back with its message."""
    proxy = await make_proxy(upstream__retry_attempts=3)
    fake_upstream.add_reply(
        CHAT, Reply(status=503, json={"error": {"message": "overloaded"}}), times=3
    )
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 503
    assert (await resp.json())["error"]["message"] == "overloaded"
    assert len(fake_upstream.requests_to(CHAT)) == 3


async def test_4xx_and_500_are_not_retried(proxy, fake_upstream):
    """Only connection errors and 502/503/504 are retried."""
    fake_upstream.add_reply(CHAT, Reply(status=500, json={"error": {"message": "boom"}}))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 500
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_stream_is_never_retried_once_started(proxy, fake_upstream):
    """A stream cut after its start is not replayed (the client already has part of it)."""
    from tests.fake_upstream import chunk

    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("a")], cut=True))
    resp = await proxy.post(CHAT, json={**REQUEST, "stream": True})
    await resp.read()
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_first_byte_timeout_is_504(make_proxy, fake_upstream):
    """An upstream that does not answer within first_byte_timeout gives 504, not retried."""
    proxy = await make_proxy(upstream__first_byte_timeout=0.2)
    fake_upstream.add_reply(CHAT, Reply(delay=2.0))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 504
    error = (await resp.json())["error"]
    assert error["code"] == "upstream_timeout"
    assert "first_byte_timeout" in error["message"]
    assert len(fake_upstream.requests_to(CHAT)) == 1


async def test_connect_timeout_is_a_clear_502(make_proxy, fake_upstream):
    """A connect timeout (injected: it cannot be produced on loopback) is 502 and retried."""
    proxy = await make_proxy(upstream__retry_attempts=2)
    await proxy.get("/v1/models")  # fill the model cache before faults are injected
    own = str(proxy.make_url(""))
    with aioresponses(passthrough=[own]) as mocked:
        for _ in range(2):
            mocked.post(
                fake_upstream.url + CHAT, exception=aiohttp.ConnectionTimeoutError("timed out")
            )
        resp = await proxy.post(CHAT, json=REQUEST)
        assert resp.status == 502
        assert "connection timed out" in (await resp.json())["error"]["message"]


async def test_circuit_opens_fails_fast_and_closes_after_a_probe(make_proxy, fake_upstream):
    """After N consecutive failures requests fail fast with 503; after the cool-down one
    probe goes through and its success closes the circuit."""
    proxy = await make_proxy(
        upstream__retry_attempts=1,
        upstream__circuit_failure_threshold=2,
        upstream__circuit_cooldown=0.3,
    )
    await proxy.get("/v1/models")
    clock = FakeClock()
    proxy.server.app[UPSTREAM].breaker.clock = clock
    fake_upstream.add_reply(CHAT, Reply(status=502, json={"error": {"message": "bad"}}), times=2)
    for _ in range(2):
        assert (await proxy.post(CHAT, json=REQUEST)).status == 502
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 503
    error = (await resp.json())["error"]
    assert error["code"] == "circuit_open"
    assert "Retry-After" in resp.headers
    assert len(fake_upstream.requests_to(CHAT)) == 2  # failed fast: no third upstream call

    ready = await proxy.get("/readyz")
    assert ready.status == 503
    body = await ready.json()
    assert body["checks"]["circuit"]["state"] == "open"
    assert "circuit" in body["failing"]
    assert await metric(proxy, "lmbridge_circuit_state") == 2

    clock.advance(0.35)  # past the cool-down
    assert (await proxy.post(CHAT, json=REQUEST)).status == 200
    assert await metric(proxy, "lmbridge_circuit_state") == 0
    assert (await proxy.get("/readyz")).status == 200


async def test_only_one_probe_in_half_open(make_proxy, fake_upstream):
    """While the half-open probe is in flight, other requests still fail fast."""
    proxy = await make_proxy(
        upstream__retry_attempts=1,
        upstream__circuit_failure_threshold=1,
        upstream__circuit_cooldown=0.1,
    )
    await proxy.get("/v1/models")
    clock = FakeClock()
    proxy.server.app[UPSTREAM].breaker.clock = clock
    fake_upstream.add_reply(CHAT, Reply(status=502, json={"error": {"message": "bad"}}))
    assert (await proxy.post(CHAT, json=REQUEST)).status == 502
    clock.advance(0.15)  # past the cool-down
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion(), hold=release))
    probe = asyncio.ensure_future(proxy.post(CHAT, json=REQUEST))
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 2, "the probe went upstream")
    other = await proxy.post(CHAT, json=REQUEST)
    assert other.status == 503
    release.set()
    assert (await probe).status == 200


async def test_readyz_reports_an_unreachable_upstream(make_proxy):
    """/readyz is 503 with a JSON body saying the upstream is the failing part."""
    proxy = await make_proxy(
        upstream__url=f"http://127.0.0.1:{closed_port()}", upstream__retry_attempts=1
    )
    resp = await proxy.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["failing"] == ["upstream"]
    assert body["checks"]["storage"]["ok"] is True
    assert (await proxy.get("/healthz")).status == 200


@pytest.mark.parametrize("attempts", [1, 3])
async def test_model_list_failure_is_502_not_500(make_proxy, attempts):
    """Model validation against a dead upstream fails as 502, never 500."""
    proxy = await make_proxy(
        upstream__url=f"http://127.0.0.1:{closed_port()}", upstream__retry_attempts=attempts
    )
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 502
