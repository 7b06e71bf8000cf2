"""Health, readiness, metrics, request logs and client authentication."""

from __future__ import annotations

import asyncio
import io
import json

import pytest

from proxy.app import create_app
from proxy.logs import RequestLog
from tests.fake_upstream import CHAT, Reply

REQUEST = {"model": "test-model", "messages": [{"role": "user", "content": "a secret prompt"}]}


async def test_healthz_and_readyz(proxy):
    """/healthz answers 200; /readyz checks the upstream, the circuit and the storage."""
    assert (await (await proxy.get("/healthz")).json()) == {"status": "ok"}
    resp = await proxy.get("/readyz")
    assert resp.status == 200
    body = await resp.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {"upstream", "circuit", "storage"}
    assert body["checks"]["upstream"]["models"] == 1


async def test_a_password_in_upstream_url_is_never_shown(make_proxy, fake_upstream, caplog):
    """upstream.url's user:password is masked in /readyz, /metrics, error messages and
    log lines, and still used to reach the upstream."""
    proxy = await make_proxy(
        upstream__url=fake_upstream.url.replace("//", "//bob:hunter2@"), upstream__retry_attempts=1
    )
    shown = fake_upstream.url.replace("//", "//***@")
    ready = await (await proxy.get("/readyz")).json()
    assert ready["status"] == "ready" and ready["checks"]["upstream"]["url"] == shown
    fake_upstream.add_reply(CHAT, Reply(drop=True))
    resp = await proxy.post(CHAT, json=REQUEST)
    assert resp.status == 502
    assert (
        f"The upstream at {shown} closed the connection" in (await resp.json())["error"]["message"]
    )
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_circuit_state{upstream="default"}' in metrics  # by name, like the rest
    assert "hunter2" not in metrics + caplog.text


async def test_metrics_are_prometheus_text_from_the_apps_own_registry(make_proxy):
    """/metrics serves the app's registry; two apps in one process do not share counters."""
    first = await make_proxy()
    second = await make_proxy()
    for _ in range(3):
        await first.post(CHAT, json=REQUEST)
    text = await (await first.get("/metrics")).text()
    assert (
        'lmbridge_requests_total{model="test-model",route="/v1/chat/completions",status="200"} 3.0'
    ) in text
    assert "lmbridge_request_duration_seconds_bucket" in text
    assert "lmbridge_upstream_duration_seconds_bucket" in text
    assert "lmbridge_requests_in_flight" in text
    assert 'lmbridge_tokens_total{direction="in",model="test-model"} 15.0' in text
    other = await (await second.get("/metrics")).text()
    assert 'route="/v1/chat/completions"' not in other


@pytest.mark.parametrize(("relay", "label"), [(True, "relayed"), (False, "unmatched")])
async def test_unknown_paths_do_not_create_metric_series(make_proxy, relay, label):
    """Random paths are counted under one label ('relayed' to the upstream, 'unmatched'
    without the relay), not one series each."""
    proxy = await make_proxy(server__relay_unknown_routes=relay)
    for i in range(3):
        await proxy.get(f"/random/{i}")
    text = await (await proxy.get("/metrics")).text()
    assert f'route="{label}"' in text
    assert "/random/" not in text


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_one_log_line_per_request_without_secrets_or_bodies(
    aiohttp_client, make_config, caplog, fmt
):
    """Each request logs id, method, path, model, status and duration, never the
    Authorization header or the body."""
    stream = io.StringIO()
    request_log = RequestLog(fmt, stream)
    proxy = await aiohttp_client(create_app(make_config(), request_log=request_log))
    await proxy.post(
        CHAT,
        json=REQUEST,
        headers={"Authorization": "Bearer sk-very-secret", "X-Request-ID": "rid-1"},
    )
    await proxy.get("/healthz")  # health probes are not logged
    request_log.flush()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    if fmt == "json":
        entry = json.loads(lines[0])
        assert {k: entry[k] for k in ("request_id", "method", "path", "model", "status")} == {
            "request_id": "rid-1",
            "method": "POST",
            "path": CHAT,
            "model": "test-model",
            "status": 200,
        }
        assert entry["duration_ms"] >= 0
    else:
        assert (
            "request_id=rid-1 method=POST path=/v1/chat/completions model=test-model "
            "status=200 duration_ms=" in lines[0]
        )
    everything = stream.getvalue() + caplog.text
    assert "sk-very-secret" not in everything and "a secret prompt" not in everything


