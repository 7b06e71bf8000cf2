"""Codex CLI (``@openai/codex`` on the npm registry) at one pinned version, installed
once into a cache outside the checkout and reused by every later run.

The npm package is a small launcher (``bin/codex.js``, run by node); the program
itself comes in an optional dependency per platform, ``@openai/codex-linux-x64`` being
``npm:@openai/codex@<version>-linux-x64``: a versioned tarball of about 150 MB (430 MB
unpacked) with a static binary. ``npm install`` of the pinned version fetches the
launcher and the tarball of this platform only, and runs no install script.

``python -m tests.e2e.codex`` installs it and prints the command: ``.ci/run`` does
that before the tests, so that a registry it cannot reach fails CI at that step.
Only the standard library is used here, so any ``python3`` can run it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

VERSION = "0.171.0"
PACKAGE = f"@openai/codex@{VERSION}"


class CodexUnavailable(Exception):
    """Codex CLI could not be installed; the message says why, in a line or two."""


def cache_dir() -> Path:
    """Where the pinned version lives: ``$XDG_CACHE_HOME/lmbridge-tests/codex-<version>``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lmbridge-tests" / f"codex-{VERSION}"


def launcher(prefix: Path) -> Path:
    """The ``codex`` command npm links into an install prefix (a relative symlink)."""
    return prefix / "node_modules" / ".bin" / "codex"


def version_of(command: Path) -> str | None:
    """What ``codex --version`` says (``codex-cli 0.171.0``), or None if it does not run."""
    try:
        result = subprocess.run(
            [str(command), "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except OSError:
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _npm_install(prefix: Path) -> None:
    npm = shutil.which("npm")
    if npm is None:
        raise CodexUnavailable("npm is not on PATH (Codex CLI is installed with npm and node)")
    argv = [
        npm,
        "install",
        "--prefix",
        str(prefix),
        "--no-save",
        "--no-package-lock",
        "--no-audit",
        "--no-fund",
        "--ignore-scripts",
        "--loglevel=error",
        # npm's default retries wait over a minute before a missing registry is reported.
        "--fetch-retries=2",
        "--fetch-retry-mintimeout=2000",
        "--fetch-retry-maxtimeout=10000",
        PACKAGE,
    ]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
    except subprocess.TimeoutExpired as exc:
        raise CodexUnavailable(f"npm install {PACKAGE} took longer than 15 minutes") from exc
    if result.returncode != 0:
        raise CodexUnavailable(
            f"npm install {PACKAGE} exited with {result.returncode}: "
            + _npm_reason(result.stderr or result.stdout)
        )


def _npm_reason(output: str) -> str:
    """npm's error code and the line that says what failed, out of its stack trace."""
    lines = [line.removeprefix("npm error").strip() for line in output.splitlines()]
    lines = [line for line in lines if line]
    code = next((line for line in lines if line.startswith("code ")), None)
    cause = next((line for line in lines if "Error" in line or " - " in line), None)
    found = [part for part in (code, cause) if part] or lines[:1] or ["no output"]
    return "; ".join(found)


def install() -> Path:
    """The ``codex`` command of the pinned version: from the cache, else installed there.

    The install goes to a directory beside the cache and is renamed into place once
    ``codex --version`` answers, so an interrupted install is never taken for a
    finished one.
    """
    target = cache_dir()
    expected = f"codex-cli {VERSION}"
    if version_of(launcher(target)) == expected:
        return launcher(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        _npm_install(staging)
        found = version_of(launcher(staging))
        if found != expected:
            raise CodexUnavailable(
                f"npm installed {PACKAGE}, but `codex --version` says {found!r} "
                "(is this platform's binary package missing?)"
            )
        if target.exists():  # an install that no longer runs
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return launcher(target)


def required() -> bool:
    """In CI (``CI`` set and not false) a Codex CLI that cannot be installed fails the
    tests that need it; elsewhere they are skipped, with the reason in the summary."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


if __name__ == "__main__":
    try:
        print(install())
    except CodexUnavailable as exc:
        sys.exit(f"Codex CLI for the tests: {exc}")
