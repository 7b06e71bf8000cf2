"""The relay of the routes lmbridge does not serve itself (Anthropic's /v1/messages,
/tokenize, /v1/audio/*, /props, /slots, ...) to the scripted fake upstream: what goes up,
what comes back, and what never leaves."""

from __future__ import annotations

import asyncio
import io
import json

import aiohttp
import pytest
from aiohttp import web

from proxy.app import create_app
from proxy.logs import RequestLog
from tests.fake_upstream import Reply
from tests.integration.test_resilience import closed_port, metric
from tests.raw_http import connect, until_closed

MESSAGES = "/v1/messages"
CLAUDE = {
    "model": "test-model",
    "max_tokens": 16,
    "messages": [{"role": "user", "content": "a secret prompt"}],
}
MESSAGE = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "content": [{"type": "text", "text": "Hello"}],
    "model": "test-model",
    "stop_reason": "end_turn",
    "usage": {"input_tokens": 5, "output_tokens": 1},
}


def sse(event: str, data: dict) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE_EVENTS = [
    sse("message_start", {"type": "message_start", "message": {**MESSAGE, "content": []}}),
    sse("content_block_start", {"type": "content_block_start", "index": 0,
                                "content_block": {"type": "text", "text": ""}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "Hel"}}),
    sse("content_block_delta", {"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": "lo"}}),
    sse("message_stop", {"type": "message_stop"}),
]  # fmt: skip


async def raw_request(port: int, head: str, body: bytes = b"") -> bytes:
    """One request written by hand (a target no client library would send); the whole
    answer, read until the daemon closes the connection."""
    reader, writer = await connect(port)
    writer.write(head.encode() + b"\r\n" + body)
    try:
        return await until_closed(reader)
    finally:
        writer.close()


def get(target: str, port: int) -> str:
    return f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"


# --- what goes up and what comes back ---------------------------------------------


async def test_get_post_and_delete_are_relayed_with_their_query(proxy, fake_upstream):
    """Method, path, query string and body reach the upstream as sent; its status, body
    and content type come back as it sent them."""
    fake_upstream.add_reply("/props", Reply(json={"n_ctx": 8192}))
    fake_upstream.add_reply("/tokenize", Reply(json={"tokens": [1, 2]}))
    fake_upstream.add_reply(
        "/slots/0", Reply(body=b"erased", content_type="text/plain", status=202)
    )
    resp = await proxy.get("/props?a=1&b=%20x&b=2")
    assert resp.status == 200
    assert await resp.json() == {"n_ctx": 8192}
    raw = b'{"content":  "hello world", "add_special": true}'
    resp = await proxy.post(
        "/tokenize?with_pieces=1", data=raw, headers={"Content-Type": "application/json"}
    )
    assert await resp.json() == {"tokens": [1, 2]}
    resp = await proxy.delete("/slots/0?action=erase")
    assert resp.status == 202
    assert resp.content_type == "text/plain"
    assert await resp.read() == b"erased"
    seen = [(s.method, s.path, s.query) for s in fake_upstream.seen]
    assert ("GET", "/props", "a=1&b=%20x&b=2") in seen
    assert ("POST", "/tokenize", "with_pieces=1") in seen
    assert ("DELETE", "/slots/0", "action=erase") in seen
    assert fake_upstream.requests_to("/tokenize")[0].raw == raw


@pytest.mark.parametrize("method", ["PUT", "PATCH", "OPTIONS", "HEAD"])
async def test_other_methods_are_relayed(proxy, fake_upstream, method):
    """PUT, PATCH, OPTIONS (without Origin: no preflight) and HEAD go upstream too."""
    fake_upstream.add_reply("/lora-adapters", Reply(json=[{"id": 0, "scale": 0.5}]))
    resp = await proxy.request(method, "/lora-adapters", json=[{"id": 0, "scale": 0.5}])
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    assert [s.method for s in fake_upstream.requests_to("/lora-adapters")] == [method]


async def test_methods_of_other_protocols_are_405(proxy, fake_upstream):
    """TRACE and made-up methods are not relayed."""
    for method in ("TRACE", "PROPFIND"):
        resp = await proxy.request(method, "/props")
        assert resp.status == 405
        assert (await resp.json())["error"]["code"] == "method_not_allowed"
    assert fake_upstream.requests_to("/props") == []


