"""URLs as lmbridge shows them in logs, error messages and metric labels: without the
secrets a URL may carry.

An upstream or MCP server URL may hold a password (``http://user:secret@host``) or a
token (``?api_key=...``); the host, port and path stay readable so that the operator
can still tell which server a line is about. A path can hold a secret too (a webhook
token), but there is no telling it apart from a route, so it is shown.
"""

from __future__ import annotations

import re

MASK = "***"

# A URL inside a longer text (an exception message): up to a space, a quote or <>.
_URL_IN_TEXT = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(url: str) -> str:
    """``url`` with its userinfo, each query value and its fragment masked.

    Split by hand, not with urlsplit: it refuses some malformed URLs (an unclosed
    ``[``), and those are exactly the ones that end up in error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    _, at, host = authority.rpartition("@")  # the last @, as HTTP clients read it
    if at:
        authority = f"{MASK}@{host}"
    before, hash_, fragment = tail.partition("#")
    path, question, query = before.partition("?")
    if query:
        query = "&".join(_masked_pair(pair) for pair in query.split("&"))
    return f"{scheme}://{authority}{path}{question}{query}{hash_}{MASK if fragment else ''}"


def redact_urls(text: str) -> str:
    """Every URL in ``text`` redacted (for messages that quote one)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda match: redact_url(match.group()), text)


def _masked_pair(pair: str) -> str:
    name, equals, value = pair.partition("=")
    if equals:
        return f"{name}={MASK}" if value else pair
    return MASK if pair else pair  # a bare ?token is a value without a name
