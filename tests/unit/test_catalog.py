"""The model catalog: parsing each server's list, caching, single-flight refresh, resolution."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import pytest

from proxy.catalog import MISS_REFRESH_INTERVAL, ModelCatalog, ModelListReader
from proxy.config import ModelsConfig
from proxy.errors import (
    ModelNotFound,
    ModelRequired,
    UpstreamError,
    UpstreamStatus,
    UpstreamUnavailable,
)
from proxy.model_records import (
    LMSTUDIO_PARALLEL,
    ModelInfo,
    ModelList,
    parse_lmstudio_v0,
    parse_lmstudio_v1,
    parse_openai,
)
from tests.clock import FakeClock

# --- realistic payloads -----------------------------------------------------------

LMSTUDIO_V1 = {
    "models": [
        {
            "type": "llm",
            "publisher": "qwen",
            "key": "qwen/qwen3-4b",
            "display_name": "Qwen3 4B",
            "architecture": "qwen3",
            "quantization": {"name": "Q4_K_M", "bits_per_weight": 4},
            "size_bytes": 2497280256,
            "params_string": "4B",
            "loaded_instances": [
                {
                    "id": "qwen/qwen3-4b",
                    "config": {
                        "context_length": 4096,
                        "eval_batch_size": 512,
                        "flash_attention": True,
                        "offload_kv_cache_to_gpu": True,
                    },
                },
                {"id": "qwen/qwen3-4b:2", "config": {"context_length": 8192}},
            ],
            "max_context_length": 32768,
            "format": "gguf",
            "capabilities": {"vision": False, "trained_for_tool_use": True},
            "description": None,
        },
        {
            "type": "llm",
            "publisher": "google",
            "key": "google/gemma-3-4b",
            "display_name": "Gemma 3 4B",
            "loaded_instances": [],
            "max_context_length": 131072,
            "format": "gguf",
            "capabilities": {"vision": True, "trained_for_tool_use": False},
        },
        {
            "type": "embedding",
            "publisher": "nomic-ai",
            "key": "text-embedding-nomic-embed-text-v1.5",
            "display_name": "Nomic Embed Text v1.5",
            "loaded_instances": [],
            "max_context_length": 2048,
            "format": "gguf",
        },
    ]
}

LMSTUDIO_V1_MODELS = [
    ModelInfo(
        id="qwen/qwen3-4b",
        type="llm",
        state="loaded",
        context_length=4096,
        owned_by="qwen",
        aliases=("qwen/qwen3-4b:2",),
        capabilities=("trained_for_tool_use",),
        vision=False,
        parallel=LMSTUDIO_PARALLEL,
        instances=("qwen/qwen3-4b", "qwen/qwen3-4b:2"),
    ),
    ModelInfo(
        id="google/gemma-3-4b",
        type="vlm",
        state="not-loaded",
        context_length=131072,
        owned_by="google",
        capabilities=("vision",),
        vision=True,
        parallel=LMSTUDIO_PARALLEL,
    ),
    ModelInfo(
        id="text-embedding-nomic-embed-text-v1.5",
        type="embeddings",
        state="not-loaded",
        context_length=2048,
        owned_by="nomic-ai",
        vision=False,
        parallel=LMSTUDIO_PARALLEL,
    ),
]

LMSTUDIO_V0 = {
    "object": "list",
    "data": [
        {
            "id": "qwen2-vl-7b-instruct",
            "object": "model",
            "type": "vlm",
            "publisher": "mlx-community",
            "arch": "qwen2_vl",
            "compatibility_type": "mlx",
            "quantization": "4bit",
            "state": "not-loaded",
            "max_context_length": 32768,
        },
        {
            "id": "meta-llama-3.1-8b-instruct",
            "object": "model",
            "type": "llm",
            "publisher": "lmstudio-community",
            "arch": "llama",
            "compatibility_type": "gguf",
            "quantization": "Q4_K_M",
            "state": "loaded",
            "max_context_length": 131072,
            "capabilities": ["tool_use"],
        },
        {
            "id": "text-embedding-nomic-embed-text-v1.5",
            "object": "model",
            "type": "embeddings",
            "publisher": "nomic-ai",
            "arch": "nomic-bert",
            "compatibility_type": "gguf",
            "quantization": "Q4_0",
            "state": "not-loaded",
            "max_context_length": 2048,
        },
    ],
}

LMSTUDIO_V0_MODELS = [
    ModelInfo(
        id="qwen2-vl-7b-instruct",
        type="vlm",
        state="not-loaded",
        context_length=32768,
        owned_by="mlx-community",
        vision=True,
        parallel=LMSTUDIO_PARALLEL,
    ),
    ModelInfo(
        id="meta-llama-3.1-8b-instruct",
        type="llm",
        state="loaded",
        context_length=131072,
        owned_by="lmstudio-community",
        capabilities=("tool_use",),
        vision=False,
        parallel=LMSTUDIO_PARALLEL,
    ),
    ModelInfo(
        id="text-embedding-nomic-embed-text-v1.5",
        type="embeddings",
        state="not-loaded",
        context_length=2048,
        owned_by="nomic-ai",
        vision=False,
        parallel=LMSTUDIO_PARALLEL,
    ),
]

# llama.cpp's server: an Ollama-style "models" list next to the OpenAI "data" list.
LLAMA_CPP = {
    "models": [
        {
            "name": "smollm2",
            "model": "smollm2",
            "modified_at": "",
            "size": "",
            "digest": "",
            "type": "model",
            "details": {"format": "gguf"},
        }
    ],
    "object": "list",
    "data": [
        {
            "id": "smollm2",
            "aliases": ["smollm2", "SmolLM2-135M-Instruct"],
            "object": "model",
            "created": 1735000000,
            "owned_by": "llamacpp",
            "meta": {
                "vocab_type": 2,
                "n_vocab": 49152,
                "n_ctx_train": 8192,
                "n_embd": 576,
                "n_params": 134515008,
                "size": 270598656,
            },
        }
    ],
}

VLLM = {
    "object": "list",
    "data": [
        {
            "id": "Qwen/Qwen2.5-7B-Instruct",
            "object": "model",
            "created": 1735000000,
            "owned_by": "vllm",
            "root": "Qwen/Qwen2.5-7B-Instruct",
            "parent": None,
            "max_model_len": 32768,
            "permission": [{"id": "modelperm-1", "object": "model_permission"}],
        }
    ],
}

OLLAMA = {
    "object": "list",
    "data": [
        {"id": "llama3.2:latest", "object": "model", "created": 1735000000, "owned_by": "library"},
        {"id": "nomic-embed-text:latest", "object": "model", "created": 0, "owned_by": "library"},
    ],
}

LLAMA_CPP_ROUTER = {
    "object": "list",
    "data": [
        {"id": "a", "object": "model", "status": {"value": "loaded"}},
        {"id": "b", "object": "model", "status": {"value": "loading"}},
        {"id": "c", "object": "model", "status": {"value": "sleeping"}},
        {"id": "d", "object": "model", "status": {"value": "unloaded"}},
        {"id": "e", "object": "model", "status": {"value": "failed"}},
        {"id": "f", "object": "model", "status": "loaded"},
    ],
}


# --- parsers ------------------------------------------------------------------------


def test_parse_lmstudio_v1():
    """LM Studio 0.4's list: loaded context, instance ids as aliases, vision makes a vlm."""
    assert parse_lmstudio_v1(LMSTUDIO_V1) == LMSTUDIO_V1_MODELS


