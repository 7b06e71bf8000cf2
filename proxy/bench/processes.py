"""The processes of a benchmark run: starting and stopping them, and what /proc says of
their CPU time and memory (Linux)."""

from __future__ import annotations

import asyncio
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import aiohttp


class BenchError(Exception):
    """A process of the benchmark failed; the message says which and why."""


def last_lines(log: Path, count: int = 5) -> str:
    try:
        lines = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(lines[-count:]) or "(nothing logged)"


async def start_child(args: list[str], log: Path) -> tuple[asyncio.subprocess.Process, str]:
    """A child that prints its URL as one JSON line; its stderr goes to ``log``."""
    with log.open("ab") as stderr:
        process = await asyncio.create_subprocess_exec(
            *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
        )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    try:
        return process, str(json.loads(line)["url"])
    except (ValueError, KeyError, TypeError):
        await stop(process)
        raise BenchError(f"{' '.join(args[1:])} did not start:\n{last_lines(log)}") from None


async def start_daemon(
    args: list[str], log: Path, command: list[str] | None = None
) -> asyncio.subprocess.Process:
    """``lmbridge serve ARGS`` (``command``, else this installation's), its output in
    ``log``."""
    with log.open("ab") as output:
        return await asyncio.create_subprocess_exec(
            *(command or [sys.executable, "-m", "proxy"]),
            "serve",
            *args,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LMBRIDGE_CONFIG": os.devnull},
        )


async def wait_ready(
    session: aiohttp.ClientSession, url: str, process: asyncio.subprocess.Process, log: Path
) -> None:
    """Until the daemon answers /healthz; a daemon that exits says why."""
    for _ in range(300):
        if process.returncode is not None:
            raise BenchError(
                f"lmbridge serve exited with status {process.returncode}:\n{last_lines(log)}"
            )
        try:
            async with session.get(url + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise BenchError(f"{url} did not become ready in 15 s:\n{last_lines(log)}")


async def stop(process: asyncio.subprocess.Process) -> None:
    """Stop a child if it still runs (its stdin closing stops the fake upstream)."""
    if process.returncode is None:
        if process.stdin is not None:
            process.stdin.close()
        process.terminate()
    await process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def process_cpu_seconds(pid: int | None) -> float | None:
    """User plus system CPU time of a process (all its threads) and, for the daemon, of
    its SQLite writer process, on Linux."""
    if pid is None:
        return None
    total = own_cpu_seconds(pid)
    if total is None:
        return None
    for writer in writer_processes(pid):
        total += own_cpu_seconds(writer) or 0.0
    return total


def writer_processes(pid: int) -> list[int]:
    """The daemon's writer processes (storage/writer_process.py), not the MCP servers it
    runs, which are not lmbridge's own work."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    found = []
    for child in children:
        try:
            if b"writer_process" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(int(child))
        except OSError:
            continue
    return found


def own_cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, aiohttp {aiohttp.__version__}"
    )
