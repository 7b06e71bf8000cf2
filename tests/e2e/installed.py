"""The product as users get it: the wheel built from this checkout, installed with pipx
into a virtualenv of its own.

Every e2e test runs this installed ``lmbridge``, never the checkout: a suite that
imported the checkout once stayed green while the wheel it shipped could not start.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("proxy", "storage")


@dataclass(frozen=True)
class Installation:
    wheel: Path
    # The command on the user's PATH (pipx's link into its virtualenv).
    command: Path
    # The interpreter of that virtualenv.
    python: Path
    # Where that interpreter imports ``proxy`` from.
    origin: Path


def run(argv: list[str], *, cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    """Run a setup command; its output is the failure message when it fails."""
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, check=False, timeout=600
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} exited with {result.returncode}:\n{result.stdout}{result.stderr}"
        )
    return result.stdout


# What a clone does not hold: setuptools' build/ keeps modules deleted since, which
# would land in a wheel built in place.
LEFTOVERS = (".git", "build", "dist", "*.egg-info", "__pycache__", ".venv", "venv", ".*_cache")


def copy_of_checkout(dest: Path) -> Path:
    """The source tree as a clone holds it: no build leftovers, no caches."""
    return Path(shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(*LEFTOVERS)))


def build_wheel(dest: Path) -> Path:
    """The wheel of this checkout, built by pip from a clean copy of it."""
    source = copy_of_checkout(dest.parent / "source")
    run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest), str(source)]
    )
    (wheel,) = dest.glob("lmbridge-*.whl")
    return wheel


def pipx_env(home: Path) -> dict[str, str]:
    """pipx confined to ``home``: its virtualenvs, its links and its man pages."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIPX_", "LMBRIDGE_"))}
    env.update(
        PIPX_HOME=str(home / "pipx"),
        PIPX_BIN_DIR=str(home / "bin"),
        PIPX_MAN_DIR=str(home / "man"),
    )
    return env


def pipx_install(spec: str, home: Path, *, cwd: Path | None = None) -> Path:
    """``pipx install SPEC``; the ``lmbridge`` command it puts on the PATH."""
    run(
        [sys.executable, "-m", "pipx", "install", "--python", sys.executable, spec],
        cwd=cwd,
        env=pipx_env(home),
    )
    return home / "bin" / "lmbridge"


def install(work: Path) -> Installation:
    wheel = build_wheel(work / "dist")
    command = pipx_install(f"{wheel}[local]", work)
    python = command.resolve().parent / "python"
    # Imported from an empty directory: nothing of the checkout is on sys.path.
    origin = run(
        [str(python), "-c", "import proxy; print(proxy.__file__)"], cwd=work / "dist"
    ).strip()
    return Installation(wheel, command, python, Path(origin))


def wheel_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def checkout_files() -> list[str]:
    """Every file of the program in the checkout, as a path inside the wheel."""
    return sorted(
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
