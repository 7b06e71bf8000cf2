"""Large requests: the item limits of /v1/responses, and large bodies kept off the event
loop so that other requests are served meanwhile."""

from __future__ import annotations

from tests.fake_upstream import CHAT

R = "/v1/responses"
MESSAGE = {"role": "user", "content": "hi"}


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
