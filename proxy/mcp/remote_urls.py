"""Which ``server_url`` a request may name: URLs and ``mcp.remote_servers`` patterns,
taken apart (scheme, host, port, path) and matched part by part. No I/O.

Matching the raw text let ``http://127.0.0.1:1@localhost:18602/mcp`` pass
``http://127.0.0.1:*/mcp``: the pattern saw a port where the HTTP client saw a
password. Here a URL is split as HTTP clients split it, with what they would read
differently refused (userinfo, backslashes, spaces), and each part normalised: the
host above all (``2130706433``, ``0x7f000001``, ``127.1``, ``[::ffff:7f00:1]`` and
the same in full-width digits are all 127.0.0.1). lmbridge then connects to the URL rebuilt from
those parts (``RemoteURL.url``), so what was matched is what is reached.

A pattern has the same parts (docs/mcp.md shows examples):

- scheme: ``http`` or ``https``;
- host: a name or an address, normalised as a URL's is; ``*`` for any host; or labels
  of which some are a whole ``*``, one label each (``*.example.com`` matches
  ``a.example.com``, not ``a.b.example.com`` nor ``example.com``; ``10.0.0.*``
  matches ``10.0.0.7``, and never the name ``10.0.0.7.evil.com``);
- port: a number, ``*`` for any, or none for the scheme's default;
- path: segment by segment, shell-style within a segment (``*`` never crosses a
  ``/``), a last segment ``**`` for any rest; one trailing ``/`` is ignored.

The query string is not matched and is passed on; a fragment is never sent.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from urllib.parse import quote

DEFAULT_PORTS = {"http": 80, "https": 443}
ANY = "*"
REST = "**"

_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
# WHATWG's "ends in a number": such a host is an IPv4 address or nothing.
_NUMERIC = re.compile(r"[0-9]+|0x[0-9a-f]*")
_IPV4_PART = re.compile(r"0x[0-9a-f]*|0[0-7]*|[1-9][0-9]*")
_DECIMAL_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SEPARATOR_ESCAPE = re.compile(r"%(?:2F|5C)", re.IGNORECASE)
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_ASCII_PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


class RemoteURLError(ValueError):
    """A URL or pattern lmbridge will not read; the message completes "The URL ..."."""


@dataclass(frozen=True, slots=True)
class RemoteURL:
    scheme: str
    host: str  # a lower-case ASCII name, a dotted-quad IPv4 or a compressed IPv6 address
    port: int
    path: str  # no dot segments; unreserved characters decoded, others %XX-escaped
    query: str

    @property
    def url(self) -> str:
        """The URL lmbridge connects to: one spelling, read the same by every client."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port == DEFAULT_PORTS[self.scheme] else f":{self.port}"
        query = f"?{self.query}" if self.query else ""
        return f"{self.scheme}://{host}{port}{self.path}{query}"


@dataclass(frozen=True, slots=True)
class Pattern:
    scheme: str
    host: str  # ANY, a normalised host, or dot-separated labels some of which are ANY
    port: int | None  # None: any port
    path: tuple[str, ...]  # segments, shell-style; a last REST matches any rest

    def matches(self, url: RemoteURL) -> bool:
        return (
            url.scheme == self.scheme
            and (self.port is None or url.port == self.port)
            and _host_matches(self.host, url.host)
            and _path_matches(self.path, _segments(url.path))
        )


def parse_url(text: str) -> RemoteURL:
    """A ``server_url`` as lmbridge would connect to it. Raises ``RemoteURLError``."""
    scheme, host, port, path, query = _split(text)
    return RemoteURL(scheme, _host(host), _port(port, scheme), _path(path), query)


@functools.lru_cache(maxsize=256)
def parse_pattern(text: str) -> Pattern:
    """An ``mcp.remote_servers`` entry. Raises ``RemoteURLError``."""
    if "?" in text or "#" in text:
        raise RemoteURLError(
            "has a ? or #: a pattern matches scheme, host, port and path, not a query"
        )
    scheme, host, port, path, _ = _split(text)
    segments = _segments(_path(path))
    if REST in segments[:-1]:
        raise RemoteURLError(f"has {REST} before the last path segment")
    any_port = port == ANY
    return Pattern(scheme, _pattern_host(host), None if any_port else _port(port, scheme), segments)


def allows(patterns: Iterable[str], url: RemoteURL) -> bool:
    """Whether any of the (valid) patterns matches ``url``."""
    return any(parse_pattern(pattern).matches(url) for pattern in patterns)


# --- taking a URL apart -----------------------------------------------------


def _split(text: str) -> tuple[str, str, str | None, str, str]:
    """scheme, host, port (None when absent), path, query; the fragment is never sent."""
    if not text.isprintable() or " " in text or "\\" in text:
        raise RemoteURLError("has a space, a control character or a backslash")
    scheme, sep, rest = text.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in DEFAULT_PORTS:
        raise RemoteURLError("is not an http:// or https:// URL")
    end = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        # Parsers disagree on where userinfo ends; credentials belong in headers.
        raise RemoteURLError(
            "has a user name or password (user@host): send credentials in headers or "
            "authorization instead"
        )
    if authority.startswith("["):
        close = authority.find("]")
        if close < 0:
            raise RemoteURLError("has an unclosed [ in its host")
        host, after = authority[: close + 1], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise RemoteURLError("has something between the ] of its host and its port")
        port = after[1:] if after else None
    else:
        host, colon, port_text = authority.partition(":")
        port = port_text if colon else None
    path, _, query = tail.partition("#")[0].partition("?")
    return scheme, host, port, path, query


def _port(text: str | None, scheme: str) -> int:
    if not text:
        return DEFAULT_PORTS[scheme]
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536):
        raise RemoteURLError("has a port that is not a number from 1 to 65535")
    return int(text)