def test_parse_lmstudio_v0():
    """LM Studio 0.3's list: type and state as sent, capabilities as a list."""
    assert parse_lmstudio_v0(LMSTUDIO_V0) == LMSTUDIO_V0_MODELS


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (
            LLAMA_CPP,
            [
                ModelInfo(
                    id="smollm2",
                    context_length=8192,
                    owned_by="llamacpp",
                    aliases=("SmolLM2-135M-Instruct",),
                )
            ],
        ),
        (
            VLLM,
            [ModelInfo(id="Qwen/Qwen2.5-7B-Instruct", context_length=32768, owned_by="vllm")],
        ),
        (
            OLLAMA,
            [
                ModelInfo(id="llama3.2:latest", owned_by="library"),
                ModelInfo(id="nomic-embed-text:latest", owned_by="library"),
            ],
        ),
        (
            LLAMA_CPP_ROUTER,
            [
                ModelInfo(id="a", state="loaded", status="loaded", instances=("a",)),
                ModelInfo(id="b", state="loaded", status="loading", instances=("b",)),
                ModelInfo(id="c", state="loaded", status="sleeping", instances=("c",)),
                ModelInfo(id="d", state="not-loaded", status="unloaded"),
                ModelInfo(id="e", state="unknown", status="failed"),
                ModelInfo(id="f", state="unknown"),
            ],
        ),
        ({"object": "list", "data": []}, []),
    ],
    ids=["llama.cpp", "vllm", "ollama", "llama.cpp-router", "empty"],
)
def test_parse_openai(payload, expected):
    """An OpenAI /v1/models list: ids, owner, context from llama.cpp meta or vLLM, aliases."""
    assert parse_openai(payload) == expected


@pytest.mark.parametrize(
    ("meta", "extra", "context"),
    [
        ({"n_ctx_train": 8192, "n_ctx": 4096}, {}, 4096),
        ({"n_ctx_train": 8192}, {}, 8192),
        ({"n_ctx": 4096}, {}, 4096),
        ({"n_ctx": 0, "n_ctx_train": 8192}, {}, 8192),
        ({}, {"max_model_len": 2048}, 2048),
        ({"n_ctx_train": "8192"}, {}, None),
        ("not a dict", {"max_model_len": 1024}, 1024),
        ({}, {}, None),
    ],
)
def test_parse_openai_context_length(meta, extra, context):
    """The context is llama.cpp's running n_ctx, else n_ctx_train, else vLLM's max_model_len."""
    (model,) = parse_openai({"data": [{"id": "m", "meta": meta, **extra}]})
    assert model.context_length == context


@pytest.mark.parametrize("parse", [parse_lmstudio_v1, parse_lmstudio_v0, parse_openai])
@pytest.mark.parametrize(
    "payload",
    [None, [], "models", 42, {}, {"models": {}, "data": {}}, {"models": "x", "data": None}],
)
def test_parsers_reject_payloads_of_the_wrong_shape(parse, payload):
    """A payload without the dialect's list is not that dialect (None, not an exception)."""
    assert parse(payload) is None


@pytest.mark.parametrize(
    ("parse", "payload"),
    [
        (parse_lmstudio_v1, {"data": LMSTUDIO_V0["data"]}),
        (parse_lmstudio_v0, VLLM),
        (parse_lmstudio_v0, LLAMA_CPP),
    ],
    ids=["v1-given-v0", "v0-given-vllm", "v0-given-llama.cpp"],
)
def test_parsers_tell_dialects_apart(parse, payload):
    """A native parser does not accept another server's list."""
    assert parse(payload) is None


