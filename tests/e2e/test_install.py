"""Installed the way users install it: the wheel holds the whole program, and the
README's recommended ``pipx install .`` gives a ``lmbridge serve`` that starts."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import aiohttp
import pytest

from proxy import __version__
from tests.e2e.conftest import clean_env, free_port, wait_healthy
from tests.e2e.installed import (
    ROOT,
    Installation,
    checkout_files,
    copy_of_checkout,
    pipx_install,
    wheel_names,
)

pytestmark = pytest.mark.e2e


def test_the_wheel_holds_every_file_of_the_program(installation: Installation):
    """Every module and data file under proxy/ and storage/ is in the wheel, and nothing
    else of the program (a module deleted since an earlier build)."""
    names = wheel_names(installation.wheel)
    files = checkout_files()
    assert "proxy/mcp/servers.py" in files  # the module whose absence once broke every install
    missing = [f for f in files if f not in names]
    assert not missing, f"the wheel lacks {missing}"
    program = {n for n in names if n.startswith(("proxy/", "storage/"))}
    extra = sorted(program - set(files))
    assert not extra, f"the wheel holds files the checkout does not: {extra}"


def test_the_tests_run_the_installed_program_not_the_checkout(installation: Installation):
    """The command the e2e tests run imports lmbridge from its own virtualenv."""
    assert not installation.origin.is_relative_to(ROOT)
    assert installation.origin.is_relative_to(installation.python.parent.parent)
    version = subprocess.run(
        [str(installation.command), "--version"], capture_output=True, text=True, check=True
    )
    assert version.stdout.strip() == f"lmbridge {__version__}"


async def test_pipx_install_from_the_source_tree_then_serve(tmp_path: Path):
    """`pipx install .` then `lmbridge serve`, as the README says: it serves, says how to
    start an upstream that is not running, and stops cleanly on SIGTERM."""
    source = copy_of_checkout(tmp_path / "lmbridge")
    command = await asyncio.to_thread(pipx_install, ".", tmp_path / "pipx", cwd=source)
    port = free_port()
    env = clean_env(
        tmp_path,
        LMBRIDGE_SERVER_PORT=str(port),
        LMBRIDGE_UPSTREAM_URL=f"http://127.0.0.1:{free_port()}",
    )
    process = await asyncio.create_subprocess_exec(
        str(command),
        "serve",
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await wait_healthy(url, process, 30)
        async with aiohttp.ClientSession() as session, session.get(url + "/v1/models") as resp:
            assert resp.status == 502
            assert "lms server start" in (await resp.json())["error"]["message"]
        process.terminate()
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stdout is not None
    log = (await process.stdout.read()).decode()
    assert "Traceback" not in log
    assert f"lmbridge listening on {url}" in log
    # The database went where the user's data goes, not into the source tree.
    assert (tmp_path / "data" / "lmbridge" / "lmbridge.db").exists()
