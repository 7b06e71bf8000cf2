"""The command line: check-config, models, and the failures an operator can cause."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
import subprocess
import tomllib
from pathlib import Path

import pytest
from openai import AsyncOpenAI

from tests.e2e.conftest import clean_env, free_port, lmbridge

pytestmark = pytest.mark.e2e


async def run_cli(
    tmp_path: Path,
    *args: str,
    env: dict[str, str] | None = None,
    within: float = 60,
) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        lmbridge(),
        *args,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env or clean_env(tmp_path),
        cwd=tmp_path,
    )
    out, err = await asyncio.wait_for(process.communicate(), within)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "lmbridge.toml"
    path.write_text(text)
    return str(path)


async def test_check_config_prints_the_effective_config_with_secrets_masked(tmp_path):
    """Flags beat the environment, which beats the file; secrets never appear."""
    config = write(
        tmp_path,
        '[server]\nport = 2000\n[upstream]\napi_key = "env:LM_TOKEN"\n'
        '[models]\naliases = { "gpt-4o" = "qwen3" }\n',
    )
    env = clean_env(
        tmp_path,
        LM_TOKEN="super-secret-token",
        LMBRIDGE_SERVER_PORT="3000",
        LMBRIDGE_UPSTREAM_URL="http://127.0.0.1:9999/v1",
    )
    code, out, err = await run_cli(
        tmp_path, "check-config", "--config", config, "--host", "127.0.0.2", env=env
    )
    assert code == 0, err
    effective = tomllib.loads(out)
    assert effective["server"]["port"] == 3000
    assert effective["server"]["host"] == "127.0.0.2"
    assert effective["upstream"]["url"] == "http://127.0.0.1:9999"
    assert effective["upstream"]["api_key"] == "********"
    assert effective["models"]["aliases"] == {"gpt-4o": "qwen3"}
    assert "super-secret-token" not in out + err


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("[upstream]\nurll = 'http://x'\n", "upstream.urll: unknown key"),
        ("[servr]\nport = 1\n", "servr: unknown section"),
        ("[server]\nport = 'high'\n", "server.port:"),
        ("[server]\nport = 70000\n", "server.port:"),
        ("[upstream]\nidle_timeout = 'soon'\n", "upstream.idle_timeout: not a duration"),
        ("[upstream]\nurl = 'localhost:1234'\n", "upstream.url: must be an http"),
        ("[upstream]\napi_key = 'env:LMB_NOT_SET_ANYWHERE'\n", "LMB_NOT_SET_ANYWHERE is not set"),
        ("[server\nport = 1\n", "invalid TOML"),
    ],
)
async def test_bad_config_exits_2_with_one_readable_line(tmp_path, text, fragment):
    """A typo, a bad value or bad TOML: exit status 2, one line naming the problem."""
    code, _, err = await run_cli(tmp_path, "check-config", "--config", write(tmp_path, text))
    assert code == 2
    assert fragment in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


async def test_unknown_environment_variable_is_an_error(tmp_path):
    """A misspelt LMBRIDGE_* variable is not silently ignored."""
    env = clean_env(tmp_path, LMBRIDGE_UPSTREAM_URLL="http://127.0.0.1:1")
    code, _, err = await run_cli(tmp_path, "check-config", env=env)
    assert code == 2
    assert "LMBRIDGE_UPSTREAM_URLL" in err


async def test_missing_config_file(tmp_path):
    """A --config that does not exist is exit 2 with its path."""
    code, _, err = await run_cli(tmp_path, "check-config", "--config", str(tmp_path / "nope"))
    assert code == 2
    assert "no such file" in err


async def test_models_prints_a_table(tmp_path, fake_upstream):
    """`lmbridge models` lists id, type, state and context length from LM Studio's list."""
    fake_upstream.lmstudio_v0 = {
        "object": "list",
        "data": [
            {"id": "qwen3-4b", "type": "llm", "state": "loaded", "max_context_length": 32768},
            {"id": "nomic-embed", "type": "embeddings", "state": "not-loaded"},
        ],
    }
    code, out, err = await run_cli(tmp_path, "models", "--upstream", fake_upstream.url)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "TYPE", "STATE", "CONTEXT", "TOOLS", "PROFILE"]
    assert lines[1].split() == [
        "qwen3-4b",
        *("llm", "loaded", "32768", "-"),
        *("think", "<think>,", "reasoning", "drop"),
    ]
    assert lines[2].split() == ["nomic-embed", "embeddings", "not-loaded", "-", "-", "-"]
    assert lines[3] == f"(2 model(s) listed by the upstream at {fake_upstream.url})"