def test_parse_lmstudio_v1_skips_malformed_entries():
    """Entries that are no object or have no string key are skipped; odd fields degrade."""
    payload = {
        "models": [
            "qwen/qwen3-4b",
            None,
            {"type": "llm"},
            {"type": "llm", "key": 7},
            {
                "type": "llm",
                "key": "a",
                "publisher": 5,
                "loaded_instances": ["x", None, {"id": 3, "config": "c"}],
                "max_context_length": "big",
                "capabilities": ["vision"],
            },
            {
                "type": "reranker",
                "key": "b",
                "loaded_instances": None,
                "capabilities": {"vision": "yes", "tool_use": True},
                "max_context_length": 1024,
            },
            {
                "type": "llm",
                "key": "c",
                "loaded_instances": [
                    {"id": "c", "config": {"context_length": "4096"}},
                    {"id": "c:2", "config": {"context_length": 2048}},
                ],
                "max_context_length": 8192,
            },
            {"type": "vlm", "key": "d"},
        ]
    }
    assert parse_lmstudio_v1(payload) == [
        ModelInfo(id="a", type="llm", state="loaded", vision=False, parallel=LMSTUDIO_PARALLEL),
        ModelInfo(
            id="b",
            type="unknown",
            state="not-loaded",
            context_length=1024,
            capabilities=("tool_use",),
            parallel=LMSTUDIO_PARALLEL,
        ),
        ModelInfo(
            id="c",
            type="llm",
            state="loaded",
            context_length=2048,
            aliases=("c:2",),
            vision=False,
            parallel=LMSTUDIO_PARALLEL,
            instances=("c", "c:2"),
        ),
        ModelInfo(id="d", type="llm", state="not-loaded", vision=False, parallel=LMSTUDIO_PARALLEL),
    ]


@pytest.mark.parametrize("instances", [1, True])
def test_parse_lmstudio_v1_survives_non_list_instances(instances):
    """A non-list loaded_instances does not break the parse of the whole list."""
    payload = {"models": [{"type": "llm", "key": "a", "loaded_instances": instances}]}
    assert [m.id for m in parse_lmstudio_v1(payload) or []] in ([], ["a"])


def test_parse_lmstudio_v0_skips_malformed_entries():
    """Entries without a string id are skipped; unknown types and states become unknown."""
    payload = {
        "data": [
            None,
            "x",
            {"state": "loaded"},
            {"id": 5, "state": "loaded"},
            {"id": "a", "type": "llm", "state": "idle", "max_context_length": "1k", "publisher": 1},
            {"id": "b", "type": "audio", "state": "downloading", "capabilities": ["x", 2, None]},
            {"id": "c", "type": "embeddings"},
        ]
    }
    assert parse_lmstudio_v0(payload) == [
        ModelInfo(id="a", type="llm", state="loaded", vision=False, parallel=LMSTUDIO_PARALLEL),
        ModelInfo(
            id="b", type="unknown", state="unknown", capabilities=("x",), parallel=LMSTUDIO_PARALLEL
        ),
        ModelInfo(
            id="c", type="embeddings", state="unknown", vision=False, parallel=LMSTUDIO_PARALLEL
        ),
    ]


def test_parse_lmstudio_v0_empty_list_is_accepted():
    """An empty native list is a valid answer (nothing downloaded yet)."""
    assert parse_lmstudio_v0({"object": "list", "data": []}) == []


def test_parse_openai_skips_malformed_entries():
    """Entries without a string id are skipped; non-string aliases and owners are dropped."""
    payload = {
        "data": [
            None,
            {"object": "model"},
            {"id": None},
            {"id": "a", "aliases": ["a", 5, "b", None], "owned_by": 3},
            {"id": "c", "aliases": "c2", "status": ["loaded"]},
        ]
    }
    assert parse_openai(payload) == [ModelInfo(id="a", aliases=("b",)), ModelInfo(id="c")]


# --- ModelInfo and ModelList ----------------------------------------------------------


@pytest.mark.parametrize(
    ("model_type", "chat", "embeddings", "any_"),
    [
        ("llm", True, False, True),
        ("vlm", True, False, True),
        ("embeddings", False, True, True),
        ("unknown", True, True, True),
    ],
)
def test_serves(model_type, chat, embeddings, any_):
    """Chat needs an llm or vlm, embeddings an embedding model; unknown types serve both."""
    model = ModelInfo(id="m", type=model_type)
    assert (model.serves("chat"), model.serves("embeddings"), model.serves("any")) == (
        chat,
        embeddings,
        any_,
    )


def test_as_openai():
    """as_openai is the OpenAI model object with LM Studio's extra fields."""
    assert LMSTUDIO_V1_MODELS[0].as_openai() == {
        "id": "qwen/qwen3-4b",
        "object": "model",
        "created": 0,
        "owned_by": "qwen",
        "type": "llm",
        "state": "loaded",
        "max_context_length": 4096,
        "supports_tools": None,
    }
    assert ModelInfo(id="x").as_openai()["owned_by"] == "local"


def test_model_list_by_name():
    """by_name finds models by id and upstream alias; a real id wins over an alias."""
    models = ModelList.build(
        [
            ModelInfo(id="a", aliases=("alias-a", "b")),
            ModelInfo(id="b"),
            ModelInfo(id="c", aliases=("alias-a",)),
        ],
        "openai",
        5.0,
    )
    assert models.by_name["a"].id == "a"
    assert models.by_name["b"].id == "b"
    assert models.by_name["alias-a"].id == "a"  # first model claiming an alias keeps it
    assert models.ids() == ["a", "b", "c"]
    assert (models.dialect, models.fetched_at) == ("openai", 5.0)


