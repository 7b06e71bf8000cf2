"""What the relay of unknown routes may pass on (``proxy/relay.py``): which paths are
lmbridge's own and never relayed, which methods may be retried, which headers cross in
each direction, and the metric label of a relayed path. Pure: values in, values out.

lmbridge serves some routes itself and relays every other one to the upstream as it
came. A path the upstream would read as one of lmbridge's own (``/v1/x/../responses``,
``/v1%2Fresponses``, ``//V1/Responses/``) must not slip through to the upstream's
namesake: the check below reads a path the most generous way a server might (decoded
again, backslashes as slashes, dot segments resolved, empty segments dropped, any case)
before it decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import unquote

# The paths lmbridge answers itself, with everything below them. Never relayed: a wrong
# method on one of them is a 405, a path below one that lmbridge lacks a 404.
OWN_PATHS = (
    "/healthz",
    "/readyz",
    "/metrics",
    "/v1/models",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/conversations",
    "/v1/mcp",
    "/v1/lmbridge",
)
_OWN_SEGMENTS = tuple(tuple(p.strip("/").split("/")) for p in OWN_PATHS)

# RFC 9110's idempotent methods: sent again after a failure that may have reached the
# upstream. Any other method is retried only when no connection could be made.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# What is relayed at all; CONNECT and TRACE, and methods of other protocols, get 405.
RELAYED_METHODS = frozenset({*IDEMPOTENT_METHODS, "POST", "PATCH"})

# Routes model servers are known to serve: their own metric series. Any other relayed
# path is counted as "relayed", so that clients cannot grow the series without limit.
KNOWN_ROUTES = frozenset(
    {
        # Anthropic's Messages API (LM Studio 0.4.1+, llama.cpp)
        "/v1/messages",
        "/v1/messages/count_tokens",
        # OpenAI routes lmbridge does not serve itself
        "/v1/rerank",
        "/v1/audio/transcriptions",
        "/v1/audio/translations",
        "/v1/audio/speech",
        # llama.cpp's own
        "/tokenize",
        "/detokenize",
        "/apply-template",
        "/props",
        "/slots",
        "/health",
        "/v1/health",
        "/infill",
        "/completion",
        "/embedding",
        "/rerank",
        "/reranking",
        "/v1/reranking",
        "/lora-adapters",
        # LM Studio's own
        "/api/v0/models",
        "/api/v0/chat/completions",
        "/api/v0/completions",
        "/api/v0/embeddings",
        "/api/v1/models",
        "/api/v1/models/load",
        "/api/v1/models/unload",
        "/api/v1/chat",
    }
)
OTHER_ROUTE = "relayed"

# Headers that describe one connection, not the request (RFC 9110 7.6.1), or that the
# relay sets itself: the body's length (recomputed), the encoding (lmbridge asks the
# upstream for identity and decodes what comes anyway), the request id (lmbridge's).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-authenticate",
        "content-length",
        "host",
        "expect",
        "x-request-id",
    }
)
_NOT_UPSTREAM = _HOP_BY_HOP | {
    # lmbridge already answered for what a browser says: the upstream judges nothing.
    "origin",
    "referer",
    "cookie",
    "accept-encoding",
    "x-mcp-servers",  # lmbridge's own
}
_CREDENTIALS = frozenset({"authorization", "x-api-key"})
# Names the upstream client also sets: spelt like it, so that the client's value
# replaces its default instead of going out twice.
_CANONICAL = {"content-type": "Content-Type", "authorization": "Authorization"}

_NOT_DOWNSTREAM = _HOP_BY_HOP | {
    "content-encoding",
    "set-cookie",
    "set-cookie2",
    # The daemon's own: its CORS answer, its date and name.
    "server",
    "date",
    # An alternative service at the upstream's address would be one for lmbridge's.
    "alt-svc",
}


def is_own_path(path: str) -> bool:
    """Whether ``path`` (the decoded path of a request) is one of lmbridge's own or below
    one, read as generously as any server might."""
    segments = _segments(path)
    for own in _OWN_SEGMENTS:
        if len(segments) >= len(own) and all(
            _same_segment(seg, name) for seg, name in zip(segments, own, strict=False)
        ):
            return True
    return False


def _segments(path: str) -> list[str]:
    for _ in range(3):  # encoded twice or thrice over still counts
        decoded = unquote(path)
        if decoded == path:
            break
        path = decoded
    resolved: list[str] = []
    for segment in path.replace("\\", "/").lower().split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if resolved:
                resolved.pop()
            continue
        resolved.append(segment)
    return resolved


def _same_segment(segment: str, name: str) -> bool:
    """``responses`` is ``responses``, ``responses.json`` and ``responses;x``, not
    ``responses_v2``."""
    if not segment.startswith(name):
        return False
    if len(segment) == len(name):
        return True
    following = segment[len(name)]
    return not (following.isalnum() or following in "-_")


def route_label(path: str) -> str:
    """The ``route`` label of a relayed request's metrics."""
    return path if path in KNOWN_ROUTES else OTHER_ROUTE


def upstream_headers(
    headers: Iterable[tuple[str, str]], *, pass_credentials: bool
) -> dict[str, str]:
    """The client's headers that go upstream: end-to-end ones, without cookies and what
    only concerned lmbridge; its ``Authorization`` and ``x-api-key`` only when
    ``pass_credentials`` (lmbridge checks no client key and has no upstream key of its
    own). Repeated headers are joined with ", " (RFC 9110 5.3)."""
    pairs = list(headers)
    dropped = _connection_tokens(pairs) | _NOT_UPSTREAM
    if not pass_credentials:
        dropped = dropped | _CREDENTIALS
    chosen: dict[str, str] = {}
    for name, value in pairs:
        lower = name.lower()
        if lower in dropped or lower.startswith("sec-fetch-"):
            continue
        key = _CANONICAL.get(lower, name)
        same = next((k for k in chosen if k.lower() == lower), None)
        if same is None:
            chosen[key] = value
        else:
            chosen[same] = f"{chosen[same]}, {value}"
    return chosen


def client_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """The upstream's answer headers that go back to the client, repeated ones kept:
    end-to-end ones, without cookies, CORS (lmbridge answers for its origins) or the
    encoding of a body lmbridge decoded."""
    pairs = list(headers)
    dropped = _connection_tokens(pairs) | _NOT_DOWNSTREAM
    return [
        (name, value)
        for name, value in pairs
        if (lower := name.lower()) not in dropped and not lower.startswith("access-control-")
    ]


def _connection_tokens(pairs: list[tuple[str, str]]) -> frozenset[str]:
    """The headers a ``Connection`` header names: hop-by-hop too."""
    return frozenset(
        token.strip().lower()
        for name, value in pairs
        if name.lower() == "connection"
        for token in value.split(",")
        if token.strip()
    )
