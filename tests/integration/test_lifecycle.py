"""Model lifecycle through the daemon, against the fake upstream speaking LM Studio 0.4's
native API: one load however many requests wait for it, one failure shared by all,
streams kept alive while a model loads, idle models unloaded (never busy ones), request
ttl and keep_alive, preload, and upstreams without a load endpoint left as they were."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from openai import AsyncOpenAI

from proxy.keys import LIFECYCLE, METRICS
from tests.clock import FakeClock
from tests.fake_upstream import CHAT, Reply
from tests.integration.test_queues import until
from tests.integration.test_responses import R, sse_events

MODEL = "test-model"
LOAD = "/api/v1/models/load"


def ask(content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def loads(proxy: Any, outcome: str) -> float | None:
    return proxy.server.app[METRICS].registry.get_sample_value(
        "lmbridge_model_loads_total", {"model": MODEL, "outcome": outcome}
    )


async def test_twenty_concurrent_requests_cause_exactly_one_load(make_proxy, fake_upstream):
    """20 requests at once for a model not loaded: one load upstream, all answered, and
    none reached the upstream before the model was loaded (no JIT load)."""
    native = fake_upstream.native_lmstudio([MODEL, "other"], load_time=0.3)
    proxy = await make_proxy()
    answers = await asyncio.gather(*(proxy.post(CHAT, json=ask(f"q{i}")) for i in range(20)))
    assert [a.status for a in answers] == [200] * 20
    assert native.loads == [{"model": MODEL}]
    assert native.jit_loads == []
    assert native.instances[MODEL] == [MODEL]
    assert loads(proxy, "ok") == 1
    # Loaded now: the next request costs no load.
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert len(native.loads) == 1


async def test_a_failed_load_fails_every_waiter_with_the_same_error(make_proxy, fake_upstream):
    """The upstream refuses the load: every waiting request gets the same 502
    model_load_failed with the upstream's status and reason; the next request tries
    again."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.2)
    native.fail = (500, {"error": "Failed to load model: not enough memory"})
    proxy = await make_proxy()
    answers = await asyncio.gather(*(proxy.post(CHAT, json=ask()) for _ in range(10)))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [502] * 10
    assert len(native.loads) == 1
    error = bodies[0]["error"]
    assert error["code"] == "model_load_failed"
    assert "HTTP 500" in error["message"] and "not enough memory" in error["message"]
    assert all(b == bodies[0] for b in bodies)
    assert fake_upstream.requests_to(CHAT) == []
    assert loads(proxy, "failed") == 1
    native.fail = None
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert len(native.loads) == 2


async def test_a_loaded_model_is_not_loaded_again(make_proxy, fake_upstream):
    """A model LM Studio lists as loaded goes straight upstream."""
    native = fake_upstream.native_lmstudio([MODEL], loaded=(MODEL,))
    proxy = await make_proxy()
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert native.loads == []


async def test_without_a_load_endpoint_requests_pass_as_before(make_proxy, fake_upstream):
    """A plain OpenAI server (no native API): nothing is loaded, the request passes."""
    proxy = await make_proxy()
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert fake_upstream.requests_to(LOAD) == []


async def test_context_length_of_the_model_table_is_sent_with_the_load(make_proxy, fake_upstream):
    """[models."PATTERN"] context_length goes with the load request."""
    native = fake_upstream.native_lmstudio([MODEL])
    proxy = await make_proxy(**{"models__test-*": {"context_length": 8192}})
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert native.loads == [{"model": MODEL, "context_length": 8192}]


async def test_a_stream_gets_keepalive_comments_while_its_model_loads(make_proxy, fake_upstream):
    """Headers and ': loading MODEL' comments reach a streamed chat client during the load,
    then the upstream's events; the request log has load_wait_ms."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.6)
    proxy = await make_proxy(models__load_keepalive=0.05)
    resp = await proxy.post(CHAT, json=ask(stream=True))
    assert resp.status == 200
    raw = (await resp.read()).decode()
    before_data = raw.split("data: ", 1)[0]
    assert before_data.count(f": loading {MODEL}\n\n") >= 2
    assert raw.rstrip().endswith("data: [DONE]")
    assert len(native.loads) == 1


async def test_a_streamed_load_failure_is_an_error_event(make_proxy, fake_upstream):
    """A load that fails after the keep-alives began ends the stream with the error."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.2)
    native.fail = (404, {"error": "no such model file"})
    proxy = await make_proxy(models__load_keepalive=0.05)
    resp = await proxy.post(CHAT, json=ask(stream=True))
    raw = (await resp.read()).decode()
    assert resp.status == 200  # the headers went out with the first keep-alive
    event = json.loads(raw.split("data: ", 1)[1].split("\n\n")[0])
    assert event["error"]["code"] == "model_load_failed"
    assert "no such model file" in event["error"]["message"]
    assert "interrupted" not in event["error"]["message"]