def _host(text: str) -> str:
    if not text:
        raise RemoteURLError("has no host")
    if text.startswith("["):
        return _ipv6(text[1:-1])
    name = text.lower()
    if not name.isascii():
        try:  # IDNA 2003 with nameprep: full-width digits and dots, soft hyphens, case
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            raise RemoteURLError("has a host that is not a valid domain name") from None
    if name.endswith("."):  # the root label: "localhost." is localhost
        name = name[:-1]
    labels = name.split(".")
    if _NUMERIC.fullmatch(labels[-1]):
        return _ipv4(labels)
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise RemoteURLError("has a host that is not a valid domain name")
    return name


def _domain_label(label: str) -> str:
    """One label of a host pattern, normalised as in a host name."""
    if not label.isascii():
        try:
            label = label.encode("idna").decode("ascii")
        except UnicodeError:
            raise RemoteURLError("has a host that is not a valid domain name") from None
    if not _LABEL.fullmatch(label):
        raise RemoteURLError("has a host that is not a valid domain name")
    return label


def _ipv6(text: str) -> str:
    if "%" in text:
        raise RemoteURLError("has an IPv6 zone (%) in its host")
    try:
        address = ipaddress.IPv6Address(text)
    except ValueError:
        raise RemoteURLError("has a host that is not a valid IPv6 address") from None
    mapped = address.ipv4_mapped  # [::ffff:127.0.0.1] is 127.0.0.1
    return str(mapped) if mapped is not None else str(address)


def _ipv4(labels: list[str]) -> str:
    """The forms inet_aton and browsers read: 1 to 4 parts, each decimal, octal (0177)
    or hex (0x7f), the last filling the remaining bytes (127.1, 2130706433)."""
    if len(labels) > 4 or not all(
        len(label) <= 40 and _IPV4_PART.fullmatch(label) for label in labels
    ):
        raise RemoteURLError("has a host that is not a valid IPv4 address")
    numbers = [_ipv4_number(label) for label in labels]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise RemoteURLError("has a host that is not a valid IPv4 address")
    value = numbers[-1] + sum(n << (8 * (3 - i)) for i, n in enumerate(numbers[:-1]))
    return str(ipaddress.IPv4Address(value))


def _ipv4_number(label: str) -> int:
    if label.startswith("0x"):
        return int(label[2:] or "0", 16)
    return int(label, 8) if label.startswith("0") else int(label)


def _path(text: str) -> str:
    if "%" in text:
        if _BAD_ESCAPE.search(text):
            raise RemoteURLError("has a % in its path that is not a %XX escape")
        text = _ESCAPE.sub(_unescape_unreserved, text)
        if _SEPARATOR_ESCAPE.search(text):
            raise RemoteURLError("has an escaped / or \\ (%2F, %5C) in its path")
    if not text.isascii():
        text = quote(text, safe=_ASCII_PRINTABLE)  # as the HTTP client would send it
    return _without_dot_segments(text or "/")


def _unescape_unreserved(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else match.group().upper()


def _without_dot_segments(path: str) -> str:
    """RFC 3986's remove_dot_segments for an absolute path."""
    segments = path.split("/")[1:]
    kept: list[str] = []
    for segment in segments:
        if segment == "..":
            if kept:
                kept.pop()
        elif segment != ".":
            kept.append(segment)
    if segments[-1] in (".", ".."):
        kept.append("")
    return "/" + "/".join(kept)


# --- patterns ---------------------------------------------------------------


def _pattern_host(text: str) -> str:
    if text == ANY:
        return ANY
    if ANY not in text:
        return _host(text)
    if text.startswith("["):
        raise RemoteURLError("has a * in an IPv6 address")
    labels = text.lower().removesuffix(".").split(".")
    if any(ANY in label and label != ANY for label in labels):
        raise RemoteURLError("has a * inside a host label: a * stands for one whole label")
    named = [label for label in labels if label != ANY]
    if any(_NUMERIC.fullmatch(label) and not _DECIMAL_OCTET.fullmatch(label) for label in named):
        raise RemoteURLError("has a hex or octal number in a host pattern: use dotted decimal")
    if _NUMERIC.fullmatch(labels[-1]) or (named and all(label.isdigit() for label in named)):
        # An IPv4 pattern: the addresses it meets are normalised to dotted decimal.
        if len(labels) != 4 or not all(
            label == ANY or (_DECIMAL_OCTET.fullmatch(label) and int(label) < 256)
            for label in labels
        ):
            raise RemoteURLError("has an IPv4 pattern that is not four decimal numbers or *")
        return ".".join(labels)
    return ".".join(label if label == ANY else _domain_label(label) for label in labels)


def _host_matches(pattern: str, host: str) -> bool:
    if pattern == ANY:
        return True
    if ANY not in pattern:
        return pattern == host
    wanted, labels = pattern.split("."), host.split(".")
    return len(wanted) == len(labels) and all(
        w in (ANY, label) for w, label in zip(wanted, labels, strict=True)
    )


def _segments(path: str) -> tuple[str, ...]:
    segments = path.split("/")[1:]
    if len(segments) > 1 and segments[-1] == "":
        segments.pop()  # /mcp/ is /mcp
    return tuple(segments)


def _path_matches(pattern: tuple[str, ...], segments: tuple[str, ...]) -> bool:
    if pattern and pattern[-1] == REST:
        head = pattern[:-1]
        return len(segments) >= len(head) and all(
            fnmatchcase(s, p) for s, p in zip(segments, head, strict=False)
        )
    return len(segments) == len(pattern) and all(
        fnmatchcase(s, p) for s, p in zip(segments, pattern, strict=True)
    )