async def test_a_binary_body_and_a_binary_answer_cross_unchanged(proxy, fake_upstream):
    """A multipart upload (an audio file) goes up byte for byte with its boundary; a
    binary answer comes back byte for byte with its type and length."""
    audio = bytes(range(256)) * 64
    form = aiohttp.FormData()
    form.add_field("model", "test-model")
    form.add_field("file", audio, filename="a.wav", content_type="audio/wav")
    writer = form()
    sent = io.BytesIO()

    class Sink:
        async def write(self, data: bytes) -> None:
            sent.write(data)

    await writer.write(Sink())
    content_type = writer.content_type
    fake_upstream.add_reply("/v1/audio/transcriptions", Reply(json={"text": "hi"}))
    resp = await proxy.post(
        "/v1/audio/transcriptions", data=sent.getvalue(), headers={"Content-Type": content_type}
    )
    assert resp.status == 200
    assert await resp.json() == {"text": "hi"}
    seen = fake_upstream.requests_to("/v1/audio/transcriptions")[0]
    assert seen.raw == sent.getvalue()
    assert seen.headers["Content-Type"] == content_type

    speech = bytes(reversed(range(256))) * 100
    fake_upstream.add_reply(
        "/v1/audio/speech",
        Reply(body=speech, content_type="audio/mpeg",
              headers={"Content-Disposition": 'attachment; filename="a.mp3"'}),
    )  # fmt: skip
    resp = await proxy.post("/v1/audio/speech", json={"model": "test-model", "input": "hi"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "audio/mpeg"
    assert resp.headers["Content-Length"] == str(len(speech))
    assert resp.headers["Content-Disposition"] == 'attachment; filename="a.mp3"'
    assert await resp.read() == speech


async def test_a_messages_answer_is_relayed_as_it_came(proxy, fake_upstream):
    """A plain /v1/messages answer comes back byte for byte, without lmbridge's error
    shape or chat handling."""
    raw = json.dumps(MESSAGE).encode()
    fake_upstream.add_reply(MESSAGES, Reply(body=raw))
    resp = await proxy.post(MESSAGES, json=CLAUDE, headers={"anthropic-version": "2023-06-01"})
    assert resp.status == 200
    assert await resp.read() == raw
    seen = fake_upstream.requests_to(MESSAGES)[0]
    assert seen.body == CLAUDE
    assert seen.headers["anthropic-version"] == "2023-06-01"


async def test_a_messages_stream_is_relayed_chunk_by_chunk(proxy, fake_upstream):
    """Each event of a streamed /v1/messages reaches the client while the upstream still
    holds the rest; the whole stream arrives unchanged, with no [DONE] added."""
    release = asyncio.Event()
    events = [MESSAGE_EVENTS[0], release, *MESSAGE_EVENTS[1:]]
    fake_upstream.add_reply(MESSAGES, Reply(stream=events, done=False))
    resp = await proxy.post(MESSAGES, json={**CLAUDE, "stream": True})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    assert first == MESSAGE_EVENTS[0]
    release.set()
    rest = await resp.read()
    assert first + rest == b"".join(MESSAGE_EVENTS)


async def test_a_compressed_answer_reaches_the_client_decoded(proxy, fake_upstream):
    """lmbridge asks the upstream for identity; a body compressed anyway is decoded, as on
    the other routes, and no Content-Encoding or stale length goes with it."""
    import gzip

    fake_upstream.add_reply(
        "/props", Reply(body=gzip.compress(b'{"a": 1}'), headers={"Content-Encoding": "gzip"})
    )
    resp = await proxy.get("/props", headers={"Accept-Encoding": "gzip"})
    assert resp.status == 200
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == b'{"a": 1}'
    assert fake_upstream.requests_to("/props")[0].headers["Accept-Encoding"] == "identity"


@pytest.mark.parametrize(
    ("status", "body", "content_type"),
    [
        (400, b'{"type":"error","error":{"type":"invalid_request_error","message":"bad"}}',
         "application/json"),
        (404, b"Unexpected endpoint or method. (GET /v1/nope)", "text/plain"),
        (500, b'{"error":{"code":500,"message":"\'messages\' is required"}}',
         "application/json"),
        (501, b'{"error":{"code":501,"message":"Start it with `--reranking`"}}',
         "application/json"),
    ],
)  # fmt: skip
async def test_upstream_error_statuses_come_back_unchanged(
    proxy, fake_upstream, status, body, content_type
):
    """The upstream's error answers keep their status, body and type: no OpenAI shape
    forced onto another API's errors."""
    fake_upstream.add_reply("/v1/rerank", Reply(status=status, body=body,
                                                content_type=content_type))  # fmt: skip
    resp = await proxy.post("/v1/rerank", json={"query": "a", "documents": ["b"]})
    assert resp.status == status
    assert resp.content_type == content_type
    assert await resp.read() == body
    assert resp.headers["X-Request-ID"].startswith("req_")


async def test_an_unscripted_path_gets_the_upstreams_own_404(proxy, fake_upstream):
    """A route the upstream lacks answers its own 404, not lmbridge's unknown_route."""
    resp = await proxy.get("/v1/nope")
    assert resp.status == 404
    assert (await resp.json())["error"]["message"] == "File Not Found"
    assert [s.path for s in fake_upstream.seen] == ["/v1/nope"]


async def test_an_answer_cut_mid_body_is_incomplete_for_the_client(proxy, fake_upstream):
    """An upstream that breaks off after the headers: what came is relayed, then the
    connection closes before the end, which the client sees as an error, never as a
    complete answer."""
    fake_upstream.add_reply(MESSAGES, Reply(stream=MESSAGE_EVENTS[:2], cut=True))
    resp = await proxy.post(MESSAGES, json={**CLAUDE, "stream": True})
    assert resp.status == 200
    with pytest.raises(aiohttp.ClientPayloadError):
        await resp.read()


# --- the model named in a JSON body ------------------------------------------------


async def test_an_unknown_model_is_404_and_never_reaches_the_upstream(proxy, fake_upstream):
    """`model` in a JSON body is checked against the catalog like on every route."""
    resp = await proxy.post(MESSAGES, json={**CLAUDE, "model": "claude-sonnet-4-5"})
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert set(error) == {"message", "type", "param", "code"}
    assert "test-model" in error["message"]
    assert fake_upstream.requests_to(MESSAGES) == []


async def test_an_alias_is_rewritten_and_nothing_else(make_proxy, fake_upstream):
    """Claude Code's model names can be aliases of a local model: the alias is replaced
    by its target, every other field kept."""
    proxy = await make_proxy(models__aliases={"claude-haiku-4-5": "test-model"})
    body = {**CLAUDE, "model": "claude-haiku-4-5", "x_vendor": {"a": [1, 2]}}
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE))
    resp = await proxy.post(MESSAGES, json=body)
    assert resp.status == 200
    assert fake_upstream.requests_to(MESSAGES)[0].body == {**body, "model": "test-model"}