async def test_models_shows_what_the_running_daemon_serves(tmp_path, start_daemon, fake_upstream):
    """With the daemon of the same configuration running, `lmbridge models` lists what it
    serves: its aliases too, and whether a model's template can render tools."""
    fake_upstream.llama_props = {"chat_template_caps": {"supports_tools": False}}
    port = free_port()
    config = write(
        tmp_path,
        f'[server]\nport = {port}\n[upstream]\nurl = "{fake_upstream.url}"\n'
        '[models]\naliases = { "gpt-4o-mini" = "test-model" }\n'
        '[models."test-*"]\nreasoning_in_history = "keep"\n'
        '[auth]\napi_keys = ["sk-local"]\n',
    )
    env = clean_env(tmp_path, LMBRIDGE_CONFIG=config)
    await start_daemon(env=env, port=port)
    code, out, err = await run_cli(tmp_path, "models", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[0] == "test-model"
    assert "no (template drops them)" in lines[1]
    # The profile in effect: detected (tools described), then the table over it.
    assert lines[1].endswith("think <think>, reasoning keep, tools described")
    assert lines[2].startswith("gpt-4o-mini (alias of test-model)")
    assert lines[3] == f"(2 model(s) served by lmbridge at http://127.0.0.1:{port})"


async def test_models_when_the_daemon_is_not_running(tmp_path, fake_upstream):
    """No daemon: the upstream's own list, saying so; with embedded.enabled, where the
    model runs instead."""
    port = free_port()
    env = clean_env(
        tmp_path, LMBRIDGE_SERVER_PORT=str(port), LMBRIDGE_UPSTREAM_URL=fake_upstream.url
    )
    code, out, err = await run_cli(tmp_path, "models", env=env)
    assert code == 0, err
    assert out.splitlines()[-1] == (
        f"(1 model(s) listed by the upstream at {fake_upstream.url}; lmbridge is not "
        f"running at http://127.0.0.1:{port})"
    )
    code, out, err = await run_cli(
        tmp_path, "models", env={**env, "LMBRIDGE_EMBEDDED_ENABLED": "true"}
    )
    assert code == 1
    assert "`lmbridge serve --embedded`" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["models", "--embedded"], "unrecognized arguments: --embedded"),
        (["gc", "--upstream", "http://x"], "unrecognized arguments: --upstream"),
        (["mcp-list", "--port", "1"], "unrecognized arguments: --port"),
        (["mcp", "--upstream", "http://127.0.0.1:1"], "only apply with --standalone"),
    ],
)
async def test_flags_that_would_do_nothing_are_refused(tmp_path, args, fragment):
    """A command refuses a flag it would ignore, exit 2."""
    code, _, err = await run_cli(tmp_path, *args)
    assert code == 2
    assert fragment in err


async def test_check_config_reports_every_problem_at_once(tmp_path):
    """check-config prints each problem on its own line, exit 2."""
    config = write(tmp_path, '[server]\nport = "high"\nhots = 1\n[upstream]\nurl = "ftp://x"\n')
    code, _, err = await run_cli(tmp_path, "check-config", "--config", config)
    assert code == 2
    lines = err.splitlines()
    assert [line.split(":")[1].strip() for line in lines] == ["configuration error"] * 3
    assert [line.split(": ")[2].split(":")[0] for line in lines] == [
        "server.port",
        "server.hots",
        "upstream.url",
    ]


async def test_models_with_no_upstream(tmp_path):
    """`lmbridge models` without an upstream says how to start one, exit 1."""
    code, _, err = await run_cli(
        tmp_path, "models", "--upstream", f"http://127.0.0.1:{free_port()}"
    )
    assert code == 1
    assert "lms server start" in err
    assert "Traceback" not in err


async def test_port_in_use_is_one_line(tmp_path):
    """Serving on a port that is taken fails with one line, exit 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, _, err = await run_cli(
            tmp_path, "serve", "--port", str(port), "--db", str(tmp_path / "x.db")
        )
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err
    assert "Traceback" not in err


async def test_unusable_database_path_is_one_line(tmp_path):
    """A database path that cannot be created fails with one line, exit 1."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = await run_cli(
        tmp_path, "serve", "--port", str(free_port()), "--db", str(blocker / "sub" / "x.db")
    )
    assert code == 1
    assert "cannot open the database" in err
    assert "Traceback" not in err


