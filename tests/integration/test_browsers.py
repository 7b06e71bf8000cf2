"""What a web page the user opens can make the daemon do: cross-site requests and DNS
rebinding are refused before anything runs; origins the operator trusts get CORS."""

from __future__ import annotations

import json

import pytest

from tests.fake_upstream import CHAT, Reply, chat_completion, text_stream
from tests.integration.test_mcp_chat import CALC_SERVER, tool_calls
from tests.integration.test_resilience import metric

ATTACK = {
    "model": "test-model",
    "mcp_servers": ["calc"],
    "messages": [{"role": "user", "content": "Add 2 and 3."}],
}


@pytest.fixture
async def proxy(make_proxy):
    return await make_proxy(mcp__servers={"calc": CALC_SERVER})


def port_of(proxy) -> int:
    return proxy.server.port


async def assert_nothing_ran(proxy, fake_upstream) -> None:
    assert not fake_upstream.requests_to(CHAT)
    assert not fake_upstream.requests_to("/v1/responses")
    assert await metric(proxy, "lmbridge_mcp_tool_calls_total") == 0


async def test_a_simple_cross_site_post_with_a_rebound_host_is_refused(proxy, fake_upstream):
    """The probe's request (text/plain body, a foreign Origin and Host) is a 403 in the
    OpenAI shape; the model never ran and no MCP tool was called."""
    fake_upstream.add_reply(CHAT, Reply(json=tool_calls(("c1", "calc__add", '{"a":2,"b":3}'))))
    resp = await proxy.post(
        CHAT,
        data=json.dumps(ATTACK),
        headers={
            "Content-Type": "text/plain;charset=UTF-8",
            "Origin": "https://attacker.example",
            "Host": f"attacker.example:{port_of(proxy)}",
        },
    )
    assert resp.status == 403
    error = (await resp.json())["error"]
    assert error["code"] == "host_not_allowed"
    assert "server.allowed_hosts" in error["message"]
    assert "Access-Control-Allow-Origin" not in resp.headers
    await assert_nothing_ran(proxy, fake_upstream)


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded", "multipart/form-data"],
)
async def test_a_cross_site_post_to_localhost_is_refused(proxy, fake_upstream, content_type):
    """A page on another origin posting to 127.0.0.1 (a form, a no-preflight fetch) gets
    403 origin_not_allowed, on chat completions and on the Responses API's mcp tool."""
    headers = {"Content-Type": content_type, "Origin": "https://attacker.example"}
    resp = await proxy.post(CHAT, data=json.dumps(ATTACK), headers=headers)
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    responses = {
        "model": "test-model",
        "input": "Add 2 and 3.",
        "tools": [{"type": "mcp", "server_label": "calc", "require_approval": "never"}],
    }
    resp = await proxy.post("/v1/responses", data=json.dumps(responses), headers=headers)
    assert resp.status == 403
    await assert_nothing_ran(proxy, fake_upstream)


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "text/plain;charset=UTF-8",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/jsonp",
        "text/json",
    ],
)
async def test_a_body_that_is_not_json_is_415(proxy, fake_upstream, content_type):
    """Without any Origin, a body whose Content-Type is not JSON is still refused."""
    resp = await proxy.post(CHAT, data=json.dumps(ATTACK), headers={"Content-Type": content_type})
    assert resp.status == 415
    error = (await resp.json())["error"]
    assert error["code"] == "unsupported_media_type"
    assert error["type"] == "invalid_request_error"
    await assert_nothing_ran(proxy, fake_upstream)


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/merge-patch+json",
    ],
)
async def test_json_bodies_and_curl_style_bodies_pass(proxy, fake_upstream, content_type):
    """application/json, a +json type, or no Content-Type at all (an HTTP/1.0-style
    client); curl -d sends a form type, so it needs -H 'Content-Type: application/json'."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    resp = await proxy.post(
        CHAT,
        data=json.dumps(body).encode(),
        headers=headers,
        skip_auto_headers=["Content-Type"],
    )
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("path", ["/v1/models", "/v1/mcp/servers", "/metrics", "/readyz"])
async def test_a_rebound_host_cannot_read_anything(proxy, path):
    """DNS rebinding: a page whose own name resolves to 127.0.0.1 reads nothing."""
    resp = await proxy.get(path, headers={"Host": f"rebind.attacker.example:{port_of(proxy)}"})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "host_not_allowed"


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:{port}",
        "localhost:{port}",
        "LOCALHOST",
        "[::1]:{port}",
        "localhost.:{port}",
        "app.localhost:{port}",
        "192.168.1.20:{port}",
        "10.0.0.5",
        "[fe80::1]:{port}",
    ],
)
async def test_names_that_cannot_be_rebound_are_answered(proxy, host):
    """IP addresses, localhost and *.localhost need no configuration."""
    resp = await proxy.get("/v1/models", headers={"Host": host.format(port=port_of(proxy))})
    assert resp.status == 200


async def test_configured_host_names_are_answered(make_proxy):
    """server.allowed_hosts: exact names, '.domain' for its subdomains, '*' for any."""
    proxy = await make_proxy(server__allowed_hosts=["lmbridge.lan", ".home.example"])
    cases = [
        ("lmbridge.lan:1235", 200),
        ("gpu.home.example", 200),
        ("home.example.attacker.example", 403),
        ("lmbridge.lan.evil", 403),
    ]
    for host, status in cases:
        resp = await proxy.get("/v1/models", headers={"Host": host})
        assert resp.status == status, host
    anything = await make_proxy(server__allowed_hosts=["*"])
    assert (await anything.get("/v1/models", headers={"Host": "x.example"})).status == 200


@pytest.fixture
async def trusting(make_proxy):
    return await make_proxy(server__cors_origins=["http://localhost:5173"])


async def test_a_trusted_origin_gets_its_preflight_answered(trusting):
    """The preflight of an allowed origin is 204 with the CORS headers and needs no key;
    other origins' preflights are 403."""
    resp = await trusting.options(
        CHAT,
        headers={
            "Origin": "http://localhost:5173",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
        },
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    assert resp.headers["Access-Control-Allow-Headers"] == (
        "authorization, content-type, x-stainless-os"
    )
    assert resp.headers["Vary"] == "Origin"
    other = await trusting.options(
        CHAT,
        headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"},
    )
    assert other.status == 403
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_a_trusted_origin_reads_answers_and_streams(trusting, fake_upstream):
    """Answers to an allowed origin carry Access-Control-Allow-Origin and expose lmbridge's
    headers, plain, streamed and as errors; 'null' and look-alike origins are refused."""
    origin = {"Origin": "http://localhost:5173"}
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    resp = await trusting.post(CHAT, json=body, headers=origin)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert "X-Request-ID" in resp.headers["Access-Control-Expose-Headers"]
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("Hi")))
    stream = await trusting.post(CHAT, json={**body, "stream": True}, headers=origin)
    await stream.read()
    assert stream.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    missing = await trusting.get("/v1/models/nope", headers=origin)
    assert missing.status == 404
    assert missing.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    for refused in (
        "null",
        "http://localhost:51730",
        "https://localhost:5173",
        "http://localhost:5173.attacker.example",
    ):
        resp = await trusting.post(CHAT, json=body, headers={"Origin": refused})
        assert resp.status == 403, refused


async def test_the_daemons_own_origin_is_allowed(proxy, fake_upstream):
    """A page the daemon serves itself (same scheme, host and port) may call it."""
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion()))
    own = f"http://127.0.0.1:{port_of(proxy)}"
    body = {"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}
    resp = await proxy.post(CHAT, json=body, headers={"Origin": own})
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == own


async def test_any_origin_needs_api_keys(make_proxy, make_config):
    """cors_origins = ['*'] is refused without auth.api_keys, and with them lets any page
    that holds a key call the API."""
    from proxy.config import ConfigError

    with pytest.raises(ConfigError, match=r"needs auth\.api_keys"):
        make_config(server__cors_origins=["*"])
    proxy = await make_proxy(server__cors_origins=["*"], auth__api_keys=["sk-test"])
    resp = await proxy.get(
        "/v1/models", headers={"Origin": "https://app.example", "Authorization": "Bearer sk-test"}
    )
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "https://app.example"
    no_key = await proxy.get("/v1/models", headers={"Origin": "https://app.example"})
    assert no_key.status == 401