# --- ModelCatalog: caching and single-flight --------------------------------------------


class FakeFetch:
    """A scripted upstream list read: counts calls, can be held and can fail."""

    def __init__(self, clock: FakeClock, models: Iterable[ModelInfo] = ()) -> None:
        self.clock = clock
        self.models = list(models)
        self.calls = 0
        self.error: BaseException | None = None
        self.hold: asyncio.Event | None = None
        self.started = asyncio.Event()

    async def __call__(self) -> ModelList:
        self.calls += 1
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.error is not None:
            raise self.error
        return ModelList.build(self.models, "lmstudio-v1", self.clock())


def make_catalog(
    models: Iterable[ModelInfo] = (),
    *,
    default: str | None = None,
    aliases: dict[str, str] | None = None,
    cache_ttl: float = 60.0,
) -> tuple[ModelCatalog, FakeFetch, FakeClock, list[str]]:
    clock = FakeClock()
    fetch = FakeFetch(clock, models)
    outcomes: list[str] = []
    config = ModelsConfig(cache_ttl=cache_ttl, default=default, aliases=aliases or {})
    catalog = ModelCatalog(config, fetch, clock=clock, on_refresh=outcomes.append)
    return catalog, fetch, clock, outcomes


LLM = ModelInfo(id="qwen/qwen3-4b", type="llm", state="loaded", aliases=("qwen/qwen3-4b:2",))
GEMMA = ModelInfo(id="google/gemma-3-4b", type="vlm", state="not-loaded")
NOMIC = ModelInfo(id="text-embedding-nomic", type="embeddings", state="not-loaded")


async def test_nothing_is_read_before_the_first_get():
    """The catalog reads nothing until asked, and cached is None until then."""
    catalog, fetch, _, _ = make_catalog([LLM])
    assert catalog.cached is None
    assert fetch.calls == 0
    models = await catalog.get()
    assert catalog.cached is models
    assert models.ids() == ["qwen/qwen3-4b"]


@pytest.mark.parametrize(
    ("elapsed", "calls"),
    [(0.0, 1), (1.0, 1), (59.999, 1), (60.0, 2), (600.0, 2)],
)
async def test_ttl_caching(elapsed, calls):
    """The list is read again only once it is cache_ttl seconds old."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    first = await catalog.get()
    clock.advance(elapsed)
    second = await catalog.get()
    assert fetch.calls == calls
    assert (second is first) is (calls == 1)


@pytest.mark.parametrize(("max_age", "calls"), [(0.0, 2), (5.0, 2), (10.0, 1)])
async def test_get_with_max_age(max_age, calls):
    """get(max_age=...) overrides the TTL for one call."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    await catalog.get()
    clock.advance(5.0)
    await catalog.get(max_age=max_age)
    assert fetch.calls == calls


async def test_refresh_always_reads():
    """refresh() reads the list even when the cache is fresh."""
    catalog, fetch, _, outcomes = make_catalog([LLM])
    await catalog.get()
    fetch.models = [LLM, NOMIC]
    models = await catalog.refresh()
    assert fetch.calls == 2
    assert models.ids() == ["qwen/qwen3-4b", "text-embedding-nomic"]
    assert catalog.cached is models
    assert outcomes == ["ok", "ok"]


async def test_single_flight():
    """Many concurrent get() calls share one upstream read and get the same list."""
    catalog, fetch, _, outcomes = make_catalog([LLM])
    fetch.hold = asyncio.Event()
    waiters = [asyncio.create_task(catalog.get()) for _ in range(20)]
    await fetch.started.wait()
    waiters.append(asyncio.create_task(catalog.refresh()))
    fetch.hold.set()
    results = await asyncio.gather(*waiters)
    assert fetch.calls == 1
    assert all(r is results[0] for r in results)
    assert outcomes == ["ok"]


async def test_new_read_after_a_shared_one_finished():
    """Once a shared read is done, the next refresh starts a new one."""
    catalog, fetch, _, _ = make_catalog([LLM])
    await asyncio.gather(catalog.refresh(), catalog.refresh())
    await catalog.refresh()
    assert fetch.calls == 2


async def test_cancelled_waiter_does_not_cancel_the_shared_read():
    """A waiter that goes away (client disconnected) leaves the read running for the others."""
    catalog, fetch, _, _ = make_catalog([LLM])
    fetch.hold = asyncio.Event()
    leaver = asyncio.create_task(catalog.get())
    await fetch.started.wait()
    stayer = asyncio.create_task(catalog.get())
    leaver.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leaver
    fetch.hold.set()
    models = await stayer
    assert models.ids() == ["qwen/qwen3-4b"]
    assert fetch.calls == 1


async def test_read_completes_when_every_waiter_went_away():
    """Even with no waiter left the read finishes and fills the cache."""
    catalog, fetch, _, outcomes = make_catalog([LLM])
    fetch.hold = asyncio.Event()
    only = asyncio.create_task(catalog.get())
    await fetch.started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    fetch.hold.set()
    models = await catalog.get()  # joins the read still running, or finds its result
    assert fetch.calls == 1
    assert models.ids() == ["qwen/qwen3-4b"]
    assert outcomes == ["ok"]


