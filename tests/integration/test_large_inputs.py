"""Large requests: the item limits of /v1/responses, and large bodies kept off the event
loop so that other requests are served meanwhile."""

from __future__ import annotations

import asyncio
import io
import json
import threading
from collections.abc import Awaitable, Callable
from typing import Any

from proxy import passthrough
from proxy.passthrough import LARGE_BODY
from proxy.responses import service, state
from tests.fake_upstream import CHAT

R = "/v1/responses"
MESSAGE = {"role": "user", "content": "hi"}
JSON = {"Content-Type": "application/json"}
GUARD = 10.0  # seconds before a test that waits for the daemon gives up


async def test_more_input_items_than_the_limit_get_400_naming_the_setting(
    make_proxy, fake_upstream
):
    """/v1/responses with more input items than responses.max_input_items is a 400 on
    'input' naming the setting, and nothing goes upstream; at the limit it is answered."""
    proxy = await make_proxy(responses__max_input_items=3)
    resp = await proxy.post(R, json={"model": "test-model", "input": [MESSAGE] * 4})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["code"]) == ("input", "too_many_items")
    assert "responses.max_input_items" in error["message"]
    assert fake_upstream.requests_to(CHAT) == []
    resp = await proxy.post(R, json={"model": "test-model", "input": [MESSAGE] * 3})
    assert resp.status == 200


async def test_the_input_limit_holds_for_counting_and_compacting_too(make_proxy):
    """input_tokens and compact read 'input' the same way and refuse it the same way."""
    proxy = await make_proxy(responses__max_input_items=3)
    for path in (R + "/input_tokens", R + "/compact"):
        resp = await proxy.post(path, json={"model": "test-model", "input": [MESSAGE] * 4})
        assert resp.status == 400, path
        assert (await resp.json())["error"]["code"] == "too_many_items"


async def test_a_conversation_longer_than_the_history_limit_gets_400_naming_the_setting(
    make_proxy, fake_upstream
):
    """A turn of a conversation holding more items than responses.max_history_items is a
    400 on 'conversation' naming the setting; nothing goes upstream."""
    proxy = await make_proxy(responses__max_history_items=3)
    items = [{"type": "message", "role": "user", "content": f"m{i}"} for i in range(4)]
    conversation = await (await proxy.post("/v1/conversations", json={"items": items})).json()
    resp = await proxy.post(
        R, json={"model": "test-model", "conversation": conversation["id"], "input": "next"}
    )
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["code"]) == ("conversation", "too_many_items")
    assert "responses.max_history_items" in error["message"]
    assert fake_upstream.requests_to(CHAT) == []


# --- kept off the event loop -------------------------------------------------------


def large_chat_body(model: str = "test-model") -> bytes:
    """A chat body over LARGE_BODY, of many small messages."""
    messages = [MESSAGE] * (LARGE_BODY // 25 + 1)
    return json.dumps({"model": model, "messages": messages}).encode()


def blocked_until(released: threading.Event, work: Callable[..., Any]) -> Callable[..., Any]:
    """``work`` made to wait for ``released`` first: if it ran on the event loop, nothing
    else could be served until then."""

    def wait_then_work(*args: Any, **kwargs: Any) -> Any:
        if not released.wait(GUARD):
            raise TimeoutError("never released")
        return work(*args, **kwargs)

    return wait_then_work


async def served_while(proxy, released: threading.Event, request: Awaitable[Any]) -> Any:
    """Start ``request``; answer /healthz while its blocked work waits; then let it go
    on and return its response."""
    task = asyncio.ensure_future(request)
    try:
        health = await asyncio.wait_for(proxy.get("/healthz"), GUARD)
        assert health.status == 200
    finally:
        released.set()
    return await asyncio.wait_for(task, GUARD)


async def test_a_large_chat_body_is_read_off_the_event_loop(proxy, fake_upstream, monkeypatch):
    """While a chat body of megabytes is being parsed, /healthz is answered; then the
    request is forwarded as usual."""
    released = threading.Event()
    monkeypatch.setattr(
        passthrough,
        "loads_request_in_pieces",
        blocked_until(released, passthrough.loads_request_in_pieces),
    )
    body = large_chat_body()
    resp = await served_while(
        proxy, released, proxy.post(CHAT, data=io.BytesIO(body), headers=JSON)
    )
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].body == json.loads(body)


async def test_a_large_chat_body_written_again_is_the_same_json(make_proxy, fake_upstream):
    """A large body whose model is an alias goes upstream with the model rewritten and
    everything else as sent."""
    proxy = await make_proxy(models__aliases={"alias": "test-model"})
    body = large_chat_body(model="alias")
    resp = await proxy.post(CHAT, data=io.BytesIO(body), headers=JSON)
    assert resp.status == 200
    assert fake_upstream.requests_to(CHAT)[0].body == {**json.loads(body), "model": "test-model"}


async def test_a_large_input_is_read_and_rendered_off_the_event_loop(
    proxy, fake_upstream, monkeypatch
):
    """While the thousands of items of a /v1/responses input are read, /healthz is
    answered; then the response is made from all of them."""
    released = threading.Event()
    monkeypatch.setattr(service, "parse_create", blocked_until(released, service.parse_create))
    count = service.LARGE_INPUT + 1
    request = proxy.post(R, json={"model": "test-model", "input": [MESSAGE] * count})
    resp = await served_while(proxy, released, request)
    assert resp.status == 200
    assert len(fake_upstream.requests_to(CHAT)[0].body["messages"]) == count


async def test_a_long_conversation_is_rendered_off_the_event_loop(
    proxy, fake_upstream, monkeypatch
):
    """While a conversation of thousands of items is rendered as history, /healthz is
    answered; then the turn carries all of it."""
    items = [{"type": "message", "role": "user", "content": "m"}] * 20
    conversation = await (await proxy.post("/v1/conversations", json={"items": items})).json()
    path = f"/v1/conversations/{conversation['id']}/items"
    for _ in range(service.LARGE_INPUT // 20):
        assert (await proxy.post(path, json={"items": items})).status == 200
    released = threading.Event()
    monkeypatch.setattr(state, "_render_stored", blocked_until(released, state._render_stored))
    request = proxy.post(
        R, json={"model": "test-model", "conversation": conversation["id"], "input": "next"}
    )
    resp = await served_while(proxy, released, request)
    assert resp.status == 200
    assert len(fake_upstream.requests_to(CHAT)[0].body["messages"]) == service.LARGE_INPUT + 21


async def test_a_large_body_over_the_input_limit_is_refused_before_it_is_all_read(
    make_proxy, fake_upstream
):
    """A body of megabytes whose 'input' is over the limit is refused as too many items
    as soon as the limit is passed: what follows (here, broken JSON) is never read."""
    proxy = await make_proxy(responses__max_input_items=10)
    items = json.dumps([MESSAGE] * (LARGE_BODY // 25 + 1)).encode()
    body = b'{"model": "test-model", "input": ' + items + b', "broken": [}'
    resp = await proxy.post(R, data=io.BytesIO(body), headers=JSON)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert (error["param"], error["code"]) == ("input", "too_many_items")
    assert "responses.max_input_items" in error["message"]
