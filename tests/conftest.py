"""Shared fixtures: a scripted fake upstream, configs, and the proxy under test."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from proxy.app import create_app
from proxy.config import Config, load_config
from tests.fake_upstream import FakeUpstream

# Keep the suite away from the developer's own configuration.
os.environ.pop("LMBRIDGE_CONFIG", None)
for _name in [n for n in os.environ if n.startswith("LMBRIDGE_")]:
    os.environ.pop(_name)

MakeConfig = Callable[..., Config]
MakeProxy = Callable[..., Awaitable[TestClient]]


@pytest.fixture
async def fake_upstream(aiohttp_server: Any) -> FakeUpstream:
    """A fresh fake upstream on 127.0.0.1 for this test."""
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def make_config(tmp_path: Path, fake_upstream: FakeUpstream) -> MakeConfig:
    """Build a Config pointing at the fake upstream; keyword args are dotted overrides
    written with double underscores (``upstream__retry_attempts=1``)."""

    def make(**overrides: Any) -> Config:
        flags: dict[str, Any] = {
            "upstream.url": fake_upstream.url,
            "storage.path": str(tmp_path / "lmbridge.db"),
            "upstream.retry_backoff": 0.001,
            "upstream.retry_backoff_max": 0.01,
        }
        for key, value in overrides.items():
            flags[key.replace("__", ".")] = value
        # The process environment (LMBRIDGE_* removed above) so that env:VAR secrets
        # set with monkeypatch resolve.
        return load_config(os.devnull, flags=flags, environ=dict(os.environ))

    return make


@pytest.fixture
def make_proxy(aiohttp_client: Any, make_config: MakeConfig) -> MakeProxy:
    """Start the proxy app (a real aiohttp server on 127.0.0.1) and return its client."""

    async def make(config: Config | None = None, **overrides: Any) -> TestClient:
        app = create_app(config or make_config(**overrides))
        return await aiohttp_client(app)

    return make


@pytest.fixture
async def proxy(make_proxy: MakeProxy) -> TestClient:
    return await make_proxy()
