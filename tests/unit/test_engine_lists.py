"""The model lists of llama.cpp's router mode and of Ollama: the pure readers with good
and malformed input (never an exception, None for a list that is not theirs), and the
reader that tells the servers apart."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.catalog import ModelListReader
from proxy.errors import UpstreamUnavailable
from proxy.model_control import LOADING_DIALECTS, control_for
from proxy.model_records import (
    ModelInfo,
    is_router_list,
    parse_llamacpp_router,
    parse_ollama,
)
from tests.clock import FakeClock
from tests.unit.test_catalog import OAI, TAGS, V0, V1, FakeGetJson

PS = "/api/ps"

# llama.cpp's router (tools/server/server-models.cpp, GET /models and /v1/models).
ROUTER = {
    "object": "list",
    "data": [
        {
            "id": "ggml-org/gemma-3-4b-it-GGUF:Q4_K_M",
            "aliases": ["gemma"],
            "tags": [],
            "object": "model",
            "owned_by": "llamacpp",
            "created": 1,
            "status": {"value": "loaded", "args": ["llama-server", "-c", "4096"]},
            "architecture": {"input_modalities": ["text", "image"], "output_modalities": ["text"]},
        },
        {"id": "b", "status": {"value": "loading", "args": []}},
        {"id": "c", "status": {"value": "unloaded"}},
        {"id": "d", "status": {"value": "unloaded", "failed": True, "exit_code": 1}},
        {"id": "e", "status": {"value": "sleeping"}},
        {"id": "f", "status": {"value": "downloading", "progress": {}}},
    ],
}

TAGS_LIST = {
    "models": [
        {"name": "llama3.2:latest", "model": "llama3.2:latest", "details": {"family": "llama"}},
        {"name": "qwen3:4b", "model": "qwen3:4b"},
    ]
}
PS_LIST = {
    "models": [
        {
            "name": "qwen3:4b",
            "model": "qwen3:4b",
            "expires_at": "2026-06-04T14:38:31.83753-07:00",
            "size_vram": 5137025024,
            "context_length": 8192,
        }
    ]
}


def test_parse_llamacpp_router():
    """Each status as the router reports it; loaded, loading and sleeping are running
    (an instance to unload), a failed load keeps its exit code as the reason."""
    models = parse_llamacpp_router(ROUTER)
    assert models is not None
    by_id = {m.id: m for m in models}
    gemma = by_id["ggml-org/gemma-3-4b-it-GGUF:Q4_K_M"]
    assert (gemma.status, gemma.state, gemma.vision) == ("loaded", "loaded", True)
    assert gemma.aliases == ("gemma",) and gemma.instances == (gemma.id,)
    assert [by_id[k].status for k in "bcdef"] == [
        "loading",
        "unloaded",
        "failed",
        "sleeping",
        "downloading",
    ]
    assert by_id["d"].load_error == ("the model's process exited with code 1 before it was ready")
    assert by_id["c"].instances == () and by_id["c"].state == "not-loaded"


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        "nope",
        {"data": "nope"},
        {"data": [{"id": "m"}]},  # a server of one model: no status
        {"data": [{"id": "m", "status": "loaded"}]},  # not an object
        {"data": [1, None, "x"]},
    ],
)
def test_parse_llamacpp_router_refuses_other_lists(data: Any):
    """Anything but the router's list is None, never an exception."""
    assert parse_llamacpp_router(data) is None
    assert not is_router_list(data)


@pytest.mark.parametrize(
    "entry",
    [
        {"id": "m", "status": {}},
        {"id": "m", "status": {"value": 3}},
        {"id": "m", "status": {"value": "unloaded", "failed": True}},
        {"id": "m", "status": {"value": "unloaded", "failed": True, "exit_code": "x"}},
        {"id": 5, "status": {"value": "loaded"}},
    ],
)
def test_parse_llamacpp_router_malformed_entries(entry: dict[str, Any]):
    """Odd entries are read as far as they go or left out, never an exception."""
    models = parse_llamacpp_router({"data": [entry, {"id": "ok", "status": {"value": "loaded"}}]})
    assert models is not None
    assert models[-1].id == "ok"
    for model in models[:-1]:
        control = control_for("llamacpp-router")
        assert control is not None and not control.is_loaded(model)


def test_parse_ollama():
    """/api/tags lists the local models, /api/ps the loaded ones (with their context);
    a name ending in :latest can be asked for without it."""
    models = parse_ollama(TAGS_LIST, PS_LIST)
    assert models == [
        ModelInfo(
            id="llama3.2:latest",
            state="not-loaded",
            owned_by="ollama",
            aliases=("llama3.2",),
        ),
        ModelInfo(
            id="qwen3:4b",
            state="loaded",
            context_length=8192,
            owned_by="ollama",
            instances=("qwen3:4b",),
        ),
    ]