async def test_gc_purges_by_the_retention_in_force(tmp_path, start_daemon, fake_upstream):
    """`lmbridge gc` applies the current responses.retention to everything stored: after
    lowering it, what is now too old is purged, and gc says how much."""
    db = tmp_path / "gc.db"
    daemon = await start_daemon("--upstream", fake_upstream.url, "--db", str(db))
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(
                daemon.base_url + "/responses", json={"model": "test-model", "input": "x"}
            ) as resp:
                assert resp.status == 200
    assert await daemon.stop() == 0
    with sqlite3.connect(db) as conn:  # stored an hour ago, instead of waiting
        conn.execute("UPDATE responses SET created_at = created_at - 3600")
    code, out, err = await run_cli(tmp_path, "gc", "--db", str(db))
    assert code == 0, err
    assert out.startswith(f"purged 0 expired object(s) from {db}")
    lowered = write(tmp_path, "[responses]\nretention = 60\n")
    code, out, err = await run_cli(tmp_path, "gc", "--db", str(db), "--config", lowered)
    assert code == 0, err
    assert out.startswith(f"purged 3 expired object(s) from {db}")


async def test_bench_runs_every_measurement(tmp_path):
    """`lmbridge bench` (tiny settings) measures pass-through, Responses and the MCP loop
    side by side with direct requests and writes them as JSON; timings are not judged."""
    out = tmp_path / "bench.json"
    code, text, err = await run_cli(
        tmp_path,
        "bench",
        "--duration",
        "0.2",
        "--rounds",
        "1",
        "--latency-requests",
        "40",
        "--chain-turns",
        "6",
        "--chain-samples",
        "5",
        "--agent-turns",
        "4",
        "--json",
        str(out),
        within=180,
    )
    assert code == 0, err
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert any(n.startswith("plain:") for n in names)
    assert any(n.startswith("/v1/responses") for n in names)
    assert any(n.startswith("MCP tool loop") for n in names)
    # On Linux the CPU each process spent per request is read from /proc.
    assert "plain: CPU per request, upstream vs lmbridge" in names
    assert any(n.startswith("lmbridge CPU per request: chat") for n in names)
    assert all(r["direct"] > 0 and r["proxy"] > 0 for r in report["results"])
    assert report["upstream"]["model_list_reads"] >= 1
    assert "MCP tool loop (2 rounds): p50" in text
    # The agent loops: over a WebSocket and over HTTP SSE; store: false writes nothing.
    unstored = next(r for r in report["results"] if "store: false" in r["name"])
    assert unstored["note"].endswith("; 0 storage writes")
    assert any("over HTTP SSE" in n for n in names)


async def test_bench_says_why_the_daemon_did_not_start(tmp_path):
    """A daemon that cannot start makes `lmbridge bench` print its reason and exit 1,
    not a ProcessLookupError that hides the cause."""
    env = clean_env(tmp_path, LMBRIDGE_NOT_A_SETTING="1")
    code, _, err = await run_cli(tmp_path, "bench", "--duration", "0.2", env=env)
    assert code == 1
    assert "lmbridge serve exited with status 2" in err
    assert "LMBRIDGE_NOT_A_SETTING: not a configuration key" in err
    assert "Traceback" not in err


async def test_usage_prints_what_the_daemon_recorded(tmp_path, start_daemon, fake_upstream):
    """`lmbridge usage` asks the running daemon with the configuration's key: a table of
    the tokens the upstream reported per model, or the report as JSON; a bad time is one
    line naming it and status 1."""
    port = free_port()
    config = write(
        tmp_path,
        f'[server]\nport = {port}\n[upstream]\nurl = "{fake_upstream.url}"\n'
        '[auth]\napi_keys = ["sk-local"]\n[usage]\nflush_interval = "10ms"\n',
    )
    env = clean_env(tmp_path, LMBRIDGE_CONFIG=config)
    daemon = await start_daemon(env=env, port=port)
    async with AsyncOpenAI(base_url=daemon.base_url + "/v1", api_key="sk-local") as client:
        for _ in range(2):  # the fake upstream reports 5 prompt and 2 completion tokens
            await client.chat.completions.create(
                model="test-model", messages=[{"role": "user", "content": "hi"}]
            )
    for _ in range(100):  # written within flush_interval; the report shows it once there
        code, out, err = await run_cli(tmp_path, "usage", "--json", env=env)
        assert code == 0, err
        if json.loads(out)["total"]["requests"] == 2:
            break
    answer = json.loads(out)
    [group] = answer["data"]
    assert (group["group"], group["prompt_tokens"], group["completion_tokens"]) == (
        "test-model",
        10,
        4,
    )
    code, out, err = await run_cli(tmp_path, "usage", "--group-by", "model", env=env)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].split()[:3] == ["MODEL", "REQUESTS", "ERRORS"]
    assert lines[1].split()[:8] == ["test-model", "2", "0", "10", "0", "4", "0", "14"]
    assert lines[2].split()[:2] == ["TOTAL", "2"]
    code, out, err = await run_cli(tmp_path, "usage", "--since", "yesterday", env=env)
    assert code == 1
    assert err.startswith("lmbridge: 'since' must be unix seconds") and err.count("\n") == 1