@pytest.mark.parametrize("fmt", ["text", "json"])
async def test_a_path_cannot_forge_a_log_line(aiohttp_client, make_config, fmt):
    """A percent-encoded newline, tab or escape in a path is written escaped: the
    request is one line, whatever the path says."""
    stream = io.StringIO()
    request_log = RequestLog(fmt, stream)
    proxy = await aiohttp_client(create_app(make_config(), request_log=request_log))
    forged = "2026-12-03T06:59:59.999%09INFO%09lmbridge.request:%09request%09status=200"
    resp = await proxy.get(f"/v1/responses/x%0A{forged}%1B%5B2J%E2%80%A8")
    assert resp.status == 404
    request_log.flush()
    [line] = stream.getvalue().splitlines()
    assert line.isprintable()
    if fmt == "text":
        assert 'path="/v1/responses/x\\n2026-12-03T06:59:59.999\\tINFO' in line
        assert '\\x1b[2J\\u2028"' in line
    else:
        assert json.loads(line)["path"].startswith("/v1/responses/x\n2026-12-03T06:59:59.999\t")


async def test_request_log_is_flushed_in_batches(aiohttp_client, make_config):
    """Lines are written together (after flush_interval, or at shutdown), not one write
    per request."""
    stream = io.StringIO()
    log = RequestLog("text", stream, flush_interval=3600)
    proxy = await aiohttp_client(create_app(make_config(), request_log=log))
    for _ in range(3):
        await proxy.post(CHAT, json=REQUEST)
    assert stream.getvalue() == ""
    await proxy.close()
    assert len(stream.getvalue().splitlines()) == 3


async def test_request_log_flushes_after_its_interval(aiohttp_client, make_config):
    stream = io.StringIO()
    flushed = asyncio.Event()

    class Watched(RequestLog):
        def flush(self) -> None:
            super().flush()
            if stream.getvalue():
                flushed.set()

    proxy = await aiohttp_client(
        create_app(make_config(), request_log=Watched("text", stream, flush_interval=0.01))
    )
    await proxy.post(CHAT, json=REQUEST)
    await asyncio.wait_for(flushed.wait(), 10)
    assert len(stream.getvalue().splitlines()) == 1


@pytest.fixture
async def authed(make_proxy, monkeypatch):
    monkeypatch.setenv("LMB_TEST_KEY", "key-from-env")
    return await make_proxy(auth__api_keys=["plain-key", "env:LMB_TEST_KEY"])


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic plain-key", "Bearer "])
async def test_v1_routes_need_a_valid_key(authed, header):
    """With api_keys set, /v1 routes answer 401 in the OpenAI shape without a valid key."""
    headers = {"Authorization": header} if header else {}
    for method, path in (("GET", "/v1/models"), ("POST", CHAT)):
        resp = await authed.request(method, path, json=REQUEST, headers=headers)
        assert resp.status == 401
        error = (await resp.json())["error"]
        assert error["code"] == "invalid_api_key"


async def test_valid_keys_pass_and_health_stays_open(authed, fake_upstream):
    """Either configured key (literal or env:) is accepted; /healthz needs none; the client's
    key is not forwarded upstream."""
    for key in ("plain-key", "key-from-env"):
        resp = await authed.post(CHAT, json=REQUEST, headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
    assert (await authed.get("/healthz")).status == 200
    assert "Authorization" not in fake_upstream.requests_to(CHAT)[0].headers


async def test_upstream_api_key_is_sent(make_proxy, fake_upstream):
    """upstream.api_key is sent as a Bearer token, replacing the client's header."""
    proxy = await make_proxy(upstream__api_key="lm-token")
    await proxy.post(CHAT, json=REQUEST, headers={"Authorization": "Bearer client"})
    assert fake_upstream.requests_to(CHAT)[0].headers["Authorization"] == "Bearer lm-token"


async def test_client_authorization_is_forwarded_when_lmbridge_has_no_keys(proxy, fake_upstream):
    """As a transparent proxy, the client's own upstream token passes through."""
    await proxy.post(CHAT, json=REQUEST, headers={"Authorization": "Bearer upstream-token"})
    assert fake_upstream.requests_to(CHAT)[0].headers["Authorization"] == "Bearer upstream-token"
