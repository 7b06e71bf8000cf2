"""Model lifecycle through the daemon on llama.cpp's router mode and on Ollama, against
the fake upstream speaking each one's model routes (``tests/fake_engines.py``): the same
guarantees as on LM Studio (tests/integration/test_lifecycle.py). One load however many
requests wait, one failure shared by all, streams kept alive while a model loads, idle
models unloaded (never busy ones, never someone else's), the admin routes; and a
llama.cpp server of one model left as it was."""

from __future__ import annotations

import asyncio
import json
import os
import time
from dataclasses import dataclass
from typing import Any

import pytest
from openai import AsyncOpenAI

from proxy.app import create_app
from proxy.config import load_config
from proxy.keys import LIFECYCLE, METRICS
from tests.clock import FakeClock
from tests.fake_upstream import CHAT, FakeUpstream, Reply
from tests.integration.test_queues import until

ADMIN = "/v1/lmbridge/models"


@dataclass
class Engine:
    """One kind of server of the fake upstream, set up for a test."""

    model: str
    kind: str  # upstream.kind lmbridge is configured with
    fake: Any  # LlamaRouter or OllamaModels

    def load_calls(self) -> list[dict[str, Any]]:
        return self.fake.loads


ROUTER_MODELS = ["ggml-org/test-model-GGUF:Q4_K_M", "other"]
OLLAMA_MODELS = ["test-model:latest", "other:latest"]


def router(fake_upstream: FakeUpstream, **options: Any) -> Engine:
    fake = fake_upstream.llama_router(ROUTER_MODELS, **options)
    return Engine(ROUTER_MODELS[0], "llamacpp", fake)


def ollama(fake_upstream: FakeUpstream, **options: Any) -> Engine:
    fake = fake_upstream.ollama(OLLAMA_MODELS, **options)
    return Engine(OLLAMA_MODELS[0], "ollama", fake)


# The model the tests ask for, and another, of each server.
NAMES = {router: ROUTER_MODELS, ollama: OLLAMA_MODELS}


ENGINES = pytest.mark.parametrize("setup", [router, ollama], ids=["llama.cpp-router", "ollama"])