async def test_read_error_reaches_every_waiter_and_the_next_call_retries():
    """A failed read raises its error in all waiters; the next call reads again."""
    catalog, fetch, _, outcomes = make_catalog([LLM])
    fetch.hold = asyncio.Event()
    fetch.error = UpstreamUnavailable("The upstream is down.")
    waiters = [asyncio.create_task(catalog.get()) for _ in range(5)]
    await fetch.started.wait()
    fetch.hold.set()
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(r is fetch.error for r in results)
    assert fetch.calls == 1
    assert catalog.cached is None

    fetch.error = None
    fetch.hold = None
    models = await catalog.get()
    assert fetch.calls == 2
    assert models.ids() == ["qwen/qwen3-4b"]
    assert outcomes == ["error", "ok"]


async def test_read_error_keeps_the_previous_list():
    """A failed refresh leaves the last good list in the cache."""
    catalog, fetch, clock, _ = make_catalog([LLM])
    good = await catalog.get()
    clock.advance(61.0)
    fetch.error = UpstreamUnavailable("down")
    with pytest.raises(UpstreamUnavailable):
        await catalog.get()
    assert catalog.cached is good


async def test_read_failing_after_its_waiter_left_reaches_the_next_caller():
    """A read that fails after its only waiter left still ends, and the next caller sees it."""
    catalog, fetch, _, outcomes = make_catalog([LLM])
    fetch.hold = asyncio.Event()
    fetch.error = UpstreamUnavailable("down")
    only = asyncio.create_task(catalog.get())
    await fetch.started.wait()
    only.cancel()
    with pytest.raises(asyncio.CancelledError):
        await only
    fetch.hold.set()
    with pytest.raises(UpstreamUnavailable):
        await catalog.get()  # joins the read that is still running
    assert fetch.calls == 1
    assert outcomes == ["error"]


# --- ModelCatalog.resolve ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("models", "aliases", "requested", "expected"),
    [
        ([LLM, GEMMA], {}, "qwen/qwen3-4b", "qwen/qwen3-4b"),
        ([LLM, GEMMA], {}, "google/gemma-3-4b", "google/gemma-3-4b"),
        ([LLM, GEMMA], {"gpt-4o-mini": "qwen/qwen3-4b"}, "gpt-4o-mini", "qwen/qwen3-4b"),
        ([LLM, GEMMA], {}, "qwen/qwen3-4b:2", "qwen/qwen3-4b"),
        ([LLM, GEMMA], {"fast": "qwen/qwen3-4b:2"}, "fast", "qwen/qwen3-4b"),
        # A configured alias shadows a real id of the same name.
        (
            [LLM, GEMMA],
            {"google/gemma-3-4b": "qwen/qwen3-4b"},
            "google/gemma-3-4b",
            "qwen/qwen3-4b",
        ),
        ([LLM, NOMIC], {}, "text-embedding-nomic", "text-embedding-nomic"),
    ],
    ids=[
        "exact-id",
        "exact-id-not-loaded",
        "config-alias",
        "upstream-alias",
        "config-alias-to-upstream-alias",
        "config-alias-shadows-id",
        "other-purpose-by-name",
    ],
)
async def test_resolve_by_name(models, aliases, requested, expected):
    """A named model is found by id, configured alias or upstream alias, without a refresh."""
    catalog, fetch, _, _ = make_catalog(models, aliases=aliases)
    assert (await catalog.resolve(requested)).id == expected
    assert fetch.calls == 1


async def test_resolve_unknown_model():
    """An unknown model is a 404 model_not_found that lists the available models."""
    catalog, _, _, _ = make_catalog([LLM, GEMMA])
    with pytest.raises(ModelNotFound) as info:
        await catalog.resolve("gpt-4")
    exc = info.value
    assert (exc.status, exc.code, exc.param) == (404, "model_not_found", "model")
    assert exc.message == (
        "The model 'gpt-4' does not exist upstream. "
        "Available models: qwen/qwen3-4b, google/gemma-3-4b."
    )
    assert exc.body()["error"]["code"] == "model_not_found"


async def test_resolve_unknown_alias_target():
    """A configured alias whose target is missing says which alias it was."""
    catalog, _, _, _ = make_catalog([LLM], aliases={"gpt-4o": "qwen/qwen3-8b"})
    with pytest.raises(ModelNotFound, match=r"The model 'gpt-4o' \(alias of 'qwen/qwen3-8b'\)"):
        await catalog.resolve("gpt-4o")


async def test_resolve_unknown_model_when_upstream_has_none():
    """With no model upstream the message says to load or download one."""
    catalog, _, _, _ = make_catalog([])
    with pytest.raises(ModelNotFound, match=r"Available models: none \(load or download one"):
        await catalog.resolve("x")


async def test_resolve_unknown_model_long_listing_is_cut():
    """More than 50 available models are listed as the first 50 and a count."""
    catalog, _, _, _ = make_catalog([ModelInfo(id=f"m{i}") for i in range(53)])
    with pytest.raises(ModelNotFound) as info:
        await catalog.resolve("x")
    assert "m49 and 3 more." in info.value.message
    assert "m50" not in info.value.message


@pytest.mark.parametrize(
    ("elapsed", "calls"),
    [
        (0.0, 1),
        (MISS_REFRESH_INTERVAL - 0.001, 1),
        (MISS_REFRESH_INTERVAL, 2),
        (30.0, 2),
    ],
)
async def test_miss_forces_one_refresh_when_the_list_is_old_enough(elapsed, calls):
    """A miss re-reads the list once if it is MISS_REFRESH_INTERVAL old, never sooner."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    await catalog.get()
    clock.advance(elapsed)
    with pytest.raises(ModelNotFound):
        await catalog.resolve("just-downloaded")
    assert fetch.calls == calls


async def test_miss_refresh_finds_a_model_loaded_meanwhile():
    """The forced refresh finds a model that appeared upstream since the last read."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    await catalog.get()
    fetch.models = [LLM, GEMMA]
    clock.advance(MISS_REFRESH_INTERVAL)
    assert (await catalog.resolve("google/gemma-3-4b")).id == "google/gemma-3-4b"
    assert fetch.calls == 2


