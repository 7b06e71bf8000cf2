"""Load generation: requests/s at a concurrency, latencies one request at a time."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import aiohttp

from proxy.bench.processes import process_cpu_seconds
from proxy.bench.upstream import BENCH_MODEL

PLAIN_BODY = json.dumps(
    {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()


STREAM_BODY = json.dumps(
    {"model": BENCH_MODEL, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()


HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with session.post(url, data=body, headers=HEADERS) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")


@dataclass
class Load:
    rps: float
    requests: int
    cpu_seconds: float | None  # of the process that served them, when known


async def throughput(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    concurrency: int,
    duration: float,
    server_pid: int | None = None,
) -> Load:
    """Requests/s completed by ``concurrency`` workers over ``duration`` seconds, and the
    CPU time the serving process spent on them."""
    deadline = time.perf_counter() + duration
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await _one(session, url, body)
            count += 1

    cpu_before = process_cpu_seconds(server_pid)
    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu_after = process_cpu_seconds(server_pid)
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return Load(count / elapsed, count, cpu)


async def latencies(session: aiohttp.ClientSession, url: str, body: bytes, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        await _one(session, url, body)
        out.append(time.perf_counter() - started)
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def cpu_per_request_us(loads: list[Load]) -> float | None:
    if any(load.cpu_seconds is None for load in loads):
        return None
    requests = sum(load.requests for load in loads)
    return sum(load.cpu_seconds or 0.0 for load in loads) / requests * 1e6 if requests else None
