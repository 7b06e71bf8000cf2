"""`lmbridge ps`, `load` and `unload` as a user runs them: the installed command against
the daemon of the same configuration, in front of the fake upstream speaking LM Studio
0.4's native API."""

from __future__ import annotations

import json

import pytest

from tests.e2e.conftest import clean_env, free_port
from tests.e2e.test_cli import run_cli, write

pytestmark = pytest.mark.e2e


async def test_ps_load_unload_against_the_running_daemon(tmp_path, start_daemon, fake_upstream):
    """load with a ttl, ps as a table and as JSON, unload; the key comes from the
    configuration; an unknown model is one line on stderr and exit status 1."""
    native = fake_upstream.native_lmstudio(["qwen3-4b", "gemma"], loaded=("gemma",))
    port = free_port()
    config = write(
        tmp_path,
        f'[server]\nport = {port}\n[upstream]\nurl = "{fake_upstream.url}"\n'
        '[auth]\napi_keys = ["sk-local"]\n',
    )
    env = clean_env(tmp_path, LMBRIDGE_CONFIG=config)
    await start_daemon(env=env, port=port)

    code, out, err = await run_cli(tmp_path, "load", "qwen3-4b", "--ttl", "30m", env=env)
    assert code == 0, err
    assert out.startswith("qwen3-4b loaded in ") and out.endswith("(by lmbridge)\n")
    assert native.loads == [{"model": "qwen3-4b"}]

    code, out, err = await run_cli(tmp_path, "ps", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == [
        "MODEL",
        "STATE",
        "LOADED",
        "BY",
        "IDLE",
        "TTL",
        "RUNNING",
        "QUEUED",
    ]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert rows["qwen3-4b"][1:3] == ["loaded", "lmbridge"]
    assert rows["qwen3-4b"][4] == "1800s"
    assert rows["gemma"][1:3] == ["loaded", "upstream"]

    code, out, err = await run_cli(tmp_path, "ps", "--json", env=env)
    assert code == 0, err
    assert {e["model"] for e in json.loads(out)["data"]} == {"qwen3-4b", "gemma"}

    code, out, err = await run_cli(tmp_path, "unload", "gemma", env=env)
    assert code == 0, err
    assert out == "gemma unloaded\n"
    assert native.unloads == ["gemma"]

    code, out, err = await run_cli(tmp_path, "unload", "nope", env=env)
    assert code == 1
    assert err.startswith("lmbridge: The model 'nope' does not exist upstream.")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def test_ps_without_a_daemon_says_so(tmp_path):
    """No daemon listening: one line naming where it was looked for, exit status 1."""
    port = free_port()
    env = clean_env(tmp_path, LMBRIDGE_SERVER_PORT=str(port))
    code, _, err = await run_cli(tmp_path, "ps", env=env)
    assert code == 1
    assert f"lmbridge is not reachable at http://127.0.0.1:{port}" in err
