"""llama.cpp's router's load, read back from its list: a stale first read, a child that
died, a model never ready within the upstream's timeout."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from proxy.errors import UpstreamError
from proxy.model_control import LlamaRouterControl
from proxy.model_records import ModelInfo, ModelList


def lists(*statuses: str, load_error: str | None = None) -> Any:
    """A read_list that answers one list per call, with the model in each status."""
    answers = [
        ModelList.build([ModelInfo(id="m", status=s, load_error=load_error)], "llamacpp-router", 0)
        for s in statuses
    ]
    calls: list[int] = []

    async def read() -> ModelList:
        calls.append(1)
        return answers[min(len(calls), len(answers)) - 1]

    read.calls = calls  # type: ignore[attr-defined]
    return read


def upstream(timeout: float = 600.0) -> Any:
    return SimpleNamespace(config=SimpleNamespace(first_byte_timeout=timeout))


async def test_a_read_begun_before_the_load_is_read_again():
    """unloaded, then loading, then loaded: the first read predated the load call."""
    read = lists("unloaded", "loading", "loaded")
    await LlamaRouterControl().wait_loaded(upstream(), "m", read)
    assert len(read.calls) == 3


@pytest.mark.parametrize(
    ("statuses", "error", "message"),
    [
        (("loading", "failed"), "the model's process exited with code 1", "exited with code 1"),
        (("unloaded", "unloaded"), None, "reports the model unloaded"),
        (("downloading", "downloading"), None, "reports the model downloading"),
    ],
)
async def test_a_load_that_ends_without_the_model(statuses, error, message):
    """A child that died (its exit code), a model unloaded meanwhile: the reason."""
    with pytest.raises(UpstreamError, match=message):
        await LlamaRouterControl().wait_loaded(upstream(), "m", lists(*statuses, load_error=error))


async def test_a_model_never_ready_fails_at_the_upstream_timeout():
    """Still loading at first_byte_timeout: a failure naming the setting."""
    with pytest.raises(UpstreamError, match="first_byte_timeout"):
        await LlamaRouterControl().wait_loaded(upstream(0.0), "m", lists("loading"))


async def test_a_model_gone_from_the_list():
    """The model left the list (the router's models were reloaded): a failure."""

    async def read() -> ModelList:
        return ModelList.build([], "llamacpp-router", 0)

    with pytest.raises(UpstreamError, match="no longer listed"):
        await LlamaRouterControl().wait_loaded(upstream(), "m", read)
