"""URLs as lmbridge shows them: the host, port and path readable, the secrets a URL can
carry (user:password, query values, fragment) masked."""

from __future__ import annotations

import pytest

from proxy.redact import redact_url, redact_urls


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("http://127.0.0.1:1234", "http://127.0.0.1:1234"),
        ("https://gpu.local:8443/v1/models", "https://gpu.local:8443/v1/models"),
        ("http://user:secret@host:1234/v1", "http://***@host:1234/v1"),
        ("http://token@host", "http://***@host"),
        ("http://a@b:c@host/x", "http://***@host/x"),  # the last @ ends the userinfo
        ("http://u:p@[::1]:8080/mcp", "http://***@[::1]:8080/mcp"),
        ("http://host/mcp?api_key=sk-1&page=2", "http://host/mcp?api_key=***&page=***"),
        ("http://host/mcp?sk-bare-token", "http://host/mcp?***"),
        ("http://host/mcp?empty=&&x", "http://host/mcp?empty=&&***"),
        ("http://host/mcp#access_token=abc", "http://host/mcp#***"),
        ("http://host/a@b", "http://host/a@b"),  # an @ in the path is not userinfo
        ("http://host?q=1@x", "http://host?q=***"),
        ("http://u:p@host:99999/x?k=v#f", "http://***@host:99999/x?k=***#***"),
        ("http://u:p@[::1/broken", "http://***@[::1/broken"),  # malformed: still masked
        ("not a url", "not a url"),
        ("localhost:1234", "localhost:1234"),
        ("", ""),
    ],
)
def test_redact_url(url, shown):
    """Userinfo, every query value and the fragment are masked; the rest is kept."""
    assert redact_url(url) == shown


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "HTTPStatusError: Client error '401 Unauthorized' for url "
            "'http://bob:hunter2@mcp.local:9000/mcp?token=t0k'",
            "HTTPStatusError: Client error '401 Unauthorized' for url "
            "'http://***@mcp.local:9000/mcp?token=***'",
        ),
        (
            "see https://a:b@x/y and http://c/d?e=f",
            "see https://***@x/y and http://c/d?e=***",
        ),
        (
            "ConnectError: All connection attempts failed",
            "ConnectError: All connection attempts failed",
        ),
    ],
)
def test_redact_urls_in_a_message(text, shown):
    """Every URL quoted in a message (an HTTP error's) is redacted in place."""
    assert redact_urls(text) == shown
