"""Fixtures of the integration tests that need the daemon's own listener."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from proxy.app import create_app
from proxy.serve import listening

Serve = Callable[..., Awaitable[int]]


@pytest.fixture
async def serve(make_config: Any) -> AsyncIterator[Serve]:
    """Start the app behind lmbridge's listener (as ``lmbridge serve`` does) on a free port
    of 127.0.0.1, with the given settings (``server__header_timeout=0.2``); returns the
    port. aiohttp_client's server would bypass the listener."""
    async with contextlib.AsyncExitStack() as stack:

        async def start(**overrides: Any) -> int:
            config = make_config(server__port=0, **overrides)
            runner = await stack.enter_async_context(listening(create_app(config), config.server))
            return int(runner.addresses[0][1])

        yield start
