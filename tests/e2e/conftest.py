"""The daemon as a separate process, started with the real command line of the
installed product (``tests/e2e/installed.py``)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.installed import Installation, install

pytestmark = pytest.mark.e2e

_installation: Installation | None = None


@pytest.fixture(scope="session", autouse=True)
def installation(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Installation:
    """The wheel of this checkout installed with pipx, once per session, for every e2e test."""
    global _installation
    if _installation is None:
        _installation = install(tmp_path_factory.mktemp("installed"))
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capture = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is not None and capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line(
                    f"\ne2e: {_installation.wheel.name} installed with pipx; tests run "
                    f"{_installation.command} (proxy imported from "
                    f"{_installation.origin.parent})"
                )
    return _installation


def lmbridge() -> str:
    """The installed ``lmbridge`` command."""
    assert _installation is not None, "the installation fixture runs before every e2e test"
    return str(_installation.command)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment for a child: no LMBRIDGE_* of the developer, a private home."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMBRIDGE_")}
    env.update(
        HOME=str(tmp_path / "home"),
        XDG_DATA_HOME=str(tmp_path / "data"),
        XDG_CONFIG_HOME=str(tmp_path / "config"),
        # Keep the real cache: the embedded model is fetched once, not per test.
        XDG_CACHE_HOME=os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache")),
    )
    env.update(extra)
    return env


@dataclass
class Daemon:
    process: asyncio.subprocess.Process
    url: str
    log_path: Path

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), 30)


async def wait_healthy(url: str, process: asyncio.subprocess.Process, within: float) -> None:
    deadline = asyncio.get_running_loop().time() + within
    async with aiohttp.ClientSession() as session:
        while asyncio.get_running_loop().time() < deadline:
            if process.returncode is not None:
                raise RuntimeError(f"the daemon exited with {process.returncode}")
            try:
                async with session.get(url + "/healthz") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise TimeoutError(f"{url} did not become healthy in {within}s")


StartDaemon = Callable[..., Any]


@pytest.fixture
async def start_daemon(tmp_path: Path) -> AsyncIterator[StartDaemon]:
    """Start ``lmbridge serve`` with the given arguments; stopped at the end of the test."""
    started: list[Daemon] = []

    async def start(
        *args: str,
        config: str | None = None,
        ready_within: float = 30.0,
        env: dict[str, str] | None = None,
        command: str | None = None,
        port: int | None = None,
    ) -> Daemon:
        port = port or free_port()
        argv = [
            command or lmbridge(),
            "serve",
            "--port",
            str(port),
            "--db",
            str(tmp_path / f"daemon-{port}.db"),
            *args,
        ]
        if config is not None:
            path = tmp_path / f"config-{port}.toml"
            path.write_text(config)
            argv += ["--config", str(path)]
        log_path = tmp_path / f"daemon-{port}.log"
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env or clean_env(tmp_path),
                cwd=tmp_path,
            )
        daemon = Daemon(process, f"http://127.0.0.1:{port}", log_path)
        started.append(daemon)
        try:
            await wait_healthy(daemon.url, process, ready_within)
        except Exception as exc:
            raise RuntimeError(f"{exc}; daemon log:\n{daemon.log()}") from exc
        return daemon

    yield start
    for daemon in started:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()
