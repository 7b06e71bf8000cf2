"""Codex CLI, the real program at a pinned version (``tests/e2e/codex.py``), runs
``codex exec`` against the daemon with docs/clients.md's ``config.toml`` as written:
once over HTTP, once over the WebSocket transport, and once on llama.cpp.

Codex reaches nothing but the daemon: its config turns off plugin sync and analytics,
and every other connection goes to a proxy on 127.0.0.1 that refuses it. Without
Codex (no npm, no registry) these tests are skipped, or fail when ``CI`` is set.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.embedded import has_llamacpp
from tests.e2e import codex as codex_cli
from tests.e2e.conftest import Daemon, clean_env
from tests.fake_upstream import CHAT, Reply, chunk, text_stream

pytestmark = pytest.mark.e2e

CLIENTS_DOC = Path(__file__).resolve().parents[2] / "docs" / "clients.md"
DOC_ADDRESS = "127.0.0.1:1235"

# Codex 0.171's shell tool, as its first request offers it: exec_command {"cmd": "..."}.
SHELL_TOOL = "exec_command"
MADE_FILE = "made-by-codex.txt"
FINAL_MESSAGE = f"Created {MADE_FILE}."


@pytest.fixture(scope="session")
def codex() -> Path:
    """The pinned Codex CLI, installed into the cache on first use."""
    try:
        return codex_cli.install()
    except codex_cli.CodexUnavailable as exc:
        if codex_cli.required():
            pytest.fail(f"Codex CLI {codex_cli.VERSION} is needed in CI: {exc}", pytrace=False)
        pytest.skip(f"Codex CLI {codex_cli.VERSION} not installed ({exc}); CI=true fails instead")


@dataclass
class RefusingProxy:
    """An HTTP proxy on 127.0.0.1 that refuses everything: where Codex's connections to
    anywhere but the daemon end up (the request lines are kept)."""

    url: str = ""
    attempts: list[str] = field(default_factory=list)

    async def _refuse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        self.attempts.append(line.decode(errors="replace").strip())
        writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest.fixture
async def refusing_proxy() -> AsyncIterator[RefusingProxy]:
    proxy = RefusingProxy()
    server = await asyncio.start_server(proxy._refuse, "127.0.0.1", 0)
    proxy.url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    async with server:
        yield proxy


def doc_config(port: int, *, websockets: bool, context: bool = False) -> str:
    """docs/clients.md's Codex configuration for one transport, with its tables that keep
    Codex off the network (and its context settings for a small model, first, since they
    are top-level keys), pointed at the daemon under test."""
    blocks = re.findall(r"```toml\n(.*?)```", CLIENTS_DOC.read_text(), re.S)
    codex_blocks = [b for b in blocks if b.lstrip().startswith("# ~/.codex/config.toml")]
    [provider] = [
        b
        for b in codex_blocks
        if "[model_providers.lmbridge]" in b and ("supports_websockets = true" in b) == websockets
    ]
    [offline] = [b for b in codex_blocks if "[analytics]" in b]
    [small_model] = [b for b in codex_blocks if "model_context_window" in b]
    assert DOC_ADDRESS in provider, "the docs' base_url is lmbridge's default address"
    parts = [provider.replace(DOC_ADDRESS, f"127.0.0.1:{port}"), offline]
    return "\n".join([small_model, *parts] if context else parts)


@dataclass
class CodexRun:
    returncode: int
    events: list[dict[str, Any]]
    stdout: str
    stderr: str

    def items(self, kind: str) -> list[dict[str, Any]]:
        return [
            e["item"]
            for e in self.events
            if e.get("type") == "item.completed" and e["item"].get("type") == kind
        ]

    def messages(self) -> list[str]:
        return [item["text"] for item in self.items("agent_message")]

    def errors(self) -> list[str]:
        """Errors Codex reported (reconnects, fallbacks, failed turns), without its
        warning that it has no metadata for a model it does not know."""
        top = [
            e.get("message") or str(e.get("error"))
            for e in self.events
            if e.get("type") in ("error", "turn.failed")
        ]
        items = [i["message"] for i in self.items("error")]
        return [m for m in top + items if not m.startswith("Model metadata for")]

    def report(self) -> str:
        return f"codex exited {self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


async def run_codex(
    codex: Path,
    daemon: Daemon,
    tmp_path: Path,
    proxy: RefusingProxy,
    *,
    websockets: bool,
    model: str,
    prompt: str,
    context: bool = False,
    sandbox: str = "read-only",
    within: float = 120,
) -> tuple[CodexRun, Path]:
    """``codex exec`` once, in a fresh ``CODEX_HOME`` and working directory."""
    home = tmp_path / "codex-home"
    home.mkdir()
    port = int(daemon.url.rsplit(":", 1)[1])
    (home / "config.toml").write_text(doc_config(port, websockets=websockets, context=context))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (tmp_path / "home").mkdir(exist_ok=True)
    env = {
        k: v
        for k, v in clean_env(tmp_path).items()
        if not k.startswith(("CODEX_", "OPENAI_")) and "proxy" not in k.lower()
    }
    env["CODEX_HOME"] = str(home)
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        env[name] = env[name.lower()] = proxy.url
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    argv = [
        str(codex),
        "exec",
        "--strict-config",
        "--skip-git-repo-check",
        "--ephemeral",
        "--json",
        "--sandbox",
        sandbox,
        "--model",
        model,
        "--cd",
        str(workdir),
        prompt,
    ]
    # A session of its own: on node 20 the npm launcher runs the binary as its child, and
    # a test that gives up must stop both.
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=workdir,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), within)
    except TimeoutError:
        pytest.fail(f"codex exec ran over {within}s")
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
    stdout = out.decode(errors="replace")
    events = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    assert process.returncode is not None
    return CodexRun(process.returncode, events, stdout, err.decode(errors="replace")), workdir


async def counter_total(daemon: Daemon, name: str) -> float:
    """The sum of a counter's samples on the daemon's /metrics (0 when it has none)."""
    async with aiohttp.ClientSession() as session, session.get(daemon.url + "/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith((name + "{", name + " "))
    )


def request_lines(daemon: Daemon) -> list[dict[str, Any]]:
    """The daemon's request log (``--log-format json``), complete once it has stopped."""
    lines = []
    for line in daemon.log().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("logger") == "lmbridge.request":
            lines.append(entry)
    return lines