async def test_a_large_body_is_checked_in_the_worker_and_sent_whole(make_proxy, fake_upstream):
    """A body over 1 MB is parsed (and its alias rewritten) off the event loop; without an
    alias its bytes go up unchanged."""
    proxy = await make_proxy(models__aliases={"claude-haiku-4-5": "test-model"})
    history = [{"role": "user", "content": f"turn {i} " + "x" * 200} for i in range(8000)]
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE), times=2)
    raw = json.dumps({**CLAUDE, "messages": history}).encode()
    assert len(raw) > 1 << 20
    json_type = {"Content-Type": "application/json"}
    resp = await proxy.post(MESSAGES, data=io.BytesIO(raw), headers=json_type)
    assert resp.status == 200
    assert fake_upstream.requests_to(MESSAGES)[0].raw == raw
    aliased = {**CLAUDE, "model": "claude-haiku-4-5", "messages": history}
    resp = await proxy.post(MESSAGES, data=io.BytesIO(json.dumps(aliased).encode()),
                            headers=json_type)  # fmt: skip
    assert resp.status == 200
    assert fake_upstream.requests_to(MESSAGES)[1].body == {**aliased, "model": "test-model"}


@pytest.mark.parametrize(
    ("body", "fragment"),
    [(b'{"model": 5, "messages": []}', "'model' must be a string"),
     (b'{"model": "test-model", "messages": [}', "not valid JSON")],
)  # fmt: skip
async def test_a_bad_json_body_is_400(proxy, fake_upstream, body, fragment):
    """A body sent as JSON must be JSON, and its model a string."""
    resp = await proxy.post(MESSAGES, data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]["message"]
    assert fake_upstream.requests_to(MESSAGES) == []