async def test_repeated_misses_do_not_read_the_list_each_time():
    """A typo repeated in a loop causes at most one read per MISS_REFRESH_INTERVAL."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    await catalog.get()
    clock.advance(MISS_REFRESH_INTERVAL)
    for _ in range(10):
        with pytest.raises(ModelNotFound):
            await catalog.resolve("typo")
        clock.advance(0.1)
    assert fetch.calls == 2


async def test_miss_on_a_fresh_read_is_not_read_twice():
    """When get() itself just read the list (stale cache), a miss does not read again."""
    catalog, fetch, clock, _ = make_catalog([LLM], cache_ttl=60.0)
    await catalog.get()
    clock.advance(120.0)
    with pytest.raises(ModelNotFound):
        await catalog.resolve("typo")
    assert fetch.calls == 2


# (models, config default, config aliases, purpose, expected id)
DEFAULT_CASES: list[tuple[str, list[ModelInfo], str | None, dict[str, str], str, str]] = [
    ("configured-default", [LLM, GEMMA], "google/gemma-3-4b", {}, "chat", "google/gemma-3-4b"),
    (
        "configured-default-alias",
        [LLM, GEMMA],
        "g",
        {"g": "google/gemma-3-4b"},
        "chat",
        "google/gemma-3-4b",
    ),
    (
        "configured-default-upstream-alias",
        [LLM, GEMMA],
        "qwen/qwen3-4b:2",
        {},
        "chat",
        "qwen/qwen3-4b",
    ),
    ("single-loaded", [LLM, GEMMA], None, {}, "chat", "qwen/qwen3-4b"),
    (
        "single-loaded-among-unknown-state",
        [LLM, ModelInfo(id="x", type="llm")],
        None,
        {},
        "chat",
        "qwen/qwen3-4b",
    ),
    ("single-candidate-not-loaded", [GEMMA, NOMIC], None, {}, "chat", "google/gemma-3-4b"),
    ("single-candidate-openai", [ModelInfo(id="smollm2")], None, {}, "chat", "smollm2"),
    (
        "embeddings-picks-embedding-model",
        [LLM, NOMIC],
        None,
        {},
        "embeddings",
        "text-embedding-nomic",
    ),
    (
        "embeddings-single-loaded",
        [LLM, NOMIC, ModelInfo(id="bge", type="embeddings", state="loaded")],
        None,
        {},
        "embeddings",
        "bge",
    ),
    (
        "chat-ignores-loaded-embedding-model",
        [GEMMA, ModelInfo(id="e", type="embeddings", state="loaded")],
        None,
        {},
        "chat",
        "google/gemma-3-4b",
    ),
    ("any-single-loaded", [LLM, GEMMA, NOMIC], None, {}, "any", "qwen/qwen3-4b"),
]


@pytest.mark.parametrize("requested", [None, ""])
@pytest.mark.parametrize(
    ("models", "default", "aliases", "purpose", "expected"),
    [c[1:] for c in DEFAULT_CASES],
    ids=[c[0] for c in DEFAULT_CASES],
)
async def test_resolve_without_model(requested, models, default, aliases, purpose, expected):
    """No model: the configured default, else the one loaded model, else the one candidate."""
    catalog, _, _, _ = make_catalog(models, default=default, aliases=aliases)
    assert (await catalog.resolve(requested, purpose)).id == expected


@pytest.mark.parametrize(
    ("models", "purpose", "listed", "absent"),
    [
        (
            [LLM, ModelInfo(id="b", type="llm", state="loaded"), GEMMA],
            "chat",
            "the upstream has 2 loaded models; say which one with `model`: qwen/qwen3-4b, b.",
            "google/gemma-3-4b",
        ),
        (
            [GEMMA, ModelInfo(id="b", type="llm", state="not-loaded"), NOMIC],
            "chat",
            "the upstream has 2 models; say which one with `model`: google/gemma-3-4b, b.",
            "text-embedding-nomic",
        ),
        (
            [ModelInfo(id="a"), ModelInfo(id="b")],
            "chat",
            "the upstream has 2 models; say which one with `model`: a, b.",
            None,
        ),
        (
            [NOMIC, ModelInfo(id="e2", type="embeddings")],
            "embeddings",
            "2 models; say which one with `model`: text-embedding-nomic, e2.",
            None,
        ),
    ],
    ids=["two-loaded", "none-loaded", "openai-two", "two-embedding-models"],
)
async def test_resolve_without_model_ambiguous(models, purpose, listed, absent):
    """Several possible models without a default: 400 model_required listing the choices."""
    catalog, _, _, _ = make_catalog(models)
    with pytest.raises(ModelRequired) as info:
        await catalog.resolve(None, purpose)
    exc = info.value
    assert (exc.status, exc.code, exc.param) == (400, "model_required", "model")
    assert listed in exc.message
    assert "models.default" in exc.message
    if absent is not None:
        assert absent not in exc.message


@pytest.mark.parametrize(
    ("models", "purpose"),
    [([], "chat"), ([NOMIC], "chat"), ([LLM, GEMMA], "embeddings")],
)
async def test_resolve_without_model_and_nothing_to_serve_it(models, purpose):
    """No model and no candidate for the purpose: model_required saying to load one."""
    catalog, _, _, _ = make_catalog(models)
    with pytest.raises(ModelRequired, match="lists none that could serve it"):
        await catalog.resolve(None, purpose)


async def test_configured_default_missing_upstream():
    """A configured default that the upstream lacks is a 404 naming models.default."""
    catalog, _, _, _ = make_catalog([LLM], default="qwen/qwen3-8b")
    with pytest.raises(ModelNotFound) as info:
        await catalog.resolve(None)
    assert info.value.message == (
        "The configured default model 'qwen/qwen3-8b' (models.default) is not available "
        "upstream. Available models: qwen/qwen3-4b."
    )


async def test_configured_chat_default_is_not_used_for_embeddings():
    """An embeddings request without model does not go to a configured default chat model."""
    catalog, _, _, _ = make_catalog([LLM, NOMIC], default="qwen/qwen3-4b")
    assert (await catalog.resolve(None, "embeddings")).id == "text-embedding-nomic"


async def test_resolve_upstream_error_propagates():
    """When the list cannot be read, resolve raises the upstream error."""
    catalog, fetch, _, _ = make_catalog([LLM])
    fetch.error = UpstreamUnavailable("down")
    with pytest.raises(UpstreamUnavailable):
        await catalog.resolve("qwen/qwen3-4b")


# --- ModelListReader ----------------------------------------------------------------------


def not_found(path: str) -> UpstreamStatus:
    return UpstreamStatus(
        404,
        b'{"error":"Unexpected endpoint or method. (GET ' + path.encode() + b')"}',
        "application/json",
    )


class FakeGetJson:
    """Answers per path: a payload, or an exception to raise; unknown paths are 404."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    async def __call__(self, path: str) -> Any:
        self.calls.append(path)
        answer = self.answers.get(path, not_found(path))
        if isinstance(answer, BaseException):
            raise answer
        return answer