def shell_call_stream(command: str) -> list[Any]:
    """A chat stream whose answer is one call of Codex's shell tool."""
    call = {
        "index": 0,
        "id": "call_codex_1",
        "type": "function",
        "function": {"name": SHELL_TOOL, "arguments": json.dumps({"cmd": command})},
    }
    usage = {"prompt_tokens": 4600, "completion_tokens": 12, "total_tokens": 4612}
    return [
        chunk(role="assistant", content=""),
        chunk(tool_calls=[call]),
        chunk(finish="tool_calls"),
        chunk(choices=False, usage=usage),
    ]


@pytest.mark.parametrize(
    "websockets",
    [
        False,
        True,
    ],
    ids=["http-sse", "websocket"],
)
async def test_codex_runs_a_shell_command_through_lmbridge(
    codex, start_daemon, fake_upstream, refusing_proxy, tmp_path, websockets
):
    """A model that uses Codex's tools: its first answer calls the shell tool, which
    creates a file; its second, after the output, is the final message. Codex prints it
    and exits 0; lmbridge served both turns over the configured transport, with no
    fallback, no retry and no 5xx; Codex reached nothing else."""
    fake_upstream.add_reply(CHAT, Reply(stream=shell_call_stream(f"echo lmbridge > {MADE_FILE}")))
    fake_upstream.add_reply(CHAT, Reply(stream=text_stream("Created ", MADE_FILE, ".", usage=True)))
    daemon = await start_daemon("--upstream", fake_upstream.url, "--log-format", "json")

    run, workdir = await run_codex(
        codex,
        daemon,
        tmp_path,
        refusing_proxy,
        websockets=websockets,
        model="test-model",
        prompt=f"Create {MADE_FILE}.",
        sandbox="workspace-write",
    )
    retries = await counter_total(daemon, "lmbridge_upstream_retries_total")
    failures = await counter_total(daemon, "lmbridge_upstream_failures_total")
    assert await daemon.stop() == 0

    turns = fake_upstream.requests_to(CHAT)
    assert turns, run.report()
    offered = {t["function"]["name"]: t["function"] for t in turns[0].body.get("tools", [])}
    assert SHELL_TOOL in offered, f"Codex's tools changed: {sorted(offered)}"
    assert offered[SHELL_TOOL]["parameters"]["required"] == ["cmd"]

    assert run.returncode == 0, run.report()
    assert (workdir / MADE_FILE).read_text() == "lmbridge\n"
    [command] = run.items("command_execution")
    assert command["exit_code"] == 0 and MADE_FILE in command["command"]
    assert run.messages() == [FINAL_MESSAGE]
    assert run.errors() == [], run.report()

    assert len(turns) == 2
    assert turns[1].body["messages"][-1]["role"] == "tool"
    assert turns[1].body["messages"][-1]["tool_call_id"] == "call_codex_1"
    lines = request_lines(daemon)
    on_responses = [
        (line["method"], line["status"]) for line in lines if line["path"] == "/v1/responses"
    ]
    if websockets:
        # One upgrade kept for every turn (Codex's warm-up with generate: false, then the
        # two turns, each a line of its own): no second attempt, no POST fallback. Codex
        # drops the connection without a close frame, so the upgrade's line says 499.
        assert on_responses == [("WEBSOCKET", 200)] * 3 + [("GET", 499)], on_responses
        warm_up = next(line for line in lines if line["method"] == "WEBSOCKET")
        assert warm_up["model"] == "test-model"
    else:
        assert on_responses == [("POST", 200), ("POST", 200)]
    assert [line for line in lines if line["status"] >= 500] == []
    assert retries == 0 and failures == 0
    assert refusing_proxy.attempts == []


@pytest.mark.real_upstream
@pytest.mark.skipif(not has_llamacpp(), reason="needs the 'local' extra (xllamacpp)")
async def test_codex_on_embedded_llama_cpp(codex, start_daemon, refusing_proxy, tmp_path):
    """Codex's real first request (about 4,600 tokens of instructions and tools) goes
    through lmbridge to llama.cpp (`--embedded`, default settings; Codex told of the
    8,192-token context as docs/clients.md says) and back: Codex prints the model's
    answer and exits 0."""
    daemon = await start_daemon("--embedded", "--log-format", "json", ready_within=180)
    run, _ = await run_codex(
        codex,
        daemon,
        tmp_path,
        refusing_proxy,
        websockets=False,
        model="smollm2",
        prompt="Say hello in one short sentence.",
        context=True,
        within=600,
    )
    assert await daemon.stop() == 0
    assert run.returncode == 0, run.report()
    assert [m for m in run.messages() if m.strip()], run.report()
    assert run.errors() == [], run.report()
    on_responses = [
        (line["method"], line["status"])
        for line in request_lines(daemon)
        if line["path"] == "/v1/responses"
    ]
    assert on_responses == [("POST", 200)]
