"""The service files: valid for systemd and launchd, and what docs/operations.md says of
them is what they do."""

from __future__ import annotations

import os
import plistlib
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "systemd"
OPERATIONS = (ROOT / "docs" / "operations.md").read_text()


def settings(unit: Path, key: str) -> list[str]:
    return re.findall(rf"^{key}=(.*)$", unit.read_text(), re.M)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
@pytest.mark.parametrize(
    ("unit", "program", "user"),
    [
        ("lmbridge.service", "/opt/lmbridge/bin/lmbridge", False),
        ("lmbridge.user.service", "%h/.local/bin/lmbridge", True),
    ],
)
def test_systemd_units_verify_cleanly(tmp_path, unit, program, user):
    """`systemd-analyze verify` finds nothing to say about either unit (the program it
    starts is replaced by one that exists here)."""
    stand_in = tmp_path / "lmbridge"
    stand_in.write_text("#!/bin/sh\n")
    stand_in.chmod(0o755)
    text = (SYSTEMD / unit).read_text()
    assert program in text
    copy = tmp_path / "lmbridge.service"
    copy.write_text(text.replace(program, str(stand_in)))
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    result = subprocess.run(
        ["systemd-analyze", *(["--user"] if user else []), "verify", str(copy)],
        capture_output=True,
        text=True,
        env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)},
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout + result.stderr == ""


def test_the_user_unit_finds_user_installed_tools():
    """A user manager has no network-online.target to wait for, and its PATH must reach
    ~/.local/bin (uvx, pipx's programs) for MCP servers of an mcp.json."""
    unit = SYSTEMD / "lmbridge.user.service"
    assert not settings(unit, "After")
    (path,) = [e for e in settings(unit, "Environment") if e.startswith("PATH=")]
    assert path.split("=", 1)[1].split(":")[:2] == ["%h/.local/bin", "/usr/local/bin"]


def test_the_launchd_agent_is_a_valid_plist_with_a_path():
    """The plist loads, runs `lmbridge serve`, and gives MCP servers a PATH that reaches
    ~/.local/bin and Homebrew (launchd's own is /usr/bin:/bin:/usr/sbin:/sbin)."""
    with (SYSTEMD / "io.github.lmbridge.plist").open("rb") as fh:
        agent = plistlib.load(fh)
    assert agent["Label"] == "io.github.lmbridge"
    assert agent["ProgramArguments"] == ["/Users/YOU/.local/bin/lmbridge", "serve"]
    path = agent["EnvironmentVariables"]["PATH"].split(":")
    assert path[:2] == ["/Users/YOU/.local/bin", "/opt/homebrew/bin"]
    assert {"/usr/bin", "/bin"} <= set(path)
    assert agent["KeepAlive"] == {"SuccessfulExit": False}


def test_the_system_units_documentation_is_installed_by_the_docs():
    """The file the unit's Documentation= names is one the install steps put there."""
    unit = SYSTEMD / "lmbridge.service"
    (documentation,) = settings(unit, "Documentation")
    installed = documentation.removeprefix("file://")
    assert f"docs/operations.md {installed}" in OPERATIONS


def test_the_documented_check_config_sees_what_the_service_sees():
    """docs/operations.md checks the configuration with the unit's environment file and
    every LMBRIDGE_* variable the unit sets (its storage path among them)."""
    unit = SYSTEMD / "lmbridge.service"
    start = OPERATIONS.index("sudo systemd-run")
    command = OPERATIONS[start : OPERATIONS.index("check-config", start)]
    for environment_file in settings(unit, "EnvironmentFile"):
        assert f"EnvironmentFile={environment_file}" in command
    variables = [e for e in settings(unit, "Environment") if e.startswith("LMBRIDGE_")]
    assert any(v.startswith("LMBRIDGE_STORAGE_PATH=") for v in variables)
    for variable in variables:
        assert f"-E {variable}" in command


@pytest.mark.parametrize("unit", ["lmbridge.service", "lmbridge.user.service"])
def test_the_units_leave_room_for_the_default_connections(unit):
    """Each unit's hard open-file limit fits server.max_connections, the upstream pool and
    lmbridge's own files (lmbridge raises its soft limit to that), while the soft limit
    its child programs inherit stays at select()'s 1024."""
    from proxy.config import Config
    from proxy.connections import RESERVED_FILES

    (limit,) = settings(SYSTEMD / unit, "LimitNOFILE")
    soft, hard = (int(n) for n in limit.split(":"))
    config = Config()
    needed = config.server.max_connections + config.upstream.max_connections + RESERVED_FILES
    assert soft == 1024
    assert hard >= needed