def test_parse_ollama_without_ps():
    """/api/ps unreadable: the models are known, whether they are loaded is not."""
    models = parse_ollama(TAGS_LIST, None)
    assert models is not None
    assert [m.state for m in models] == ["unknown", "unknown"]


def test_parse_ollama_lists_a_loaded_model_missing_from_tags():
    """A model /api/ps shows but /api/tags does not is listed, loaded."""
    models = parse_ollama({"models": []}, PS_LIST)
    assert models is not None and [(m.id, m.state) for m in models] == [("qwen3:4b", "loaded")]


@pytest.mark.parametrize(
    ("tags", "ps", "ids"),
    [
        (None, PS_LIST, None),
        ({"data": []}, PS_LIST, None),
        ({"models": "x"}, PS_LIST, None),
        ({"models": [1, None, {"name": 3}, {"model": "m:1"}, {"name": ""}]}, "x", ["m:1"]),
        ({"models": [{"name": "a:1"}, {"name": "a:1"}]}, {"models": [5, {"name": None}]}, ["a:1"]),
        (TAGS_LIST, {"models": {"qwen3:4b": 1}}, ["llama3.2:latest", "qwen3:4b"]),
    ],
)
def test_parse_ollama_malformed(tags: Any, ps: Any, ids: list[str] | None):
    """Not Ollama's list: None; odd entries left out; never an exception."""
    models = parse_ollama(tags, ps)
    assert (None if models is None else [m.id for m in models]) == ids


def test_the_three_loading_dialects():
    """LM Studio 0.4, llama.cpp's router and Ollama load on request; nothing else does."""
    assert {"lmstudio-v1", "llamacpp-router", "ollama"} == LOADING_DIALECTS
    assert control_for("openai") is None and control_for(None) is None
    assert control_for("lmstudio-v0") is None


# --- telling the servers apart -----------------------------------------------------


@pytest.mark.parametrize("kind", ["auto", "llamacpp"])
async def test_the_reader_recognises_llama_cpp_s_router(kind: str):
    """A /v1/models whose entries carry a status is the router's; no /props is read, and
    the next read asks for /v1/models alone."""
    get_json = FakeGetJson({OAI: ROUTER})
    reader = ModelListReader(get_json, FakeClock(), kind=kind)
    listed = await reader.read()
    assert listed.dialect == reader.dialect == "llamacpp-router"
    assert "/props" not in get_json.calls
    get_json.calls.clear()
    await reader.read()
    assert get_json.calls == [OAI]


@pytest.mark.parametrize("kind", ["vllm", "openai", "lmstudio"])
async def test_other_kinds_read_a_status_list_as_a_plain_one(kind: str):
    """A vLLM, OpenAI or LM Studio upstream is never taken for a router."""
    reader = ModelListReader(FakeGetJson({OAI: ROUTER}), FakeClock(), kind=kind)
    assert (await reader.read()).dialect == "openai"


@pytest.mark.parametrize("kind", ["auto", "ollama"])
async def test_the_reader_recognises_ollama(kind: str):
    """/api/tags answers: Ollama, with /api/ps read beside it on every refresh."""
    get_json = FakeGetJson({TAGS: TAGS_LIST, PS: PS_LIST, OAI: {"data": []}})
    reader = ModelListReader(get_json, FakeClock(), kind=kind)
    listed = await reader.read()
    assert listed.dialect == "ollama"
    assert listed.by_name["qwen3:4b"].state == "loaded"
    assert get_json.calls[-2:] == [TAGS, PS]
    get_json.calls.clear()
    await reader.read()
    assert get_json.calls == [TAGS, PS]


async def test_ollama_falls_back_to_v1_models():
    """kind ollama on a server without /api/tags: /v1/models, as before."""
    get_json = FakeGetJson({OAI: {"data": [{"id": "m"}]}})
    reader = ModelListReader(get_json, FakeClock(), kind="ollama")
    assert (await reader.read()).dialect == "openai"
    assert get_json.calls == [TAGS, OAI]


async def test_ollama_s_ps_failing_leaves_the_state_unknown():
    """/api/ps answering 404 or junk: the models are listed, their state unknown; the
    upstream going down there is the upstream down."""
    reader = ModelListReader(FakeGetJson({TAGS: TAGS_LIST}), FakeClock(), kind="ollama")
    listed = await reader.read()
    assert {m.state for m in listed.models} == {"unknown"}
    down = FakeGetJson({TAGS: TAGS_LIST, PS: UpstreamUnavailable("down")})
    with pytest.raises(UpstreamUnavailable):
        await ModelListReader(down, FakeClock(), kind="ollama").read()


async def test_auto_probes_lm_studio_then_ollama_then_v1_models():
    """auto: LM Studio's lists, then Ollama's, then /v1/models."""
    get_json = FakeGetJson({OAI: ROUTER})
    await ModelListReader(get_json, FakeClock()).read()
    assert get_json.calls == [V1, V0, TAGS, OAI]
