"""``lmbridge bench``: the proxy measured against a fast fake upstream, side by side.

Three processes: a fast fake upstream (fixed replies, no model), the daemon
pointed at it, and this one generating load. Each measurement runs against the
upstream directly and through the daemon in the same run, alternating rounds,
so that the ratio is meaningful on a noisy machine. Reported: requests/s at
concurrency 32 and latency at concurrency 1 (p50, p99, and what the proxy
adds), for plain and streamed (20-chunk) chat completions, plus the daemon's
peak memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

BENCH_MODEL = "bench-model"
STREAM_CHUNKS = 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--duration", type=float, default=4.0, help="seconds per throughput round (default 4)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating direct/proxy rounds per measurement (default 3)",
    )
    parser.add_argument(
        "--latency-requests",
        type=int,
        default=1000,
        help="requests per latency round at concurrency 1 (default 1000)",
    )
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--log-level",
        default="info",
        help="the daemon's log level during the run (default info; its log goes to /dev/null)",
    )


# --- the fast fake upstream -----------------------------------------------
# Like a real server it parses each request and serialises each reply (with
# a fresh id), but it generates nothing: what is left is HTTP and JSON work.


def _completion(n: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-bench{n}", "object": "chat.completion", "created": int(time.time()),
        "model": BENCH_MODEL,
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant", "content": "Hello from the bench."}}],
        "usage": {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18},
    }  # fmt: skip


def _chunk(n: int, i: int) -> bytes:
    delta: dict[str, Any] = {"content": f"tok{i} "}
    if i == 0:
        delta["role"] = "assistant"
    finish = "stop" if i == STREAM_CHUNKS - 1 else None
    body = {"id": f"chatcmpl-bench{n}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": BENCH_MODEL,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
    return b"data: " + json.dumps(body).encode() + b"\n\n"


_MODELS = {"object": "list", "data": [{"id": BENCH_MODEL, "object": "model", "owned_by": "bench"}]}


def fast_upstream_app() -> web.Application:
    counter = iter(range(1, 1 << 62))
    stats = {"model_list_reads": 0, "chat_requests": 0}

    async def models(request: web.Request) -> web.Response:
        stats["model_list_reads"] += 1
        return web.json_response(_MODELS)

    async def read_stats(request: web.Request) -> web.Response:
        return web.json_response(stats)

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        n = next(counter)
        stats["chat_requests"] += 1
        if not body.get("stream"):
            return web.json_response(_completion(n))
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i in range(STREAM_CHUNKS):
            await response.write(_chunk(n, i))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/bench/stats", read_stats)
    return app


async def _serve_fake() -> None:
    runner = web.AppRunner(fast_upstream_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    sys.stdout.write(json.dumps({"url": f"http://{host}:{port}"}) + "\n")
    sys.stdout.flush()
    # Runs until the parent closes our stdin (or dies).
    await asyncio.to_thread(sys.stdin.buffer.read)
    await runner.cleanup()


# --- load generation ------------------------------------------------------

PLAIN_BODY = json.dumps(
    {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
STREAM_BODY = json.dumps(
    {"model": BENCH_MODEL, "stream": True, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
_HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer bench"}


async def _one(session: aiohttp.ClientSession, url: str, body: bytes) -> None:
    async with session.post(url, data=body, headers=_HEADERS) as resp:
        await resp.read()
        if resp.status != 200:
            raise RuntimeError(f"{url} answered {resp.status}")


async def throughput(
    session: aiohttp.ClientSession, url: str, body: bytes, concurrency: int, duration: float
) -> float:
    """Requests/s completed by ``concurrency`` workers over ``duration`` seconds."""
    deadline = time.perf_counter() + duration
    count = 0

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await _one(session, url, body)
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


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


# --- orchestration --------------------------------------------------------


@dataclass
class Result:
    name: str
    direct: float
    proxy: float
    unit: str
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


async def _start_child(args: list[str], stderr: Any) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr
    )
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), 30)
    return process, str(json.loads(line)["url"])


async def _wait_ready(session: aiohttp.ClientSession, url: str) -> None:
    for _ in range(300):
        try:
            async with session.get(url + "/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    raise RuntimeError(f"{url} did not become ready")


def _free_port() -> int:
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


async def _alternate(
    rounds: int, measure: Callable[[str], Awaitable[float]], direct_url: str, proxy_url: str
) -> tuple[list[float], list[float]]:
    direct, proxied = [], []
    for _ in range(rounds):
        direct.append(await measure(direct_url))
        proxied.append(await measure(proxy_url))
    return direct, proxied


async def _bench(args: argparse.Namespace) -> dict[str, Any]:
    tmp = tempfile.mkdtemp(prefix="lmbridge-bench-")
    fake, upstream_url = await _start_child(
        [sys.executable, "-m", "proxy.bench", "--serve-fake"], subprocess.DEVNULL
    )
    port = _free_port()
    daemon = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "serve", "--upstream", upstream_url,
        "--port", str(port), "--db", str(Path(tmp) / "bench.db"),
        "--log-level", args.log_level,
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "LMBRIDGE_CONFIG": os.devnull},
    )  # fmt: skip
    proxy_url = f"http://127.0.0.1:{port}"
    results: list[Result] = []
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await _wait_ready(session, proxy_url)
            chat = "/v1/chat/completions"
            for url in (upstream_url, proxy_url):  # warm both paths
                await throughput(session, url + chat, PLAIN_BODY, args.concurrency, 1.0)
                await throughput(session, url + chat, STREAM_BODY, args.concurrency, 0.5)

            for label, body in (("plain", PLAIN_BODY), ("stream (20 chunks)", STREAM_BODY)):

                async def rps(base: str, body: bytes = body) -> float:
                    return await throughput(
                        session, base + chat, body, args.concurrency, args.duration
                    )

                d, p = await _alternate(args.rounds, rps, upstream_url, proxy_url)
                results.append(
                    Result(
                        f"{label}: requests/s at concurrency {args.concurrency}",
                        statistics.median(d),
                        statistics.median(p),
                        "req/s",
                        note=f"proxy/direct = {statistics.median(p) / statistics.median(d):.0%}",
                    )
                )

                lat_d: list[float] = []
                lat_p: list[float] = []
                for _ in range(args.rounds):
                    n = args.latency_requests // args.rounds
                    lat_d += await latencies(session, upstream_url + chat, body, n)
                    lat_p += await latencies(session, proxy_url + chat, body, n)
                for q in (50, 99):
                    dq, pq = percentile(lat_d, q) * 1000, percentile(lat_p, q) * 1000
                    results.append(
                        Result(
                            f"{label}: p{q} latency at concurrency 1",
                            dq,
                            pq,
                            "ms",
                            note=f"added {pq - dq:+.2f} ms",
                        )
                    )
            async with session.get(upstream_url + "/bench/stats") as resp:
                upstream_stats = await resp.json()
    finally:
        memory = peak_rss_mb(daemon.pid)
        daemon.terminate()
        await daemon.wait()
        if fake.stdin is not None:
            fake.stdin.close()
        await fake.wait()
    return {
        "machine": machine_description(),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "latency_requests": args.latency_requests,
            "concurrency": args.concurrency,
            "daemon_log_level": args.log_level,
        },
        "results": [r.__dict__ for r in results],
        "proxy_peak_rss_mb": memory,
        "upstream": upstream_stats,
        "validation_us": await asyncio.to_thread(validation_cost_us),
    }


def validation_cost_us(models: int = 50, calls: int = 200_000) -> float:
    """CPU cost of resolving a model against a fresh cached list, in microseconds."""
    from proxy.catalog import ModelCatalog, ModelInfo, ModelList
    from proxy.config import ModelsConfig

    listing = ModelList.build(
        [ModelInfo(f"publisher/model-{i}", "llm", "loaded") for i in range(models)],
        "openai", time.monotonic(),
    )  # fmt: skip

    reads = 0

    async def fetch() -> ModelList:
        nonlocal reads
        reads += 1
        return listing

    catalog = ModelCatalog(
        ModelsConfig(cache_ttl=3600, aliases={"alias": "publisher/model-7"}), fetch
    )

    async def run() -> float:
        await catalog.get()
        started = time.perf_counter()
        for i in range(calls):
            await catalog.resolve("alias" if i % 2 else "publisher/model-42")
        elapsed = time.perf_counter() - started
        assert reads == 1, "the cache is fresh: no further upstream call expected"
        return elapsed / calls * 1e6

    return asyncio.run(run())


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


def format_report(report: dict[str, Any]) -> str:
    lines = [f"machine: {report['machine']}", ""]
    header = f"{'measurement':<48} {'direct':>10} {'proxy':>10}  unit    note"
    lines += [header, "-" * len(header)]
    for r in report["results"]:
        lines.append(
            f"{r['name']:<48} {r['direct']:>10.2f} {r['proxy']:>10.2f}  {r['unit']:<6}  {r['note']}"
        )
    stats = report["upstream"]
    lines.append(
        f"\nmodel validation: {report['validation_us']:.2f} us per request against the cached "
        f"list; the upstream's model list was read {stats['model_list_reads']} time(s) for "
        f"{stats['chat_requests']} chat requests"
    )
    if report["proxy_peak_rss_mb"] is not None:
        lines.append(f"\nproxy peak memory (VmHWM): {report['proxy_peak_rss_mb']:.1f} MB")
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace) -> int:
    report = asyncio.run(_bench(args))
    sys.stdout.write(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve-fake"]:
        asyncio.run(_serve_fake())