async def test_bodies_without_a_model_go_up_as_they_are(proxy, fake_upstream):
    """No model named, a JSON array, or a model in a body that is not JSON: nothing to
    check, and the bytes are sent unchanged."""
    for raw, content_type in [
        (b'{"content": "hi", "model": null}', "application/json"),
        (b"[1, 2]", "application/json"),
        (b"model=unknown-model", "application/x-www-form-urlencoded"),
    ]:
        resp = await proxy.post("/tokenize", data=raw, headers={"Content-Type": content_type})
        assert resp.status == 404  # the fake's own: it was relayed
        assert fake_upstream.seen[-1].raw == raw


# --- keys, headers, request ids, metrics, the log ------------------------------------


@pytest.fixture
async def authed(make_proxy):
    return await make_proxy(auth__api_keys=["sk-lmbridge"])


@pytest.mark.parametrize("path", ["/tokenize", MESSAGES])
async def test_relayed_routes_need_a_client_key(authed, fake_upstream, path):
    """With auth.api_keys, every relayed route needs a key, /v1 or not."""
    resp = await authed.post(path, json={"content": "x"})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"
    resp = await authed.post(path, json={"content": "x"}, headers={"x-api-key": "wrong"})
    assert resp.status == 401
    assert fake_upstream.requests_to(path) == []


async def test_the_client_key_is_never_forwarded(authed, fake_upstream):
    """The key, as Authorization or as Anthropic's x-api-key, opens lmbridge and stays
    there."""
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE), times=2)
    for header in ({"Authorization": "Bearer sk-lmbridge"}, {"x-api-key": "sk-lmbridge"}):
        resp = await authed.post(MESSAGES, json=CLAUDE, headers=header)
        assert resp.status == 200
    for seen in fake_upstream.requests_to(MESSAGES):
        assert "Authorization" not in seen.headers
        assert "x-api-key" not in seen.headers


async def test_the_upstream_key_replaces_the_clients(make_proxy, fake_upstream):
    """upstream.api_key goes upstream as a Bearer token; the client's Authorization and
    x-api-key do not."""
    proxy = await make_proxy(upstream__api_key="lm-token")
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE))
    headers = {"Authorization": "Bearer client", "x-api-key": "client"}
    await proxy.post(MESSAGES, json=CLAUDE, headers=headers)
    seen = fake_upstream.requests_to(MESSAGES)[0].headers
    assert seen["Authorization"] == "Bearer lm-token"
    assert "x-api-key" not in seen


async def test_a_transparent_lmbridge_passes_the_clients_credentials(proxy, fake_upstream):
    """Without client keys or an upstream key, the client's own credentials go upstream."""
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE))
    headers = {"Authorization": "Bearer lm-studio-token", "x-api-key": "lm-studio-token"}
    await proxy.post(MESSAGES, json=CLAUDE, headers=headers)
    seen = fake_upstream.requests_to(MESSAGES)[0].headers
    assert seen["Authorization"] == "Bearer lm-studio-token"
    assert seen["x-api-key"] == "lm-studio-token"


async def test_hop_by_hop_headers_and_cookies_stay_behind(proxy, fake_upstream):
    """Connection-scoped headers, those the Connection header names, cookies and what a
    browser said to lmbridge are not forwarded; end-to-end ones are. On the way back,
    cookies and the upstream's CORS answer are dropped, and the answer is confined."""
    fake_upstream.add_reply(
        MESSAGES,
        Reply(json=MESSAGE, headers={
            "Set-Cookie": "session=upstream", "Access-Control-Allow-Origin": "*",
            "X-Upstream-Note": "kept", "request-id": "req_upstream"}),
    )  # fmt: skip
    resp = await proxy.post(
        MESSAGES,
        json=CLAUDE,
        headers={
            "Connection": "keep-alive, X-Hop",
            "X-Hop": "1",
            "Keep-Alive": "timeout=5",
            "Proxy-Authorization": "Basic eDp5",
            "Cookie": "lmbridge=1",
            "Referer": "http://localhost:5173/",
            "Sec-Fetch-Mode": "cors",
            "TE": "trailers",
            "anthropic-beta": "tools-2024-04-04",
            "X-Stainless-Lang": "js",
        },
    )
    assert resp.status == 200
    seen = {k.lower(): v for k, v in fake_upstream.requests_to(MESSAGES)[0].headers.items()}
    for name in ("x-hop", "keep-alive", "proxy-authorization", "cookie", "referer",
                 "sec-fetch-mode", "te"):  # fmt: skip
        assert name not in seen, name
    assert seen["anthropic-beta"] == "tools-2024-04-04"
    assert seen["x-stainless-lang"] == "js"
    assert seen["content-length"] == str(len(json.dumps(CLAUDE)))
    assert "Set-Cookie" not in resp.headers
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert resp.headers["X-Upstream-Note"] == "kept"
    assert resp.headers["request-id"] == "req_upstream"
    assert resp.headers["Content-Security-Policy"] == "sandbox"
    assert resp.headers["X-Content-Type-Options"] == "nosniff"