V1, V0, OAI = "/api/v1/models", "/api/v0/models", "/v1/models"
TAGS = "/api/tags"  # Ollama's, probed before /v1/models
PROPS = "/props"  # llama.cpp's, read beside its list


@pytest.mark.parametrize(
    ("answers", "dialect", "first_calls", "ids"),
    [
        (
            {V1: LMSTUDIO_V1, V0: LMSTUDIO_V0, OAI: OLLAMA},
            "lmstudio-v1",
            [V1],
            [m.id for m in LMSTUDIO_V1_MODELS],
        ),
        (
            {V0: LMSTUDIO_V0, OAI: OLLAMA},
            "lmstudio-v0",
            [V1, V0],
            [m.id for m in LMSTUDIO_V0_MODELS],
        ),
        ({OAI: LLAMA_CPP}, "openai", [V1, V0, TAGS, OAI, PROPS], ["smollm2"]),
        ({OAI: VLLM}, "openai", [V1, V0, TAGS, OAI], ["Qwen/Qwen2.5-7B-Instruct"]),
        # A server that answers the native paths with a plain OpenAI list.
        (
            {V1: OLLAMA, V0: OLLAMA, OAI: OLLAMA},
            "openai",
            [V1, V0, TAGS, OAI],
            ["llama3.2:latest", "nomic-embed-text:latest"],
        ),
        # A 401 or 500 on a native path also means "try the next dialect".
        (
            {
                V1: UpstreamStatus(401, b"", None),
                V0: UpstreamStatus(500, b"oops", None),
                OAI: OLLAMA,
            },
            "openai",
            [V1, V0, TAGS, OAI],
            ["llama3.2:latest", "nomic-embed-text:latest"],
        ),
    ],
    ids=[
        "lmstudio-0.4",
        "lmstudio-0.3",
        "llama.cpp",
        "vllm",
        "native-paths-answer-openai",
        "native-errors",
    ],
)
async def test_reader_probes_dialects_in_order_and_remembers(answers, dialect, first_calls, ids):
    """The richest dialect that answers is used, and the next read asks only for it."""
    clock = FakeClock(50.0)
    get_json = FakeGetJson(answers)
    reader = ModelListReader(get_json, clock)
    models = await reader.read()
    assert get_json.calls == first_calls
    assert (models.dialect, reader.dialect) == (dialect, dialect)
    assert models.ids() == ids
    assert models.fetched_at == 50.0

    get_json.calls.clear()
    clock.advance(10.0)
    again = await reader.read()
    remembered = {"lmstudio-v1": V1, "lmstudio-v0": V0, "openai": OAI}[dialect]
    assert get_json.calls == first_calls[first_calls.index(remembered) :]
    assert again.fetched_at == 60.0


async def test_reader_falls_back_when_the_remembered_dialect_goes_away():
    """If the remembered dialect stops answering (server swapped), the others are tried in order."""
    get_json = FakeGetJson({V1: LMSTUDIO_V1})
    reader = ModelListReader(get_json, FakeClock())
    await reader.read()
    get_json.answers = {OAI: LLAMA_CPP}
    get_json.calls.clear()
    models = await reader.read()
    assert get_json.calls == [V1, V0, TAGS, OAI, PROPS]
    assert reader.dialect == "openai"
    assert models.ids() == ["smollm2"]

    get_json.answers = {V0: LMSTUDIO_V0}
    get_json.calls.clear()
    await reader.read()
    assert get_json.calls == [OAI, V1, V0]
    assert reader.dialect == "lmstudio-v0"


