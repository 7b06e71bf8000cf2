"""What the relay passes on: lmbridge's own paths, metric labels, headers each way."""

from __future__ import annotations

import pytest

from proxy.relay_rules import (
    IDEMPOTENT_METHODS,
    RELAYED_METHODS,
    client_headers,
    is_own_path,
    route_label,
    upstream_headers,
)


@pytest.mark.parametrize(
    ("path", "own"),
    [
        ("/healthz", True),
        ("/healthz/", True),
        ("/metrics/x", True),
        ("/v1/models/qwen/qwen3-4b", True),
        ("/v1/responses", True),
        ("/v1/responses/resp_1/cancel/x", True),
        ("/v1/conversations/c/items", True),
        ("/v1/mcp/servers/x", True),
        ("/v1/chat/completions/", True),
        ("/V1/RESPONSES", True),
        ("//v1///responses//", True),
        ("/v1/x/../responses", True),
        ("/v1/./responses", True),
        ("/../../v1/responses", True),
        ("/v1%2Fresponses", True),
        ("/v1/%2e%2e/v1/responses", True),
        ("/v1/%252e%252e/v1/responses", True),
        ("/v1\\responses", True),
        ("/v1/responses.json", True),
        ("/v1/responses;x=1", True),
        ("/v1/responses%00", True),
        ("/v1/responses_v2", False),
        ("/v1/responsesx", False),
        ("/v1/messages", False),
        ("/v1/messages/count_tokens", False),
        ("/v1/embeddings-x", False),
        ("/metricsz", False),
        ("/tokenize", False),
        ("/", False),
        ("", False),
        ("/api/v1/models", False),
        ("/v2/responses", False),
        ("/x/v1/responses", False),
    ],
)
def test_own_paths_however_spelt(path, own):
    """lmbridge's paths and those below them, read the most generous way a server might."""
    assert is_own_path(path) is own


@pytest.mark.parametrize(
    ("path", "label"),
    [("/v1/messages", "/v1/messages"), ("/tokenize", "/tokenize"), ("/slots/0", "relayed"),
     ("/anything/else", "relayed"), ("/v1/messages/", "relayed")],
)  # fmt: skip
def test_route_labels_are_bounded(path, label):
    """Known routes get their own series; any other path shares one."""
    assert route_label(path) == label


def test_methods():
    """RFC 9110's idempotent methods are retried; POST and PATCH are relayed, not retried."""
    assert {"GET", "HEAD", "OPTIONS", "PUT", "DELETE"} == IDEMPOTENT_METHODS
    assert {"POST", "PATCH"} == RELAYED_METHODS - IDEMPOTENT_METHODS
    assert "TRACE" not in RELAYED_METHODS and "CONNECT" not in RELAYED_METHODS


REQUEST = [
    ("Host", "127.0.0.1:1235"),
    ("Content-Type", "application/json"),
    ("Content-Length", "12"),
    ("Connection", "keep-alive, X-Hop"),
    ("X-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("Transfer-Encoding", "chunked"),
    ("TE", "trailers"),
    ("Upgrade", "websocket"),
    ("Proxy-Authorization", "Basic x"),
    ("Expect", "100-continue"),
    ("Cookie", "a=1"),
    ("Origin", "http://localhost:5173"),
    ("Referer", "http://localhost:5173/app"),
    ("Sec-Fetch-Site", "same-site"),
    ("Accept-Encoding", "gzip"),
    ("X-Request-ID", "client-id"),
    ("X-MCP-Servers", "files"),
    ("Authorization", "Bearer k"),
    ("x-api-key", "k"),
    ("anthropic-version", "2023-06-01"),
    ("anthropic-beta", "a"),
    ("anthropic-beta", "b"),
    ("User-Agent", "claude-cli/2.0"),
]


def test_upstream_headers_keep_end_to_end_ones_only():
    """Hop-by-hop headers, what the Connection header names, cookies, what a browser told
    lmbridge and lmbridge's own are dropped; repeated ones joined; credentials dropped."""
    assert upstream_headers(REQUEST, pass_credentials=False) == {
        "Content-Type": "application/json",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "a, b",
        "User-Agent": "claude-cli/2.0",
    }


def test_credentials_pass_only_when_asked():
    """A transparent lmbridge passes the client's Authorization and x-api-key on, spelt
    so that they replace the upstream client's defaults."""
    sent = upstream_headers([("authorization", "Bearer k"), ("X-Api-Key", "k"),
                             ("content-type", "text/plain")], pass_credentials=True)  # fmt: skip
    assert sent == {"Authorization": "Bearer k", "X-Api-Key": "k", "Content-Type": "text/plain"}


def test_client_headers_drop_cookies_cors_and_connection_ones():
    """The answer's end-to-end headers come back, repeated ones kept; cookies, CORS, the
    encoding of a decoded body and the connection's own do not."""
    answer = [
        ("Content-Type", "text/event-stream"),
        ("Content-Length", "10"),
        ("Content-Encoding", "gzip"),
        ("Transfer-Encoding", "chunked"),
        ("Connection", "close, X-Hop"),
        ("X-Hop", "1"),
        ("Set-Cookie", "a=1"),
        ("Access-Control-Allow-Origin", "*"),
        ("Access-Control-Allow-Credentials", "true"),
        ("Server", "llama.cpp"),
        ("Date", "today"),
        ("Alt-Svc", 'h3=":443"'),
        ("Link", "<a>"),
        ("Link", "<b>"),
        ("Retry-After", "3"),
        ("request-id", "req_1"),
    ]
    assert client_headers(answer) == [
        ("Content-Type", "text/event-stream"),
        ("Link", "<a>"),
        ("Link", "<b>"),
        ("Retry-After", "3"),
        ("request-id", "req_1"),
    ]