async def test_the_openai_sdk_stream_survives_a_load_longer_than_its_timeout(
    make_proxy, fake_upstream
):
    """An SDK client whose read timeout (1 s) is shorter than the load (5 s) still gets
    its answer: the keep-alives reset its timer."""
    fake_upstream.native_lmstudio([MODEL], load_time=5.0)
    proxy = await make_proxy(models__load_keepalive=0.2)
    async with AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0, timeout=1.0
    ) as client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello!"


async def test_a_streamed_response_gets_keepalives_after_in_progress(make_proxy, fake_upstream):
    """On the Responses API, response.created and in_progress go out first, then
    response.in_progress again while the model loads (an event every client counts),
    then the output, numbered in one sequence."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.5)
    proxy = await make_proxy(models__load_keepalive=0.05)
    resp = await proxy.post(R, json={"model": MODEL, "input": "hi", "stream": True})
    events = sse_events(await resp.read())
    types = [e["type"] for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    output = types.index("response.output_item.added")
    assert types[2:output].count("response.in_progress") >= 2
    assert set(types[2:output]) == {"response.in_progress"}
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert types[-1] == "response.completed"
    assert len(native.loads) == 1


async def test_a_websocket_turn_gets_keepalives_while_its_model_loads(make_proxy, fake_upstream):
    """Over WebSocket too: response.in_progress messages while the model loads."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.5)
    proxy = await make_proxy(models__load_keepalive=0.05)
    async with proxy.ws_connect(R) as ws:
        await ws.send_str(json.dumps({"type": "response.create", "model": MODEL, "input": "hi"}))
        types: list[str] = []
        while not types or types[-1] not in ("response.completed", "error"):
            types.append(json.loads((await ws.receive()).data)["type"])
    first_delta = types.index("response.output_text.delta")
    assert types[2:first_delta].count("response.in_progress") >= 2
    assert types[-1] == "response.completed"
    assert len(native.loads) == 1


async def test_responses_and_chat_share_one_load(make_proxy, fake_upstream):
    """A Responses turn and chat requests arriving together: one load."""
    native = fake_upstream.native_lmstudio([MODEL], load_time=0.3)
    proxy = await make_proxy()
    calls = [proxy.post(CHAT, json=ask()) for _ in range(3)]
    calls.append(proxy.post(R, json={"model": MODEL, "input": "hi"}))
    answers = await asyncio.gather(*calls)
    assert [a.status for a in answers] == [200] * 4
    assert len(native.loads) == 1


# --- idle unloading ------------------------------------------------------------


async def started(make_proxy: Any, **overrides: Any) -> tuple[Any, FakeClock]:
    proxy = await make_proxy(**overrides)
    clock = FakeClock()
    proxy.server.app[LIFECYCLE].clock = clock
    return proxy, clock


async def test_ttl_unloads_an_idle_model_lmbridge_loaded(make_proxy, fake_upstream):
    """models.ttl: idle that long, the model lmbridge loaded is unloaded, once."""
    native = fake_upstream.native_lmstudio([MODEL])
    proxy, clock = await started(make_proxy, models__ttl=60)
    lifecycle = proxy.server.app[LIFECYCLE]
    assert (await proxy.post(CHAT, json=ask())).status == 200
    clock.advance(59)
    assert await lifecycle.reap() == []
    clock.advance(1)
    assert await lifecycle.reap() == [MODEL]
    assert native.unloads == [MODEL]
    assert not native.is_loaded(MODEL)
    assert await lifecycle.reap() == []
    # Asked for again: loaded again.
    assert (await proxy.post(CHAT, json=ask())).status == 200
    assert len(native.loads) == 2


