"""First checks that the pass-through answers."""

from tests.fake_upstream import CHAT


async def test_chat_completion_passes_through(proxy, fake_upstream):
    """A chat completion reaches the upstream unchanged and its answer comes back."""
    resp = await proxy.post(
        CHAT,
        json={
            "model": "test-model",
            "messages": [{"role": "user", "content": "hi"}],
            "extra_field": 1,
        },
    )
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == "Hello!"
    assert fake_upstream.requests_to(CHAT)[0].body["extra_field"] == 1