async def test_request_id_metrics_and_log_line(aiohttp_client, make_config, fake_upstream):
    """The client's request id goes up and comes back; known routes count under their
    path, others under 'relayed'; one log line each, without the body."""
    stream = io.StringIO()
    request_log = RequestLog("json", stream)
    proxy = await aiohttp_client(create_app(make_config(), request_log=request_log))
    fake_upstream.add_reply(MESSAGES, Reply(json=MESSAGE))
    resp = await proxy.post(MESSAGES, json=CLAUDE, headers={"X-Request-ID": "rid-7"})
    assert resp.headers["X-Request-ID"] == "rid-7"
    assert fake_upstream.requests_to(MESSAGES)[0].headers["X-Request-ID"] == "rid-7"
    await proxy.get("/some/thing/else")
    text = await (await proxy.get("/metrics")).text()
    assert (
        'lmbridge_requests_total{model="test-model",route="/v1/messages",status="200"} 1.0' in text
    )
    assert 'lmbridge_requests_total{model="-",route="relayed",status="404"} 1.0' in text
    assert 'lmbridge_upstream_duration_seconds_count{route="/v1/messages"} 1.0' in text
    assert "/some/thing" not in text
    request_log.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    entry = next(line for line in lines if line["path"] == MESSAGES)
    assert {k: entry[k] for k in ("request_id", "method", "model", "status")} == {
        "request_id": "rid-7", "method": "POST", "model": "test-model", "status": 200,
    }  # fmt: skip
    assert "a secret prompt" not in stream.getvalue()


async def test_client_disconnect_cancels_the_upstream_request(proxy, fake_upstream):
    """A client that goes away mid-stream closes the upstream request at once."""
    fake_upstream.add_reply(MESSAGES, Reply(stream=MESSAGE_EVENTS[:1], stall=True))
    resp = await proxy.post(MESSAGES, json={**CLAUDE, "stream": True})
    await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 5)
    resp.close()
    await asyncio.wait_for(fake_upstream.cancelled.wait(), 5)


# --- retries and the circuit breaker ---------------------------------------------------


async def test_a_post_that_reached_the_upstream_is_not_retried(proxy, fake_upstream):
    """A relayed POST may not be idempotent: its 503, or a connection dropped after it
    was sent, goes back to the client instead of sending it again."""
    fake_upstream.add_reply(MESSAGES, Reply(status=503, body=b'{"error": "loading model"}'))
    resp = await proxy.post(MESSAGES, json=CLAUDE)
    assert resp.status == 503
    assert await resp.read() == b'{"error": "loading model"}'
    fake_upstream.add_reply(MESSAGES, Reply(drop=True))
    resp = await proxy.post(MESSAGES, json=CLAUDE)
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert len(fake_upstream.requests_to(MESSAGES)) == 2
    assert await metric(proxy, "lmbridge_upstream_retries_total") == 0


async def test_an_idempotent_request_is_retried(proxy, fake_upstream):
    """GET and DELETE are retried on 502/503/504 and dropped connections, like the
    other pass-through routes."""
    fake_upstream.add_reply("/slots", Reply(status=503, body=b"busy"))
    fake_upstream.add_reply("/slots", Reply(json=[]))
    resp = await proxy.get("/slots")
    assert resp.status == 200
    fake_upstream.add_reply("/slots/1", Reply(drop=True))
    fake_upstream.add_reply("/slots/1", Reply(json={}))
    resp = await proxy.delete("/slots/1")
    assert resp.status == 200
    assert len(fake_upstream.requests_to("/slots")) == 2
    assert len(fake_upstream.requests_to("/slots/1")) == 2