async def test_reader_raises_the_last_status_when_nothing_answers():
    """When every path fails with a status, the last one is raised."""
    get_json = FakeGetJson(
        {OAI: UpstreamStatus(401, b'{"error": "Invalid API key"}', "application/json")}
    )
    reader = ModelListReader(get_json, FakeClock())
    with pytest.raises(UpstreamStatus) as info:
        await reader.read()
    assert info.value.status == 401
    assert info.value.message == "Invalid API key"
    assert get_json.calls == [V1, V0, TAGS, OAI]
    assert reader.dialect is None


async def test_reader_unreadable_lists():
    """Answers that no parser understands give an UpstreamError saying so."""
    get_json = FakeGetJson({V1: {"what": 1}, V0: [], OAI: "nope"})
    with pytest.raises(UpstreamError, match="model list lmbridge cannot read"):
        await ModelListReader(get_json, FakeClock()).read()


async def test_reader_connection_errors_are_not_dialect_probes():
    """A connection failure is raised at once, without trying the other paths."""
    get_json = FakeGetJson({V1: UpstreamUnavailable("connection refused")})
    with pytest.raises(UpstreamUnavailable):
        await ModelListReader(get_json, FakeClock()).read()
    assert get_json.calls == [V1]


async def test_reader_with_catalog():
    """A catalog reading through a ModelListReader makes one call per refresh."""
    clock = FakeClock()
    get_json = FakeGetJson({OAI: LLAMA_CPP})
    reader = ModelListReader(get_json, clock)
    catalog = ModelCatalog(ModelsConfig(cache_ttl=10.0), reader.read, clock=clock)
    assert (await catalog.resolve(None)).id == "smollm2"
    assert (await catalog.resolve("SmolLM2-135M-Instruct")).id == "smollm2"
    clock.advance(10.0)
    await catalog.get()
    assert get_json.calls == [V1, V0, TAGS, OAI, PROPS, OAI, PROPS]


@pytest.mark.parametrize(
    ("props", "tools"),
    [
        ({"chat_template_caps": {"supports_tools": False}}, False),
        ({"chat_template_caps": {"supports_tools": True}}, True),
        ({"chat_template_caps": {}}, None),
        ({"chat_template": "..."}, None),  # an older llama.cpp
        ([], None),
        (not_found(PROPS), None),
    ],
)
async def test_reader_takes_tool_support_from_llama_cpp_props(props, tools):
    """llama.cpp's /props says whether the chat template renders tools; anything else
    there leaves it unknown."""
    reader = ModelListReader(FakeGetJson({OAI: LLAMA_CPP, PROPS: props}), FakeClock())
    (model,) = (await reader.read()).models
    assert model.tools is tools
    assert (model.tools_note() is not None) is (tools is False)


@pytest.mark.parametrize(
    ("props", "parallel"),
    [
        ({"total_slots": 4}, 4),
        ({"total_slots": 1, "chat_template_caps": {}}, 1),
        ({"total_slots": 0}, None),
        ({"total_slots": "4"}, None),
        ({"total_slots": True}, None),
        ({}, None),
        (not_found(PROPS), None),
    ],
)
async def test_reader_takes_parallel_slots_from_llama_cpp_props(props, parallel):
    """llama.cpp's /props says how many requests it runs at once (total_slots), the
    default of the model's max_concurrent; anything else there leaves it unknown."""
    reader = ModelListReader(FakeGetJson({OAI: LLAMA_CPP, PROPS: props}), FakeClock())
    (model,) = (await reader.read()).models
    assert model.parallel == parallel


def test_lm_studio_models_run_four_at_once():
    """LM Studio's lists do not say a model's Max Concurrent Predictions: its default, 4."""
    for model in [*(parse_lmstudio_v1(LMSTUDIO_V1) or []), *(parse_lmstudio_v0(LMSTUDIO_V0) or [])]:
        assert model.parallel == LMSTUDIO_PARALLEL == 4
    assert all(m.parallel is None for m in parse_openai(VLLM) or [])


async def test_reader_asks_only_a_one_model_llama_cpp_for_props():
    """Other servers, and llama.cpp's router with several models, are not asked."""
    router = {
        "object": "list",
        "data": [
            {"id": "a", "object": "model", "owned_by": "llamacpp"},
            {"id": "b", "object": "model", "owned_by": "llamacpp"},
        ],
    }
    for listing in (VLLM, OLLAMA, router):
        get_json = FakeGetJson({OAI: listing, PROPS: {"chat_template_caps": {}}})
        await ModelListReader(get_json, FakeClock()).read()
        assert PROPS not in get_json.calls


async def test_reader_propagates_an_upstream_that_went_down_at_props():
    """The upstream failing between the list and /props is the upstream being down."""
    get_json = FakeGetJson({OAI: LLAMA_CPP, PROPS: UpstreamUnavailable("down")})
    with pytest.raises(UpstreamUnavailable):
        await ModelListReader(get_json, FakeClock()).read()


@pytest.mark.parametrize(
    ("kind", "calls"),
    [
        ("vllm", [OAI]),
        ("ollama", [TAGS, OAI]),
        ("openai", [OAI]),
        ("llamacpp", [OAI, "/props"]),
        ("lmstudio", [V1, V0, OAI]),
    ],
)
async def test_the_kind_of_upstream_narrows_the_lists_asked_for(kind, calls):
    """upstream.kind: a vLLM or OpenAI server is asked for /v1/models only; Ollama for
    /api/tags first; a llama.cpp server for /props too, whoever it says owns its model."""
    get_json = FakeGetJson({OAI: {"data": [{"id": "m", "owned_by": "someone"}]}})
    reader = ModelListReader(get_json, FakeClock(), kind=kind)
    assert (await reader.read()).ids() == ["m"]
    assert get_json.calls == calls
