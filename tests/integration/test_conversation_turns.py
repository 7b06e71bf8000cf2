"""Turns in one conversation run one at a time: a turn that arrives while another runs
gets 409 conversation_locked; turns continuing one previous_response_id branch."""

from __future__ import annotations

import asyncio
import sqlite3
import time

from proxy.keys import RESPONSES, STORE
from tests.clock import FakeClock
from tests.fake_upstream import CHAT, Reply, chat_completion, chunk
from tests.integration.test_background import until
from tests.integration.test_responses import R, create, sent


async def conversation(proxy) -> str:
    return str((await (await proxy.post("/v1/conversations", json={})).json())["id"])


async def items_of(proxy, conv: str) -> list[str]:
    page = await (await proxy.get(f"/v1/conversations/{conv}/items?order=asc&limit=100")).json()
    return [part["text"] for item in page["data"] for part in item["content"]]


async def test_a_turn_while_another_runs_is_409_then_sees_it(proxy, fake_upstream):
    """A second turn in a conversation whose turn is still running gets 409
    conversation_locked with Retry-After; once the first has finished, the next turn
    runs and sees it."""
    conv = await conversation(proxy)
    release = asyncio.Event()
    fake_upstream.add_reply(
        CHAT, Reply(stream=[chunk("first answer"), release, chunk(finish="stop")])
    )
    first = asyncio.ensure_future(
        proxy.post(
            R, json={"model": "test-model", "input": "one", "conversation": conv, "stream": True}
        )
    )
    await until(lambda: fake_upstream.requests_to(CHAT), "the first turn runs")
    second = await proxy.post(R, json={"model": "test-model", "input": "two", "conversation": conv})
    assert second.status == 409
    assert second.headers["Retry-After"] == "1"
    error = (await second.json())["error"]
    assert error["code"] == "conversation_locked"
    assert error["param"] == "conversation"
    assert conv in error["message"]

    release.set()
    assert (await first).status == 200
    await (await first).read()
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("second answer")))
    await create(proxy, input="two", conversation=conv)
    assert [m["content"] for m in sent(fake_upstream)["messages"]] == ["one", "first answer", "two"]
    assert await items_of(proxy, conv) == ["one", "first answer", "two", "second answer"]


async def test_concurrent_turns_never_see_a_partial_history(proxy, fake_upstream):
    """20 turns sent at once to one conversation: each either runs, seeing every turn
    that ran before it, or gets 409; the conversation holds the turns that ran, in pairs."""
    conv = await conversation(proxy)
    answers = iter(range(100))
    for _ in range(20):
        fake_upstream.add_reply(CHAT, Reply(json=chat_completion(f"a{next(answers)}")))
    results = await asyncio.gather(
        *(
            proxy.post(R, json={"model": "test-model", "input": f"q{n}", "conversation": conv})
            for n in range(20)
        )
    )
    statuses = sorted(r.status for r in results)
    assert set(statuses) <= {200, 409}
    assert 200 in statuses
    for resp in results:
        if resp.status == 409:
            assert (await resp.json())["error"]["code"] == "conversation_locked"
    history = await items_of(proxy, conv)
    assert len(history) == 2 * statuses.count(200)
    turns = [r.body["messages"] for r in fake_upstream.requests_to(CHAT)]
    for n, messages in enumerate(turns):
        assert [m["content"] for m in messages] == history[: 2 * n + 1]


async def test_a_turn_that_fails_frees_the_conversation(proxy, fake_upstream):
    """A turn refused (unknown item_reference) or failed upstream frees its conversation."""
    conv = await conversation(proxy)
    bad = {"type": "item_reference", "id": "msg_unknown"}
    resp = await proxy.post(R, json={"model": "test-model", "input": [bad], "conversation": conv})
    assert resp.status == 404
    fake_upstream.add_reply(CHAT, Reply(status=400, json={"error": {"message": "no"}}))
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "conversation": conv})
    assert resp.status == 400
    await create(proxy, input="y", conversation=conv)