async def test_a_post_is_retried_when_no_connection_could_be_made(make_proxy):
    """A refused connection means the request never left: even a POST is sent again."""
    proxy = await make_proxy(upstream__url=f"http://127.0.0.1:{closed_port()}",
                             upstream__retry_attempts=3)  # fmt: skip
    resp = await proxy.post(MESSAGES, json={"max_tokens": 1})
    assert resp.status == 502
    assert (await resp.json())["error"]["code"] == "upstream_unavailable"
    assert await metric(proxy, 'lmbridge_upstream_retries_total{reason="connect"}') == 2


async def test_relayed_failures_count_towards_the_circuit(make_proxy, fake_upstream):
    """The breaker judges relayed calls like the others: once open, a relayed request
    fails fast without reaching the upstream."""
    proxy = await make_proxy(upstream__circuit_failure_threshold=2, upstream__retry_attempts=1)
    fake_upstream.add_reply("/props", Reply(status=502, body=b"bad gateway"), times=2)
    for _ in range(2):
        assert (await proxy.get("/props")).status == 502
    resp = await proxy.get("/props")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "circuit_open"
    assert len(fake_upstream.requests_to("/props")) == 2


# --- what is never relayed -------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    ["/v1/responses/resp_1/nested/more", "/v1/conversations/c/items/i/x", "/v1/mcp/other",
     "/healthz/x", "/metrics/x", "/readyz/", "/v1/chat/completions/", "/v1/models/",
     "/v1/x/../responses/r/y", "/v1/%2e%2e/v1/responses/r/y", "/v1%2Fresponses/r/y",
     "//v1//responses/r/y", "/V1/Responses/r/y", "/v1/responses.json",
     "/v1/responses;x=1/y", "/v1\\responses/r/y", "/v1/%252e%252e/v1/responses/r/y",
     "http://127.0.0.1/v1/responses/r/y"],
)  # fmt: skip
async def test_lmbridges_own_paths_are_never_relayed(proxy, fake_upstream, target):
    """A path on or below one of lmbridge's own, however it is spelt, is lmbridge's 404
    and never reaches the upstream."""
    raw = await raw_request(proxy.server.port, get(target, proxy.server.port))
    assert raw.startswith(b"HTTP/1.1 404 ")
    assert b'"code": "unknown_route"' in raw or b'"unknown_route"' in raw
    assert [s for s in fake_upstream.seen if s.method != "GET" or "models" not in s.path] == []


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/v1/models"), ("GET", "/v1/chat/completions"), ("PUT", "/v1/responses"),
     ("POST", "/healthz"), ("DELETE", "/v1/mcp/servers"), ("PATCH", "/v1/embeddings")],
)  # fmt: skip
async def test_a_wrong_method_on_lmbridges_routes_stays_405(proxy, fake_upstream, method, path):
    """A route lmbridge serves with another method is a 405 in the OpenAI shape."""
    resp = await proxy.request(method, path, json={})
    assert resp.status == 405
    error = (await resp.json())["error"]
    assert error["code"] == "method_not_allowed"
    assert set(error) == {"message", "type", "param", "code"}
    assert [s.path for s in fake_upstream.seen if s.path == path] == []


@pytest.fixture
async def elsewhere(aiohttp_server):
    """Another server on 127.0.0.1 that no request may reach; returns what it saw."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path_qs)
        return web.json_response({"elsewhere": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    return server.port, seen


async def test_path_tricks_stay_on_the_upstream(proxy, fake_upstream, elsewhere):
    """Absolute-form targets, '//host' paths, dot segments and encoded slashes all go to
    the configured upstream; another host is never contacted."""
    port, seen_elsewhere = elsewhere
    authority = f"127.0.0.1:{port}"
    targets = [f"http://{authority}/props", f"http://x@{authority}/props", f"//{authority}/props",
               f"/..//{authority}/props", f"/%2F%2F{authority}/props",
               f"/../../{authority}/props", f"/.%2e/{authority}/props"]  # fmt: skip
    for target in targets:
        raw = await raw_request(proxy.server.port, get(target, proxy.server.port))
        assert b"elsewhere" not in raw, target
    assert seen_elsewhere == []
    assert len(fake_upstream.seen) == len(targets)


async def test_an_upstream_redirect_is_relayed_not_followed(proxy, fake_upstream, elsewhere):
    """A 3xx of the upstream goes back to the client as it came; lmbridge never follows
    it to another host."""
    port, seen_elsewhere = elsewhere
    for method in ("GET", "POST"):
        fake_upstream.add_reply(
            "/", Reply(status=302, body=b"", headers={"Location": f"http://127.0.0.1:{port}/x"})
        )
        resp = await proxy.request(method, "/", allow_redirects=False)
        assert resp.status == 302
        assert resp.headers["Location"] == f"http://127.0.0.1:{port}/x"
    assert seen_elsewhere == []


async def test_the_switch_turns_the_relay_off(make_proxy, fake_upstream):
    """server.relay_unknown_routes = false: unknown routes are lmbridge's 404 again."""
    proxy = await make_proxy(server__relay_unknown_routes=False)
    resp = await proxy.post(MESSAGES, json=CLAUDE)
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "unknown_route"
    assert fake_upstream.requests_to(MESSAGES) == []


# --- browsers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    ["text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
     "multipart/form-data; boundary=x", "application/json"],
)  # fmt: skip
async def test_a_cross_origin_post_is_refused(proxy, fake_upstream, content_type):
    """A page of another origin posting to a relayed route (a form, a no-preflight fetch)
    gets 403 origin_not_allowed, whatever the body's type."""
    resp = await proxy.post(
        MESSAGES,
        data=json.dumps(CLAUDE),
        headers={"Content-Type": content_type, "Origin": "https://attacker.example"},
    )
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    assert fake_upstream.requests_to(MESSAGES) == []


async def test_a_rebound_host_is_refused(proxy, fake_upstream):
    """DNS rebinding: a foreign Host gets 403 on relayed routes too."""
    resp = await proxy.get("/props", headers={"Host": f"attacker.example:{proxy.server.port}"})
    assert resp.status == 403
    assert (await resp.json())["error"]["code"] == "host_not_allowed"
    assert fake_upstream.requests_to("/props") == []


@pytest.mark.parametrize("site", ["cross-site", "same-site"])
async def test_a_page_of_another_site_without_origin_is_refused(proxy, fake_upstream, site):
    """An <img> or a browser that leaves Origin out still says Sec-Fetch-Site: refused
    on relayed routes, whose effects lmbridge cannot know."""
    for method in ("GET", "POST"):
        resp = await proxy.request(
            method, "/slots", data=b"x", headers={"Sec-Fetch-Site": site,
                                                  "Content-Type": "text/plain"}
        )  # fmt: skip
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "origin_not_allowed"
    assert fake_upstream.requests_to("/slots") == []


async def test_non_json_bodies_pass_without_origin_or_from_a_trusted_one(make_proxy, fake_upstream):
    """A client that is not a browser (no Origin) or a trusted origin may send any body
    type to a relayed route; lmbridge's own routes still take JSON only."""
    proxy = await make_proxy(server__cors_origins=["http://localhost:5173"])
    fake_upstream.add_reply("/v1/audio/transcriptions", Reply(json={"text": "a"}), times=2)
    form = {"Content-Type": "multipart/form-data; boundary=b"}
    body = b'--b\r\nContent-Disposition: form-data; name="model"\r\n\r\ntest-model\r\n--b--\r\n'
    resp = await proxy.post("/v1/audio/transcriptions", data=body, headers=form)
    assert resp.status == 200
    trusted = {**form, "Origin": "http://localhost:5173", "Sec-Fetch-Site": "same-site"}
    resp = await proxy.post("/v1/audio/transcriptions", data=body, headers=trusted)
    assert resp.status == 200
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    resp = await proxy.post("/v1/chat/completions", data=body, headers=form)
    assert resp.status == 415


async def test_a_trusted_origins_preflight_is_answered_by_lmbridge(make_proxy, fake_upstream):
    """The preflight of a relayed route comes from lmbridge (its allowed origins), not
    from the upstream."""
    proxy = await make_proxy(server__cors_origins=["http://localhost:5173"])
    resp = await proxy.options(
        MESSAGES,
        headers={"Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST"},
    )
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://localhost:5173"
    assert fake_upstream.requests_to(MESSAGES) == []