async def test_ttl_never_unloads_a_busy_model(make_proxy, fake_upstream):
    """A request running on the model (or waiting for it) keeps it loaded past its ttl;
    the idle time counts from the end of the last request."""
    native = fake_upstream.native_lmstudio([MODEL])
    proxy, clock = await started(make_proxy, models__ttl=60, models__max_concurrent=1)
    lifecycle = proxy.server.app[LIFECYCLE]
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(hold=release))
    running = asyncio.create_task(proxy.post(CHAT, json=ask("long")))
    queued = asyncio.create_task(proxy.post(CHAT, json=ask("next")))
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 1, "one running")
    clock.advance(3600)
    assert await lifecycle.reap() == []
    release.set()
    assert (await running).status == 200 and (await queued).status == 200
    assert await lifecycle.reap() == []  # just used
    clock.advance(60)
    assert await lifecycle.reap() == [MODEL]
    assert native.unloads == [MODEL]


async def test_a_model_loaded_by_someone_else_is_never_reaped(make_proxy, fake_upstream):
    """The reaper unloads only what lmbridge loaded."""
    native = fake_upstream.native_lmstudio([MODEL], loaded=(MODEL,))
    proxy, clock = await started(make_proxy, models__ttl=1)
    assert (await proxy.post(CHAT, json=ask())).status == 200
    clock.advance(3600)
    assert await proxy.server.app[LIFECYCLE].reap() == []
    assert native.unloads == []


async def test_request_keep_alive_sets_the_ttl_and_stays_home(make_proxy, fake_upstream):
    """Ollama's keep_alive ("5m") sets the model's ttl and is not sent upstream; LM
    Studio's ttl sets it too and goes on; a bad value is a 400."""
    native = fake_upstream.native_lmstudio([MODEL])
    proxy, clock = await started(make_proxy)
    lifecycle = proxy.server.app[LIFECYCLE]
    assert (await proxy.post(CHAT, json=ask(keep_alive="5m"))).status == 200
    assert "keep_alive" not in fake_upstream.requests_to(CHAT)[-1].body
    assert lifecycle.ttl_of(MODEL) == 300
    clock.advance(299)
    assert await lifecycle.reap() == []
    clock.advance(1)
    assert await lifecycle.reap() == [MODEL]
    assert (await proxy.post(CHAT, json=ask(ttl=30))).status == 200
    assert fake_upstream.requests_to(CHAT)[-1].body["ttl"] == 30
    assert lifecycle.ttl_of(MODEL) == 30
    bad = await proxy.post(CHAT, json=ask(keep_alive="soon"))
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "keep_alive"
    bad = await proxy.post(CHAT, json=ask(ttl=-1))
    assert bad.status == 400
    assert len(native.loads) == 2


async def test_a_responses_request_sets_the_ttl_too(make_proxy, fake_upstream):
    """/v1/responses honours ttl and keep_alive the same way; a bad value is a 400 before
    any upstream call."""
    fake_upstream.native_lmstudio([MODEL])
    proxy, _ = await started(make_proxy)
    lifecycle = proxy.server.app[LIFECYCLE]
    resp = await proxy.post(R, json={"model": MODEL, "input": "hi", "keep_alive": "2m"})
    assert resp.status == 200
    assert lifecycle.ttl_of(MODEL) == 120
    resp = await proxy.post(R, json={"model": MODEL, "input": "hi", "ttl": 45})
    assert resp.status == 200 and lifecycle.ttl_of(MODEL) == 45
    calls = len(fake_upstream.requests_to(CHAT))
    bad = await proxy.post(R, json={"model": MODEL, "input": "hi", "keep_alive": "soon"})
    assert bad.status == 400
    assert (await bad.json())["error"]["param"] == "keep_alive"
    assert len(fake_upstream.requests_to(CHAT)) == calls


async def test_preload_loads_at_start(make_proxy, fake_upstream):
    """models.preload: loaded in the background once the daemon starts; a model that
    cannot be loaded is logged and start-up goes on."""
    native = fake_upstream.native_lmstudio([MODEL, "other"])
    proxy = await make_proxy(models__preload=["missing", MODEL])
    await until(lambda: native.loads == [{"model": MODEL}], "the preload")
    assert (await proxy.get("/healthz")).status == 200


# --- admin routes ------------------------------------------------------------

ADMIN = "/v1/lmbridge/models"