def ask(model: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def loads(proxy: Any, model: str, outcome: str) -> float | None:
    return proxy.server.app[METRICS].registry.get_sample_value(
        "lmbridge_model_loads_total", {"model": model, "outcome": outcome}
    )


async def start(make_proxy: Any, engine: Engine, **overrides: Any) -> Any:
    return await make_proxy(upstream__kind=engine.kind, **overrides)


@ENGINES
async def test_twenty_concurrent_requests_cause_exactly_one_load(make_proxy, fake_upstream, setup):
    """20 requests at once for a model not loaded: one load upstream, all answered, none
    before the model was loaded (the server never loaded it itself)."""
    engine = setup(fake_upstream, load_time=0.3)
    proxy = await start(make_proxy, engine)
    answers = await asyncio.gather(
        *(proxy.post(CHAT, json=ask(engine.model, f"q{i}")) for i in range(20))
    )
    assert [a.status for a in answers] == [200] * 20
    assert engine.load_calls() == [{"model": engine.model}]
    assert engine.fake.jit_loads == []
    assert engine.fake.is_loaded(engine.model)
    assert loads(proxy, engine.model, "ok") == 1
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    assert len(engine.load_calls()) == 1


async def test_a_crashed_router_child_fails_every_waiter_with_the_same_error(
    make_proxy, fake_upstream
):
    """llama.cpp's router takes the load, then its child dies: every waiting request gets
    the same 502 model_load_failed with the exit code; the next request tries again."""
    engine = router(fake_upstream, load_time=0.2)
    engine.fake.crash = 3
    proxy = await start(make_proxy, engine)
    answers = await asyncio.gather(*(proxy.post(CHAT, json=ask(engine.model)) for _ in range(10)))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [502] * 10
    assert len(engine.load_calls()) == 1
    error = bodies[0]["error"]
    assert error["code"] == "model_load_failed"
    assert error["message"] == (
        f"The upstream could not load the model {engine.model}: the model's process exited "
        "with code 3 before it was ready"
    )
    assert all(b == bodies[0] for b in bodies)
    assert fake_upstream.requests_to(CHAT) == []
    assert loads(proxy, engine.model, "failed") == 1
    engine.fake.crash = None
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    assert len(engine.load_calls()) == 2


@ENGINES
async def test_a_refused_load_fails_every_waiter_with_the_same_error(
    make_proxy, fake_upstream, setup
):
    """The server answers the load with an error: every waiter gets the same 502
    model_load_failed with the server's status and reason."""
    engine = setup(fake_upstream, load_time=0.2)
    engine.fake.fail = (500, {"error": "not enough memory for the model"})
    proxy = await start(make_proxy, engine)
    answers = await asyncio.gather(*(proxy.post(CHAT, json=ask(engine.model)) for _ in range(5)))
    bodies = [await a.json() for a in answers]
    assert [a.status for a in answers] == [502] * 5
    assert all(b == bodies[0] for b in bodies)
    message = bodies[0]["error"]["message"]
    assert bodies[0]["error"]["code"] == "model_load_failed"
    assert "HTTP 500" in message and "not enough memory" in message
    assert fake_upstream.requests_to(CHAT) == []


@ENGINES
async def test_a_stream_gets_keepalive_comments_while_its_model_loads(
    make_proxy, fake_upstream, setup
):
    """Headers and ': loading MODEL' comments reach a streamed client during the load,
    then the upstream's events."""
    engine = setup(fake_upstream, load_time=0.6)
    proxy = await start(make_proxy, engine, models__load_keepalive=0.05)
    resp = await proxy.post(CHAT, json=ask(engine.model, stream=True))
    assert resp.status == 200
    raw = (await resp.read()).decode()
    assert raw.split("data: ", 1)[0].count(f": loading {engine.model}\n\n") >= 2
    assert raw.rstrip().endswith("data: [DONE]")
    assert len(engine.load_calls()) == 1


@ENGINES
async def test_the_openai_sdk_stream_survives_a_load_of_seconds(make_proxy, fake_upstream, setup):
    """An SDK client whose read timeout is shorter than a 2 s load gets its answer."""
    engine = setup(fake_upstream, load_time=2.0)
    proxy = await start(make_proxy, engine, models__load_keepalive=0.05)
    async with AsyncOpenAI(
        base_url=str(proxy.make_url("/v1")), api_key="unused", max_retries=0, timeout=1.0
    ) as client:
        stream = await client.chat.completions.create(
            model=engine.model, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello!"
    assert engine.fake.jit_loads == []


async def test_a_load_someone_else_started_is_waited_for(make_proxy, fake_upstream):
    """The router lists the model as loading (another client's load): ps shows it
    loading, lmbridge sends no load of its own and the request waits until the list
    says loaded."""
    engine = router(fake_upstream, load_time=0.3)
    engine.fake.states[engine.model] = time.monotonic()
    proxy = await start(make_proxy, engine)
    listing = await (await proxy.get(ADMIN)).json()
    assert [(e["model"], e["state"], e["loaded_by"]) for e in listing["data"]] == [
        (engine.model, "loading", None)
    ]
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    assert engine.load_calls() == []
    assert engine.fake.jit_loads == []


# --- idle unloading ------------------------------------------------------------


async def with_clock(make_proxy: Any, engine: Engine, **overrides: Any) -> tuple[Any, FakeClock]:
    proxy = await start(make_proxy, engine, **overrides)
    clock = FakeClock()
    proxy.server.app[LIFECYCLE].clock = clock
    return proxy, clock


@ENGINES
async def test_ttl_unloads_an_idle_model_lmbridge_loaded(make_proxy, fake_upstream, setup):
    """models.ttl: idle that long, the model lmbridge loaded is unloaded, once; Ollama was
    told to keep it (keep_alive -1) so that lmbridge's ttl decides."""
    engine = setup(fake_upstream)
    proxy, clock = await with_clock(make_proxy, engine, models__ttl=60)
    lifecycle = proxy.server.app[LIFECYCLE]
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    if engine.kind == "ollama":
        assert engine.load_calls() == [{"model": engine.model, "keep_alive": -1}]
    clock.advance(59)
    assert await lifecycle.reap() == []
    clock.advance(1)
    assert await lifecycle.reap() == [engine.model]
    assert engine.fake.unloads == [engine.model]
    assert not engine.fake.is_loaded(engine.model)
    assert await lifecycle.reap() == []
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    assert len(engine.load_calls()) == 2


@ENGINES
async def test_ttl_never_unloads_a_busy_model(make_proxy, fake_upstream, setup):
    """A request running on the model keeps it loaded past its ttl; the idle time counts
    from the end of the last request."""
    engine = setup(fake_upstream)
    proxy, clock = await with_clock(make_proxy, engine, models__ttl=60)
    lifecycle = proxy.server.app[LIFECYCLE]
    release = asyncio.Event()
    fake_upstream.add_reply(CHAT, Reply(hold=release))
    running = asyncio.create_task(proxy.post(CHAT, json=ask(engine.model, "long")))
    await until(lambda: len(fake_upstream.requests_to(CHAT)) == 1, "one running")
    clock.advance(3600)
    assert await lifecycle.reap() == []
    release.set()
    assert (await running).status == 200
    assert await lifecycle.reap() == []  # just used
    clock.advance(60)
    assert await lifecycle.reap() == [engine.model]
    assert engine.fake.unloads == [engine.model]


@ENGINES
async def test_a_model_loaded_by_someone_else_is_never_reaped(make_proxy, fake_upstream, setup):
    """The reaper unloads only what lmbridge loaded."""
    engine = setup(fake_upstream, loaded=(NAMES[setup][0],))
    proxy, clock = await with_clock(make_proxy, engine, models__ttl=1)
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    clock.advance(3600)
    assert await proxy.server.app[LIFECYCLE].reap() == []
    assert engine.fake.unloads == []
    assert engine.load_calls() == []


async def test_without_a_ttl_ollama_keeps_its_own_keep_alive(make_proxy, fake_upstream):
    """A request's keep_alive is a ttl: Ollama keeps the model for lmbridge (-1); with no
    ttl anywhere the load sends no keep_alive, so Ollama's own default applies."""
    engine = ollama(fake_upstream)
    proxy = await start(make_proxy, engine)
    assert (await proxy.post(CHAT, json=ask(engine.model, keep_alive="10m"))).status == 200
    assert engine.load_calls() == [{"model": engine.model, "keep_alive": -1}]
    assert (await proxy.post(CHAT, json=ask("other:latest"))).status == 200
    assert engine.load_calls()[1] == {"model": "other:latest"}


async def test_an_ollama_embedding_model_is_left_to_ollama(make_proxy, fake_upstream):
    """/api/generate refuses an embedding model: the request passes and Ollama loads it
    itself, as without lmbridge; lmbridge does not ask again."""
    engine = ollama(fake_upstream, embedding=("nomic-embed-text:latest",))
    proxy = await start(make_proxy, engine)
    body = {"model": "nomic-embed-text:latest", "input": "hello"}
    for _ in range(2):
        resp = await proxy.post("/v1/embeddings", json=body)
        assert resp.status == 200
    assert engine.load_calls() == [{"model": "nomic-embed-text:latest"}]
    assert engine.fake.jit_loads == ["nomic-embed-text:latest"]
    assert loads(proxy, "nomic-embed-text:latest", "failed") is None


# --- admin routes --------------------------------------------------------------


@ENGINES
async def test_admin_load_ps_and_unload(make_proxy, fake_upstream, setup):
    """load (with a ttl), ps showing who loaded what, unload (of a model someone else
    loaded too), and 409 for a model not loaded."""
    other = NAMES[setup][1]
    engine = setup(fake_upstream, loaded=(other,))
    proxy = await start(make_proxy, engine)
    loaded = await proxy.post(ADMIN + "/load", json={"model": engine.model, "ttl": "30m"})
    assert loaded.status == 200
    entry = await loaded.json()
    assert entry["state"] == "loaded" and entry["loaded_by"] == "lmbridge"
    assert entry["ttl"] == 1800 and entry["instances"] == [engine.model]
    assert len(engine.load_calls()) == 1
    assert (await proxy.post(ADMIN + "/load", json={"model": engine.model})).status == 200
    assert len(engine.load_calls()) == 1
    listing = await (await proxy.get(ADMIN)).json()
    assert listing["loads_models"] is True
    by_model = {e["model"]: e for e in listing["data"]}
    assert by_model[engine.model]["loaded_by"] == "lmbridge"
    assert by_model[other]["loaded_by"] == "upstream"
    unloaded = await proxy.post(ADMIN + "/unload", json={"model": other})
    assert unloaded.status == 200
    assert (await unloaded.json())["state"] == "not-loaded"
    assert engine.fake.unloads == [other]
    again = await proxy.post(ADMIN + "/unload", json={"model": other})
    assert again.status == 409
    assert (await again.json())["error"]["code"] == "model_not_loaded"
    assert [e["model"] for e in (await (await proxy.get(ADMIN)).json())["data"]] == [engine.model]


async def test_a_router_unload_waits_for_the_child_to_exit(make_proxy, fake_upstream):
    """The router answers an unload before its child has exited: the admin unload
    returns once the list says unloaded, and a request meanwhile loads the model again."""
    engine = router(fake_upstream, loaded=(ROUTER_MODELS[0],), unload_time=0.3)
    proxy = await start(make_proxy, engine)
    unloading = asyncio.create_task(proxy.post(ADMIN + "/unload", json={"model": engine.model}))
    await until(lambda: engine.fake.unloads, "the unload call")
    asked = asyncio.create_task(proxy.post(CHAT, json=ask(engine.model)))
    resp = await unloading
    assert resp.status == 200 and (await resp.json())["state"] == "not-loaded"
    assert (await asked).status == 200
    assert engine.load_calls() == [{"model": engine.model}]
    assert engine.fake.jit_loads == []


@ENGINES
async def test_admin_load_of_a_model_that_cannot_load(make_proxy, fake_upstream, setup):
    """A refused admin load is the same 502 model_load_failed, in the OpenAI shape."""
    engine = setup(fake_upstream)
    engine.fake.fail = (404, {"error": "no such model file"})
    proxy = await start(make_proxy, engine)
    resp = await proxy.post(ADMIN + "/load", json={"model": engine.model})
    assert resp.status == 502
    error = (await resp.json())["error"]
    assert error["code"] == "model_load_failed" and "no such model file" in error["message"]


# --- which server it is ----------------------------------------------------------


@pytest.mark.parametrize("setup", [router, ollama], ids=["llama.cpp-router", "ollama"])
async def test_auto_recognises_the_server(make_proxy, fake_upstream, setup):
    """upstream.kind auto: llama.cpp's router and Ollama are recognised by their lists."""
    engine = setup(fake_upstream, load_time=0.1)
    proxy = await make_proxy()
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    assert engine.load_calls() == [{"model": engine.model}]
    assert proxy.server.app[LIFECYCLE].active


async def test_a_one_model_llama_cpp_passes_through_as_before(make_proxy, fake_upstream):
    """llama-server with -m: no status in its list, /props read, nothing loaded by
    lmbridge; load and unload say why they cannot."""
    fake_upstream.llama_props = {"total_slots": 2, "chat_template_caps": {"supports_tools": True}}
    proxy = await make_proxy(upstream__kind="llamacpp")
    assert (await proxy.post(CHAT, json=ask("test-model"))).status == 200
    assert fake_upstream.requests_to("/props")
    assert fake_upstream.requests_to("/models/load") == []
    assert not proxy.server.app[LIFECYCLE].active
    resp = await proxy.post(ADMIN + "/load", json={"model": "test-model"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "load_not_supported"
    assert "router" in error["message"] and "Ollama" in error["message"]
    listing = await (await proxy.get(ADMIN)).json()
    assert listing == {"object": "list", "data": [], "loads_models": False}


async def test_a_router_list_that_goes_bad_is_a_clear_error(make_proxy, fake_upstream):
    """The router's list turning into something unreadable gives an OpenAI-shaped error,
    never a 500."""
    engine = router(fake_upstream)
    proxy = await start(make_proxy, engine, models__cache_ttl=0)
    assert (await proxy.post(CHAT, json=ask(engine.model))).status == 200
    fake_upstream.add_reply("/v1/models", Reply(json={"data": "nope"}), times=3)
    resp = await proxy.post(CHAT, json=ask(engine.model))
    assert resp.status == 502
    body = json.loads(await resp.read())
    assert body["error"]["message"]


@ENGINES
async def test_preload_loads_at_start(make_proxy, fake_upstream, setup):
    """models.preload: loaded in the background once the daemon starts; a model that
    cannot be loaded is logged and start-up goes on."""
    engine = setup(fake_upstream)
    proxy = await start(make_proxy, engine, models__preload=["missing", engine.model])
    await until(lambda: engine.fake.is_loaded(engine.model), "the preload")
    assert engine.load_calls() == [{"model": engine.model}]
    assert (await proxy.get("/healthz")).status == 200


async def test_a_router_and_ollama_behind_one_daemon(aiohttp_server, aiohttp_client, tmp_path):
    """[[upstreams]]: each server loads its own models its own way, and ps lists both."""
    fakes = []
    for _ in range(2):
        fake = FakeUpstream([])
        fake.url = str((await aiohttp_server(fake.app())).make_url("")).rstrip("/")
        fakes.append(fake)
    llama, olla = router(fakes[0]), ollama(fakes[1])
    flags: dict[str, Any] = {
        "upstreams": [
            {"name": "box", "url": fakes[0].url, "kind": "auto"},
            {"name": "olla", "url": fakes[1].url, "kind": "auto"},
        ],
        "storage.path": str(tmp_path / "lmbridge.db"),
    }
    proxy = await aiohttp_client(create_app(load_config(os.devnull, flags=flags, environ={})))
    answers = await asyncio.gather(
        *(proxy.post(CHAT, json=ask(m)) for m in [llama.model, olla.model] * 3)
    )
    assert [a.status for a in answers] == [200] * 6
    assert llama.load_calls() == [{"model": llama.model}]
    assert olla.load_calls() == [{"model": olla.model}]
    assert fakes[0].requests_to("/api/generate") == []
    assert fakes[1].requests_to("/models/load") == []
    listing = await (await proxy.get(ADMIN)).json()
    assert {(e["model"], e["upstream"], e["loaded_by"]) for e in listing["data"]} == {
        (llama.model, "box", "lmbridge"),
        (olla.model, "olla", "lmbridge"),
    }
