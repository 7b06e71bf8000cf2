"""What the daemon accepts from web browsers: the ``Host`` and ``Origin`` checks and the
CORS answers, as pure functions of the request's headers (no I/O, no aiohttp).

A localhost daemon is reachable from every page the user opens. Two attacks matter:

- A cross-site request: a page on another origin sends a request the browser does not
  preflight (``Content-Type: text/plain``, a form post) and the daemon acts on it (runs
  the model, calls MCP tools). Browsers mark such requests with ``Origin``: any origin
  not configured is refused, and JSON routes refuse bodies that are not JSON.
- DNS rebinding: a page's own host name is made to resolve to 127.0.0.1, so that its
  requests are same-origin for the browser and their answers readable. The ``Host``
  header then carries the attacker's name: only names that cannot be rebound (IP
  literals, ``localhost`` and ``*.localhost``, which browsers resolve to loopback
  themselves) and names the operator configured are answered.

Clients that are not browsers (SDKs, curl) send neither a foreign ``Host`` nor an
``Origin`` and are unaffected.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from urllib.parse import urlsplit

# Headers a browser app may read from lmbridge's answers besides the CORS-safe ones.
EXPOSED_HEADERS = (
    "X-Request-ID, X-LMBridge-Warning, X-LMBridge-Upstream, X-MCP-Unavailable, Retry-After"
)
ALLOWED_METHODS = "GET, POST, DELETE, OPTIONS"
PREFLIGHT_MAX_AGE = "600"
# Host values seen are remembered with their verdict; the header is the client's to
# choose, so the memory is bounded.
_HOST_MEMORY = 256
_DEFAULT_PORTS = {"http": 80, "https": 443}


def normalize_origin(value: str) -> str:
    """``scheme://host[:port]`` in lower case without a default port; ValueError when
    the value is not an origin (a path, a query, userinfo, no host)."""
    parts = urlsplit(value.strip())
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ValueError(f"not an origin (scheme://host[:port]): {value!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ValueError(f"an origin has no path, query or user: {value!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"not an origin (bad port): {value!r}") from None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    if port is None or port == _DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}"
    return f"{scheme}://{host}:{port}"


def host_name(host: str) -> str:
    """The name of a ``Host`` header value, without its port, in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    name, _, _ = host.partition(":")
    return name.rstrip(".")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class BrowserPolicy:
    """The configured ``server.allowed_hosts`` and ``server.cors_origins``, applied."""

    def __init__(self, allowed_hosts: Iterable[str], cors_origins: Iterable[str]) -> None:
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts]
        self.any_host = "*" in hosts
        self._names = frozenset(h for h in hosts if not h.startswith("."))
        self._suffixes = tuple(h for h in hosts if h.startswith("."))
        origins = list(cors_origins)
        self.any_origin = "*" in origins
        self._origins = frozenset(normalize_origin(o) for o in origins if o != "*")
        self._host_verdicts: dict[str, bool] = {}

    def host_allowed(self, host: str | None) -> bool:
        """A request without ``Host`` (HTTP/1.0) comes from no browser."""
        if host is None or self.any_host:
            return True
        verdict = self._host_verdicts.get(host)
        if verdict is None:
            verdict = self._judge_host(host)
            if len(self._host_verdicts) >= _HOST_MEMORY:
                self._host_verdicts.clear()
            self._host_verdicts[host] = verdict
        return verdict

    def _judge_host(self, host: str) -> bool:
        name = host_name(host)
        if not name:
            return False
        if _is_ip(name) or name == "localhost" or name.endswith(".localhost"):
            return True
        return name in self._names or name.endswith(self._suffixes)

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """A configured origin, or the daemon's own (a page it serves itself)."""
        if self.any_origin:
            return True
        try:
            normalized = normalize_origin(origin)
        except ValueError:
            return False  # "null" (sandboxed frames, file:// pages) among others
        if normalized in self._origins:
            return True
        return host is not None and normalized == normalize_origin(f"http://{host}")

    def preflight_headers(self, origin: str, requested_headers: str | None) -> dict[str, str]:
        """The answer to an allowed origin's ``OPTIONS`` preflight."""
        headers = {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Max-Age": PREFLIGHT_MAX_AGE,
            "Vary": "Origin",
        }
        if requested_headers:
            # The origin is trusted: whatever headers its SDK sends (x-stainless-*, ...).
            headers["Access-Control-Allow-Headers"] = requested_headers
        return headers

    @staticmethod
    def response_headers(origin: str) -> dict[str, str]:
        """The CORS headers of an answer to an allowed origin."""
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Vary": "Origin",
        }


def is_json_type(content_type: str) -> bool:
    """``application/json`` or a ``+json`` type, with any parameters."""
    media = content_type.partition(";")[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )
