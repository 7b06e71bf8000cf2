"""Several upstreams through the real app: two fake upstreams on 127.0.0.1, the union of
their model lists, routing, fallbacks (a refused connection, a 503, an open breaker,
a fallback model), the X-LMBridge-Upstream header and the log line's hops, and a
Responses chain whose turns are served by two upstreams."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from proxy.app import create_app
from proxy.config import load_config
from proxy.keys import REQUEST_LOG, UPSTREAMS, USAGE
from proxy.logs import RequestLog
from tests.fake_upstream import CHAT, FakeUpstream, Reply, chat_completion

UPSTREAM = "X-LMBridge-Upstream"
Start = Callable[..., Awaitable[tuple[TestClient, io.StringIO]]]


async def _fake(aiohttp_server: Any, models: list[str]) -> tuple[FakeUpstream, TestServer]:
    fake = FakeUpstream(models)
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake, server


@pytest.fixture
async def two(aiohttp_server: Any) -> tuple[FakeUpstream, TestServer, FakeUpstream, TestServer]:
    """Upstream a lists a-only and shared, b lists b-only and shared."""
    a, server_a = await _fake(aiohttp_server, ["a-only", "shared"])
    b, server_b = await _fake(aiohttp_server, ["b-only", "shared"])
    return a, server_a, b, server_b


@pytest.fixture
def start(aiohttp_client: Any, tmp_path: Path, two: Any) -> Start:
    """The proxy with [[upstreams]] a and b (entry keys overridden per name), its log."""
    a, _, b, _ = two

    async def make(
        a_options: dict[str, Any] | None = None,
        b_options: dict[str, Any] | None = None,
        **models: Any,
    ) -> tuple[TestClient, io.StringIO]:
        common = {"retry_attempts": 1, "retry_backoff": 0.001}
        upstreams = [
            {"name": "a", "url": a.url, **common, **(a_options or {})},
            {"name": "b", "url": b.url, **common, **(b_options or {})},
        ]
        flags: dict[str, Any] = {
            "upstreams": upstreams,
            "storage.path": str(tmp_path / "lmbridge.db"),
        }
        flags.update({f"models.{key}": value for key, value in models.items()})
        config = load_config(os.devnull, flags=flags, environ={})
        stream = io.StringIO()
        log = RequestLog("json", stream)
        return await aiohttp_client(create_app(config, request_log=log)), stream

    return make


def log_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def chat(proxy: TestClient, model: str, **extra: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return await proxy.post(CHAT, json=body)


async def test_models_are_the_union_with_their_upstreams(start):
    """/v1/models lists each model once, with the upstreams that list it."""
    proxy, _ = await start()
    data = (await (await proxy.get("/v1/models")).json())["data"]
    assert {m["id"]: m["upstreams"] for m in data} == {
        "a-only": ["a"],
        "shared": ["a", "b"],
        "b-only": ["b"],
    }


async def test_a_model_goes_to_the_upstream_that_has_it(start, two):
    """A model only b lists is served by b, whose name the response header carries."""
    a, _, b, _ = two
    proxy, log = await start()
    resp = await chat(proxy, "b-only")
    assert resp.status == 200
    assert resp.headers[UPSTREAM] == "b"
    assert len(b.requests_to(CHAT)) == 1
    assert a.requests_to(CHAT) == []
    proxy.server.app[REQUEST_LOG].flush()
    entry = next(e for e in log_lines(log) if e["path"] == CHAT)
    assert entry["upstream"] == "b"


async def test_the_upstream_with_the_model_loaded_is_preferred(start, two):
    """Both list the model; b has it loaded, a not: b serves it."""
    a, _, b, _ = two
    a.lmstudio_v0 = {"data": [{"id": "shared", "type": "llm", "state": "not-loaded"}]}
    b.lmstudio_v0 = {"data": [{"id": "shared", "type": "llm", "state": "loaded"}]}
    proxy, _ = await start()
    resp = await chat(proxy, "shared")
    assert resp.headers[UPSTREAM] == "b"
    assert a.requests_to(CHAT) == []


async def test_a_refused_connection_falls_back_to_the_next_upstream(start, two):
    """a stops after its list was read: the call goes to b, the hop is logged."""
    _, server_a, b, _ = two
    proxy, log = await start()
    assert (await chat(proxy, "shared")).headers[UPSTREAM] == "a"
    await server_a.close()
    resp = await chat(proxy, "shared")
    assert resp.status == 200
    assert resp.headers[UPSTREAM] == "b"
    assert len(b.requests_to(CHAT)) == 1
    proxy.server.app[REQUEST_LOG].flush()
    entries = [e for e in log_lines(log) if e["path"] == CHAT]
    assert entries[0]["upstream"] == "a" and "hops" not in entries[0]
    assert entries[1]["upstream"] == "b"
    assert entries[1]["hops"] == ["a:upstream_unavailable"]


async def test_a_503_falls_back_and_is_counted(start, two):
    """a answers 503: b serves the call; the fallback metric names both and the reason."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "overloaded"}}))
    proxy, _ = await start()
    resp = await chat(proxy, "shared")
    assert resp.status == 200
    assert resp.headers[UPSTREAM] == "b"
    assert len(a.requests_to(CHAT)) == 1 and len(b.requests_to(CHAT)) == 1
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_upstream_fallbacks_total{from="a",reason="status_503",to="b"} 1.0' in metrics


async def test_retries_are_spent_only_where_nothing_else_can_serve(start, two):
    """With retries on (3 attempts, a long backoff): a 503 from a moves the call to b at
    once, without a's retries; a model only a serves is retried there as before."""
    a, _, b, _ = two
    b.add_reply(CHAT, Reply(json=chat_completion("from b")))
    retrying = {"retry_attempts": 3, "retry_backoff": 0.05, "retry_backoff_max": 0.05}
    proxy, _ = await start(a_options=retrying, b_options=retrying)
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "busy"}}))
    resp = await chat(proxy, "shared")
    assert resp.status == 200 and resp.headers[UPSTREAM] == "b"
    assert (await resp.json())["choices"][0]["message"]["content"] == "from b"
    assert len(a.requests_to(CHAT)) == 1
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "busy"}}))
    resp = await chat(proxy, "a-only")
    assert resp.status == 200 and resp.headers[UPSTREAM] == "a"
    assert len(a.requests_to(CHAT)) == 3  # the 503, then its retry


async def test_an_open_breaker_sends_calls_elsewhere_at_once(start, two):
    """a's circuit opens after one failure: the next call goes straight to b, no hop."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "down"}}))
    proxy, log = await start(a_options={"circuit_failure_threshold": 1, "circuit_cooldown": 600})
    assert (await chat(proxy, "shared")).headers[UPSTREAM] == "b"
    resp = await chat(proxy, "shared")
    assert resp.headers[UPSTREAM] == "b"
    assert len(a.requests_to(CHAT)) == 1  # the failed call only
    assert len(b.requests_to(CHAT)) == 2
    proxy.server.app[REQUEST_LOG].flush()
    entries = [e for e in log_lines(log) if e["path"] == CHAT]
    assert entries[0]["hops"] == ["a:status_503"]
    assert "hops" not in entries[1]
    metrics = await (await proxy.get("/metrics")).text()
    assert 'lmbridge_circuit_state{upstream="a"} 2.0' in metrics
    assert 'lmbridge_circuit_state{upstream="b"} 0.0' in metrics


async def test_an_open_breaker_on_the_only_upstream_of_a_model_is_a_hop_too(start, two):
    """The only upstream with the model is a, its circuit open: 503 circuit_open, as
    with one upstream (nothing else could serve it)."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "down"}}))
    proxy, _ = await start(a_options={"circuit_failure_threshold": 1, "circuit_cooldown": 600})
    assert (await chat(proxy, "a-only")).status == 503
    resp = await chat(proxy, "a-only")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "circuit_open"
    assert b.requests_to(CHAT) == []


async def test_a_4xx_does_not_fall_back(start, two):
    """A 400 is the request's own fault: relayed as it is, b never asked."""
    a, _, b, _ = two
    error = {"error": {"message": "bad temperature", "type": "invalid_request_error"}}
    a.add_reply(CHAT, Reply(status=400, json=error))
    proxy, _ = await start()
    resp = await chat(proxy, "shared")
    assert resp.status == 400
    assert b.requests_to(CHAT) == []


async def test_a_stream_falls_back_before_its_first_byte(start, two):
    """A streamed call whose first upstream answers 503 streams from b."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "overloaded"}}))
    proxy, _ = await start()
    resp = await chat(proxy, "shared", stream=True)
    assert resp.status == 200
    assert resp.headers[UPSTREAM] == "b"
    text = await resp.text()
    assert "Hel" in text and text.rstrip().endswith("data: [DONE]")
    assert b.requests_to(CHAT)[0].body["stream"] is True


async def test_a_fallback_model_serves_when_no_upstream_can(start, two):
    """a-only fails on a; models.fallbacks names b-only: b serves it, the body's model
    rewritten, and the header says which model served."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "down"}}))
    proxy, log = await start(fallbacks={"a-only": ["b-only"]})
    resp = await chat(proxy, "a-only")
    assert resp.status == 200
    assert resp.headers[UPSTREAM] == "b; model=b-only"
    assert b.requests_to(CHAT)[0].body["model"] == "b-only"
    proxy.server.app[REQUEST_LOG].flush()
    entry = next(e for e in log_lines(log) if e["path"] == CHAT)
    assert entry["hops"] == ["a:status_503"]


async def test_without_a_fallback_the_last_error_reaches_the_client(start, two):
    """Every upstream of the model fails: the client gets the last failure, in the
    OpenAI error shape."""
    a, _, b, _ = two
    a.add_reply(CHAT, Reply(status=503, json={"error": {"message": "down"}}))
    b.add_reply(CHAT, Reply(status=503, json={"error": {"message": "down too"}}))
    proxy, _ = await start()
    resp = await chat(proxy, "shared")
    assert resp.status == 503
    body = await resp.json()
    assert set(body["error"]) >= {"message", "type", "param", "code"}


async def test_a_responses_chain_continues_on_another_upstream(start, two):
    """Turn 1 is served by a; a stops; turn 2 (previous_response_id) is served by b,
    which receives the whole history, lmbridge's own."""
    a, server_a, b, _ = two
    a.add_reply(CHAT, Reply(json=chat_completion("The capital is Paris.")))
    b.add_reply(CHAT, Reply(json=chat_completion("About two million.")))
    proxy, _ = await start()
    first = await proxy.post(
        "/v1/responses", json={"model": "shared", "input": "Capital of France?"}
    )
    assert first.status == 200
    assert first.headers[UPSTREAM] == "a"
    first_id = (await first.json())["id"]
    await server_a.close()
    second = await proxy.post(
        "/v1/responses",
        json={"model": "shared", "input": "How many live there?", "previous_response_id": first_id},
    )
    assert second.status == 200, await second.text()
    assert second.headers[UPSTREAM] == "b"
    messages = b.requests_to(CHAT)[0].body["messages"]
    contents = [m["content"] for m in messages]
    assert contents[0] == "Capital of France?"
    assert "The capital is Paris." in json.dumps(contents[1])
    assert contents[-1] == "How many live there?"


async def test_a_streamed_response_names_its_upstream(start, two):
    """A streamed /v1/responses opens once the model call was answered: its headers say
    which upstream served it, after a fallback too."""
    _, server_a, b, _ = two
    proxy, _ = await start()
    body = {"model": "shared", "input": "hi", "stream": True}
    first = await proxy.post("/v1/responses", json=body)
    assert first.headers[UPSTREAM] == "a"
    assert "response.completed" in await first.text()
    await server_a.close()
    second = await proxy.post("/v1/responses", json=body)
    assert second.headers[UPSTREAM] == "b"
    assert "response.completed" in await second.text()
    assert len(b.requests_to(CHAT)) == 1


async def test_usage_records_name_the_serving_upstream(start, two):
    """The usage record of a call served by b says upstream b."""
    proxy, _ = await start()
    await chat(proxy, "b-only")
    await chat(proxy, "a-only")
    await proxy.server.app[USAGE].flush()
    resp = await proxy.get("/v1/lmbridge/usage", params={"since": "0", "group_by": "upstream"})
    assert resp.status == 200, await resp.text()
    groups = {g["group"]: g["requests"] for g in (await resp.json())["data"]}
    assert groups == {"a": 1, "b": 1}


async def test_readyz_reports_each_upstream_and_is_ready_with_one(start, two):
    """/readyz: each upstream's circuit and list; ready while one of them can serve,
    not ready when none can."""
    _, server_a, _, server_b = two
    await server_a.close()
    proxy, _ = await start()
    resp = await proxy.get("/readyz")
    body = await resp.json()
    assert resp.status == 200, body
    upstreams = body["checks"]["upstreams"]["upstreams"]
    assert upstreams["a"]["ok"] is False and "error" in upstreams["a"]
    assert upstreams["b"]["ok"] is True and upstreams["b"]["models"] == 2
    assert upstreams["b"]["circuit"]["state"] == "closed"
    await server_b.close()
    proxy.server.app[UPSTREAMS].by_name["b"].catalog._current = None  # its list is stale
    resp = await proxy.get("/readyz")
    assert resp.status == 503
    assert (await resp.json())["failing"] == ["upstreams"]


async def test_admin_loads_on_the_named_upstream_and_lists_each(start, two):
    """load with "upstream" goes to that upstream; ps lists each upstream's models; an
    unknown upstream name is a 400 naming the field."""
    a, _, b, _ = two
    a.native_lmstudio(["shared"], loaded=("shared",))
    b.native_lmstudio(["shared"])
    proxy, _ = await start()
    admin = "/v1/lmbridge/models"
    resp = await proxy.post(admin + "/load", json={"model": "shared", "upstream": "b"})
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["upstream"] == "b"
    assert [body["model"] for body in b.native.loads] == ["shared"]
    assert a.native.loads == []
    listing = await (await proxy.get(admin)).json()
    assert sorted((e["upstream"], e["model"]) for e in listing["data"]) == [
        ("a", "shared"),
        ("b", "shared"),
    ]
    bad = await proxy.post(admin + "/unload", json={"model": "shared", "upstream": "c"})
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "upstream"


async def test_the_least_busy_upstream_gets_the_next_call(start, two):
    """While a works on a call, the next call for the same model goes to b."""
    a, _, b, _ = two
    held = asyncio.Event()
    a.add_reply(CHAT, Reply(hold=held))
    proxy, _ = await start()
    first = asyncio.create_task(chat(proxy, "shared"))
    try:
        for _ in range(1000):  # until a has the first call
            if a.requests_to(CHAT):
                break
            await asyncio.sleep(0.01)
        second = await chat(proxy, "shared")
    finally:
        held.set()
    assert second.headers[UPSTREAM] == "b"
    assert len(b.requests_to(CHAT)) == 1
    assert (await first).headers[UPSTREAM] == "a"
    assert (await chat(proxy, "shared")).headers[UPSTREAM] == "a"  # idle again: order


async def test_preload_loads_each_model_once_where_it_would_be_served(start, two):
    """models.preload with two upstreams: a model both list is loaded once, on the first
    in the routing order (a, configured first); a model only b lists is loaded on b."""
    a, _, b, _ = two
    a.native_lmstudio(["shared"])
    b.native_lmstudio(["shared", "b-only"])
    await start(preload=["shared", "b-only"])
    for _ in range(1000):
        if len(a.native.loads) + len(b.native.loads) == 2:
            break
        await asyncio.sleep(0.005)
    assert [body["model"] for body in a.native.loads] == ["shared"]
    assert [body["model"] for body in b.native.loads] == ["b-only"]