async def test_admin_load_ps_and_unload(make_proxy, fake_upstream):
    """load (with a ttl), ps showing who loaded what and the requests on it, unload; the
    metrics of each."""
    native = fake_upstream.native_lmstudio([MODEL, "other"], loaded=("other",))
    proxy = await make_proxy()
    loaded = await proxy.post(ADMIN + "/load", json={"model": MODEL, "ttl": "30m"})
    assert loaded.status == 200
    entry = await loaded.json()
    assert entry["state"] == "loaded" and entry["loaded_by"] == "lmbridge"
    assert entry["ttl"] == 1800 and entry["instances"] == [MODEL]
    assert native.loads == [{"model": MODEL}]
    # Loading a loaded model again does nothing.
    assert (await proxy.post(ADMIN + "/load", json={"model": MODEL})).status == 200
    assert len(native.loads) == 1
    listing = await (await proxy.get(ADMIN)).json()
    assert listing["loads_models"] is True
    by_model = {e["model"]: e for e in listing["data"]}
    assert by_model[MODEL]["loaded_by"] == "lmbridge"
    assert by_model["other"]["loaded_by"] == "upstream"
    assert by_model[MODEL]["running"] == 0 and by_model[MODEL]["queued"] == 0
    registry = proxy.server.app[METRICS].registry
    assert registry.get_sample_value("lmbridge_models_loaded", {"loaded_by": "lmbridge"}) == 1
    unloaded = await proxy.post(ADMIN + "/unload", json={"model": "other"})
    assert unloaded.status == 200
    assert (await unloaded.json())["state"] == "not-loaded"
    assert native.unloads == ["other"]
    again = await proxy.post(ADMIN + "/unload", json={"model": "other"})
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "model_not_loaded"
    assert [e["model"] for e in (await (await proxy.get(ADMIN)).json())["data"]] == [MODEL]


async def test_admin_bad_requests(make_proxy, fake_upstream):
    """Unknown model 404, a body without a model, a bad ttl or an unknown field 400,
    a wrong method 405: every one in the OpenAI error shape."""
    fake_upstream.native_lmstudio([MODEL])
    proxy = await make_proxy()
    cases = [
        ({"model": "nope"}, 404, "model_not_found"),
        ({}, 400, "invalid_request"),
        ({"model": 3}, 400, "invalid_request"),
        ({"model": MODEL, "ttl": -5}, 400, "invalid_request"),
        ({"model": MODEL, "ttl": "later"}, 400, "invalid_request"),
        ({"model": MODEL, "force": True}, 400, "invalid_request"),
    ]
    for body, status, code in cases:
        resp = await proxy.post(ADMIN + "/load", json=body)
        assert resp.status == status, body
        error = (await resp.json())["error"]
        assert error["code"] == code and error["message"], body
    empty = await proxy.post(
        ADMIN + "/unload", data=b"", headers={"Content-Type": "application/json"}
    )
    assert empty.status == 400
    assert (await proxy.get(ADMIN + "/load")).status == 405


async def test_admin_needs_a_key_and_refuses_browsers(make_proxy, fake_upstream):
    """With client keys the admin routes need one; a page of another origin, a form's
    content type and a rebound Host are refused before anything loads."""
    native = fake_upstream.native_lmstudio([MODEL])
    proxy = await make_proxy(auth__api_keys=["sekrit"])
    body = {"model": MODEL}
    assert (await proxy.get(ADMIN)).status == 401
    assert (await proxy.post(ADMIN + "/load", json=body)).status == 401
    key = {"Authorization": "Bearer sekrit"}
    refused = [
        ({**key, "Origin": "https://attacker.example"}, json.dumps(body), 403),
        ({**key, "Content-Type": "text/plain"}, json.dumps(body), 415),
        (
            {**key, "Content-Type": "application/x-www-form-urlencoded"},
            "model=test-model",
            415,
        ),
        ({**key, "Host": "attacker.example"}, json.dumps(body), 403),
    ]
    for headers, data, status in refused:
        resp = await proxy.post(ADMIN + "/load", data=data, headers=headers)
        assert resp.status == status, headers
    assert native.loads == []
    assert (await proxy.post(ADMIN + "/load", json=body, headers=key)).status == 200
    assert len(native.loads) == 1


async def test_admin_on_an_upstream_without_loads(make_proxy, fake_upstream):
    """A plain OpenAI server: ps lists nothing, load and unload say why they cannot."""
    proxy = await make_proxy()
    listing = await (await proxy.get(ADMIN)).json()
    assert listing == {"object": "list", "data": [], "loads_models": False}
    resp = await proxy.post(ADMIN + "/load", json={"model": MODEL})
    assert resp.status == 400
    assert (await resp.json())["error"]["code"] == "load_not_supported"