async def test_a_background_turn_holds_its_conversation_until_it_is_stored(proxy, fake_upstream):
    """A background turn holds the conversation from its acknowledgement as queued until
    its final state is stored."""
    conv = await conversation(proxy)
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("done"), release, chunk(finish="stop")]))
    started = await create(proxy, input="bg", conversation=conv, background=True)
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "conversation": conv})
    assert resp.status == 409
    release.set()
    await until(lambda: started["id"] not in proxy.server.app[RESPONSES].running, "it ended")
    await create(proxy, input="after", conversation=conv)
    assert (await items_of(proxy, conv))[:2] == ["bg", "done"]


async def test_a_turn_longer_than_the_claim_keeps_renewing_it(proxy, fake_upstream):
    """A turn that runs longer than the claim's lease renews it, so a later turn still
    gets 409 rather than running on a history without it."""
    conv = await conversation(proxy)
    service = proxy.server.app[RESPONSES]
    clock = FakeClock(int(time.time()))
    service.clock = clock
    service.claims.renewal = 0.01
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(stream=[chunk("slow"), release, chunk(finish="stop")]))
    first = asyncio.ensure_future(
        proxy.post(
            R, json={"model": "test-model", "input": "one", "conversation": conv, "stream": True}
        )
    )
    await until(lambda: fake_upstream.requests_to(CHAT), "the first turn runs")
    path = proxy.server.app[STORE].path

    def lease_end() -> int:
        with sqlite3.connect(path) as db:
            [(until_,)] = db.execute("SELECT busy_until FROM conversations WHERE id = ?", (conv,))
            return int(until_)

    clock.now += 3600  # far past the first claim's end
    await until(lambda: lease_end() > clock.now, "the claim was renewed")
    resp = await proxy.post(R, json={"model": "test-model", "input": "x", "conversation": conv})
    assert resp.status == 409
    release.set()
    await (await first).read()


async def test_turns_continuing_one_response_branch_from_it(proxy, fake_upstream):
    """Two turns sent at once with the same previous_response_id both run, each on the
    chain up to that response: two branches, neither seeing the other."""
    root = await create(proxy, input="root")
    results = await asyncio.gather(
        *(
            proxy.post(
                R, json={"model": "test-model", "input": branch, "previous_response_id": root["id"]}
            )
            for branch in ("left", "right")
        )
    )
    assert [r.status for r in results] == [200, 200]
    left, right = [await r.json() for r in results]
    for request in fake_upstream.requests_to(CHAT)[1:]:
        contents = [m["content"] for m in request.body["messages"]]
        assert contents[:2] == ["root", "Hello!"]
        assert contents[2:] in (["left"], ["right"])
    fake_upstream.add_reply(CHAT, Reply(json=chat_completion("on the left")))
    await create(proxy, input="more", previous_response_id=left["id"])
    assert [m["content"] for m in sent(fake_upstream)["messages"]] == [
        "root",
        "Hello!",
        "left",
        "Hello!",
        "more",
    ]
    assert right["previous_response_id"] == root["id"]


async def test_a_release_that_fails_is_tried_again(proxy, fake_upstream, monkeypatch):
    """When storing the end of a turn's claim fails (the writer died at that moment),
    the conversation is freed as soon as storage works again, not after the lease."""
    from storage.errors import StorageError

    conv = await conversation(proxy)
    store = proxy.server.app[STORE]
    real = store.release_conversation
    failures = [StorageError("the writer process is gone")]

    async def release_once_failing(*args):
        if failures:
            raise failures.pop()
        return await real(*args)

    monkeypatch.setattr(store, "release_conversation", release_once_failing)
    proxy.server.app[RESPONSES].claims.renewal = 0.05
    await create(proxy, input="one", conversation=conv)
    assert not failures

    async def free() -> bool:
        resp = await proxy.post(R, json={"model": "test-model", "input": "x", "conversation": conv})
        return resp.status == 200

    for _ in range(100):
        if await free():
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError("the conversation stayed locked")
