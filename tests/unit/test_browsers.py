"""The browser policy as pure functions: host names, origins, JSON content types."""

from __future__ import annotations

import pytest

from proxy.browsers import BrowserPolicy, host_name, is_json_type, normalize_origin


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:1235", "127.0.0.1"),
        ("LocalHost:1", "localhost"),
        ("localhost.", "localhost"),
        ("[::1]:1235", "::1"),
        ("[::1]", "::1"),
        ("example.com.:80", "example.com"),
        ("", ""),
    ],
)
def test_host_name_drops_the_port_and_the_trailing_dot(header, name):
    """A Host header value's name, as it is compared."""
    assert host_name(header) == name


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.0.0.1:9", True),
        ("2130706433", False),  # a number is a name to the Host check, and not a local one
        ("0x7f000001", False),
        ("[::ffff:127.0.0.1]:1", True),
        ("localhost", True),
        ("a.b.localhost:1", True),
        ("localhost.attacker.example", False),
        ("attacker.example", False),
        ("lmbridge.lan", True),
        ("LMBRIDGE.LAN.", True),
        ("x.corp.example", True),
        ("corp.example", False),
        ("xcorp.example", False),
        ("[not-an-ip]", False),
        (":1235", False),
        (None, True),  # HTTP/1.0: no browser sends a request without Host
    ],
)
def test_host_policy(host, allowed):
    """IP literals and localhost names need no configuration; others must be listed."""
    policy = BrowserPolicy(["lmbridge.lan", ".corp.example"], [])
    assert policy.host_allowed(host) is allowed
    assert policy.host_allowed(host) is allowed  # remembered verdicts agree


def test_host_verdicts_are_remembered_in_bounded_memory():
    """The client chooses Host: however many distinct values arrive, few are kept."""
    policy = BrowserPolicy([], [])
    for n in range(5000):
        policy.host_allowed(f"h{n}.attacker.example")
    assert len(policy._host_verdicts) <= 256


@pytest.mark.parametrize(
    ("value", "normalized"),
    [
        ("http://localhost:5173", "http://localhost:5173"),
        ("HTTP://LocalHost:5173/", "http://localhost:5173"),
        ("https://app.example:443", "https://app.example"),
        ("http://app.example:80", "http://app.example"),
        ("http://[::1]:8080", "http://[::1]:8080"),
    ],
)
def test_origins_are_normalized(value, normalized):
    """Case, a trailing slash and default ports do not matter."""
    assert normalize_origin(value) == normalized


@pytest.mark.parametrize(
    "value",
    [
        "null",
        "localhost:5173",
        "ftp://x",
        "http://",
        "http://a/b",
        "http://u@a",
        "http://a?x=1",
        "http://a:99999",
        "file:///etc",
    ],
)
def test_what_is_not_an_origin(value):
    """Paths, userinfo, other schemes and bad ports are not origins."""
    with pytest.raises(ValueError):
        normalize_origin(value)


@pytest.mark.parametrize(
    ("content_type", "json"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("Application/JSON", True),
        ("application/vnd.api+json", True),
        ("text/plain", False),
        ("text/plain;charset=UTF-8", False),
        ("application/x-www-form-urlencoded", False),
        ("multipart/form-data; boundary=x", False),
        ("application/jsonlines", False),
        ("text/json", False),
        ("", False),
    ],
)
def test_json_content_types(content_type, json):
    """application/json and +json types, with any parameters."""
    assert is_json_type(content_type) is json


def test_the_mcp_http_transport_uses_the_same_lists():
    """`lmbridge mcp --transport http` answers loopback names and the exact names of
    server.allowed_hosts, and only the configured origins; wildcards are not honoured
    there (the bridge holds the daemon's key)."""
    from proxy.bridge.run import transport_security
    from proxy.config import load_config

    config = load_config(
        "/dev/null",
        flags={
            "server.allowed_hosts": ["gpu.lan", ".corp.example", "*"],
            "server.cors_origins": ["http://localhost:5173", "*"],
            "auth.api_keys": ["k"],
        },
        environ={},
    )
    settings = transport_security(config)
    assert settings.enable_dns_rebinding_protection
    assert set(settings.allowed_hosts) == {
        "127.0.0.1",
        "127.0.0.1:*",
        "localhost",
        "localhost:*",
        "[::1]",
        "[::1]:*",
        "gpu.lan",
        "gpu.lan:*",
    }
    assert settings.allowed_origins == ["http://localhost:5173"]
