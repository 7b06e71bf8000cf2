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
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from proxy.bench.agent_loop import measure_agent_loop
from proxy.bench.lifecycle import measure_lifecycle
from proxy.bench.load import (
    HEADERS,
    PLAIN_BODY,
    STREAM_BODY,
    Load,
    cpu_per_request_us,
    latencies,
    percentile,
    throughput,
)
from proxy.bench.model_output_stream import measure_model_output
from proxy.bench.placement import Placement
from proxy.bench.processes import (
    free_port,
    machine_description,
    peak_rss_mb,
    start_child,
    start_daemon,
    stop,
    wait_ready,
    writer_processes,
)
from proxy.bench.routing import measure_routing
from proxy.bench.upstream import BENCH_MODEL, REPLY_TEXT

# --- load generation ------------------------------------------------------


# --- orchestration --------------------------------------------------------


@dataclass
class Result:
    name: str
    direct: float
    proxy: float
    unit: str
    note: str = ""


async def _alternate(
    setup: Setup, measure: Callable[[str], Awaitable[Load]]
) -> tuple[list[Load], list[Load]]:
    direct: list[Load] = []
    proxied: list[Load] = []
    for _ in range(setup.args.rounds):
        direct.append(await measure(setup.at(setup.upstream_url)))
        proxied.append(await measure(setup.at(setup.proxy_url)))
    return direct, proxied


@dataclass
class Setup:
    args: argparse.Namespace
    session: aiohttp.ClientSession
    upstream_url: str
    proxy_url: str
    upstream_pid: int | None = None
    daemon_pid: int | None = None
    placement: Placement | None = None

    def pid_of(self, base_url: str) -> int | None:
        return self.daemon_pid if base_url == self.proxy_url else self.upstream_pid

    def at(self, base_url: str) -> str:
        """Place the processes for a throughput round against ``base_url``; return it."""
        if self.placement is not None:
            if base_url == self.proxy_url:
                self.placement.proxied()
            else:
                self.placement.direct()
        return base_url

    def unpinned(self) -> None:
        """For latency at concurrency 1: every process on every CPU."""
        if self.placement is not None:
            self.placement.free()


def _median_rps(loads: list[Load]) -> float:
    return statistics.median(load.rps for load in loads)


async def measure_passthrough(setup: Setup) -> list[Result]:
    """Chat completions direct and through the daemon: throughput at concurrency 32 and
    latency at concurrency 1, plain and streamed."""
    args, session = setup.args, setup.session
    chat = "/v1/chat/completions"
    results: list[Result] = []
    for label, body in (("plain", PLAIN_BODY), ("stream (20 chunks)", STREAM_BODY)):

        async def rps(base: str, body: bytes = body) -> Load:
            return await throughput(
                session, base + chat, body, args.concurrency, args.duration, setup.pid_of(base)
            )

        d, p = await _alternate(setup, rps)
        results.append(
            Result(
                f"{label}: requests/s at concurrency {args.concurrency}",
                _median_rps(d),
                _median_rps(p),
                "req/s",
                note=f"proxy/direct = {_median_rps(p) / _median_rps(d):.0%}",
            )
        )
        cpu_d, cpu_p = cpu_per_request_us(d), cpu_per_request_us(p)
        if cpu_d is not None and cpu_p is not None:
            results.append(
                Result(
                    f"{label}: CPU per request, upstream vs lmbridge",
                    cpu_d,
                    cpu_p,
                    "us",
                    note="lmbridge's own; the upstream's is the same either way",
                )
            )
        lat_d: list[float] = []
        lat_p: list[float] = []
        for _ in range(args.rounds):
            n = args.latency_requests // args.rounds
            setup.unpinned()
            lat_d += await latencies(session, setup.upstream_url + chat, body, n)
            lat_p += await latencies(session, setup.proxy_url + chat, body, n)
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
    return results


RESPONSES_BODY = json.dumps({"model": BENCH_MODEL, "input": "Say hello.", "store": True}).encode()
RESPONSES_NO_STORE_BODY = json.dumps(
    {"model": BENCH_MODEL, "input": "Say hello.", "store": False}
).encode()


async def measure_responses(setup: Setup) -> list[Result]:
    """POST /v1/responses (stored) against chat pass-through, both through the daemon; and
    continuing turn N of one chain against a chat completion carrying the same history
    straight to the upstream."""
    args, session = setup.args, setup.session
    base = setup.proxy_url

    bodies = {"chat": PLAIN_BODY, "store": RESPONSES_BODY, "no store": RESPONSES_NO_STORE_BODY}

    async def rps(kind: str) -> Load:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/responses"
        return await throughput(
            session, base + path, bodies[kind], args.concurrency, args.duration, setup.daemon_pid
        )

    setup.at(base)
    await rps("store")  # warm up
    loads: dict[str, list[Load]] = {kind: [] for kind in bodies}
    for _ in range(args.rounds):
        for kind in bodies:
            loads[kind].append(await rps(kind))
    chat = loads["chat"]
    results = []
    for kind in ("store", "no store"):
        ratio = _median_rps(loads[kind]) / _median_rps(chat)
        results.append(
            Result(
                f"/v1/responses ({kind}) vs chat pass-through, req/s at concurrency "
                f"{args.concurrency}",
                _median_rps(chat),
                _median_rps(loads[kind]),
                "req/s",
                note=f"responses/chat = {ratio:.0%}",
            )
        )
        cpu_chat, cpu_responses = cpu_per_request_us(chat), cpu_per_request_us(loads[kind])
        if cpu_chat is not None and cpu_responses is not None:
            factor = cpu_responses / cpu_chat
            results.append(
                Result(
                    f"lmbridge CPU per request: chat pass-through vs /v1/responses ({kind})",
                    cpu_chat,
                    cpu_responses,
                    "us",
                    note=f"responses/chat = {factor:.1f}x (with its writer process)",
                )
            )

    setup.unpinned()
    turns = args.chain_turns
    previous: str | None = None
    ids: list[str] = []
    for i in range(turns - 1):
        body: dict[str, Any] = {"model": BENCH_MODEL, "input": f"Turn {i}: say hello."}
        if previous is not None:
            body["previous_response_id"] = previous
        async with session.post(base + "/v1/responses", json=body) as resp:
            previous = (await resp.json())["id"]
            ids.append(previous)
    last = f"Turn {turns - 1}: say hello."
    continue_body = json.dumps(
        {"model": BENCH_MODEL, "input": last, "previous_response_id": previous}
    ).encode()
    history: list[dict[str, str]] = []
    for i in range(turns - 1):
        history += [
            {"role": "user", "content": f"Turn {i}: say hello."},
            {"role": "assistant", "content": REPLY_TEXT},
        ]
    direct_body = json.dumps(
        {"model": BENCH_MODEL, "messages": [*history, {"role": "user", "content": last}]}
    ).encode()
    samples = max(5, args.chain_samples)
    direct, proxied = [], []
    # One of each in turn, so that a burst of other work on the machine hits both.
    for _ in range(args.rounds * samples):
        direct += await latencies(
            session, setup.upstream_url + "/v1/chat/completions", direct_body, 1
        )
        proxied += await latencies(session, base + "/v1/responses", continue_body, 1)
    d, p = statistics.median(direct) * 1000, statistics.median(proxied) * 1000
    results.append(
        Result(
            f"turn {turns} of one chain vs the same history sent directly (p50)",
            d,
            p,
            "ms",
            note=f"lmbridge/direct = {p / d:.1f}x ({len(direct_body) / 1e3:.0f} kB of history)",
        )
    )
    # The same, continuing from turns whose chains are no longer in the daemon's memory
    # (as after a restart): the chain is read from SQLite, one query each.
    half = turns // 2
    history_half = json.dumps(
        {
            "model": BENCH_MODEL,
            "messages": [*history[: 2 * (half - 1)], {"role": "user", "content": last}],
        }
    ).encode()
    cold_direct: list[float] = []
    cold: list[float] = []
    for parent in ids[half - 2 : half - 2 + samples]:
        body_cold = json.dumps(
            {"model": BENCH_MODEL, "input": last, "previous_response_id": parent}
        ).encode()
        cold_direct += await latencies(
            session, setup.upstream_url + "/v1/chat/completions", history_half, 1
        )
        cold += await latencies(session, base + "/v1/responses", body_cold, 1)
    d, p = statistics.median(cold_direct) * 1000, statistics.median(cold) * 1000
    results.append(
        Result(
            f"turn ~{half} from a chain read from SQLite (p50)",
            d,
            p,
            "ms",
            note=f"lmbridge/direct = {p / d:.1f}x ({len(history_half) / 1e3:.0f} kB of history)",
        )
    )
    return results


async def measure_mcp(setup: Setup) -> list[Result]:
    """A two-round tool loop (model -> MCP tool -> model) run by the daemon, against the
    same loop run by a client itself: two chat calls straight to the upstream and the
    tool call on its own open MCP session to the same server."""
    from mcp import Client, StdioServerParameters
    from mcp.client.stdio import stdio_client

    args, session = setup.args, setup.session
    chat = "/v1/chat/completions"
    for _ in range(200):  # the daemon connects its MCP server at start
        async with session.get(setup.proxy_url + "/readyz") as resp:
            if (await resp.json()).get("mcp_servers", {}).get("bench", {}).get("state") == "ready":
                break
        await asyncio.sleep(0.05)
    ask = [{"role": "user", "content": "Echo hello."}]
    through = json.dumps({"model": BENCH_MODEL, "messages": ask, "mcp_servers": ["bench"]})
    params = StdioServerParameters(command=sys.executable, args=["-m", "proxy.bench.mcp_server"])
    async with Client(stdio_client(params), mode="auto") as client:
        [tool] = (await client.list_tools()).tools
        definition = {
            "type": "function",
            "function": {
                "name": f"bench__{tool.name}",
                "description": tool.description,
                "parameters": tool.input_schema,
            },
        }

        async def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
            async with session.post(url, json=body, headers=HEADERS) as resp:
                return dict(await resp.json())

        async def direct_loop() -> float:
            started = time.perf_counter()
            body = {"model": BENCH_MODEL, "messages": ask, "tools": [definition]}
            message = (await post(setup.upstream_url + chat, body))["choices"][0]["message"]
            call = message["tool_calls"][0]
            result = await client.call_tool(tool.name, json.loads(call["function"]["arguments"]))
            text = "".join(getattr(block, "text", "") for block in result.content)
            body["messages"] = [
                *ask,
                message,
                {"role": "tool", "tool_call_id": call["id"], "content": text},
            ]
            await post(setup.upstream_url + chat, body)
            return time.perf_counter() - started

        async def proxied_loop() -> float:
            started = time.perf_counter()
            async with session.post(setup.proxy_url + chat, data=through, headers=HEADERS) as r:
                assert (await r.json())["choices"][0]["message"]["content"] == REPLY_TEXT
            return time.perf_counter() - started

        setup.unpinned()
        for _ in range(20):  # warm both paths
            await direct_loop()
            await proxied_loop()
        direct: list[float] = []
        proxied: list[float] = []
        per_round = max(10, args.latency_requests // (4 * args.rounds))
        for _ in range(args.rounds):
            direct += [await direct_loop() for _ in range(per_round)]
            proxied += [await proxied_loop() for _ in range(per_round)]
    results = []
    for q in (50, 99):
        d, p = percentile(direct, q) * 1000, percentile(proxied, q) * 1000
        results.append(
            Result(
                f"MCP tool loop (2 rounds): p{q} latency at concurrency 1",
                d,
                p,
                "ms",
                note=f"added {p - d:+.2f} ms (direct: the client runs the loop)",
            )
        )
    return results


async def run(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lmbridge-bench-"))
    fake, upstream_url = await start_child(
        [sys.executable, "-m", "proxy.bench.upstream"], tmp / "upstream.log"
    )
    port = free_port()
    mcp_json = tmp / "mcp.json"
    server = {"command": sys.executable, "args": ["-m", "proxy.bench.mcp_server"]}
    mcp_json.write_text(json.dumps({"mcpServers": {"bench": server}}))
    log = tmp / "lmbridge.log"
    try:
        daemon = await start_daemon(
            [
                "--upstream",
                upstream_url,
                "--port",
                str(port),
                "--db",
                str(tmp / "bench.db"),
                "--mcp-config",
                str(mcp_json),
                "--log-level",
                args.log_level,
            ],
            log,
        )
    except BaseException:
        await stop(fake)
        raise
    proxy_url = f"http://127.0.0.1:{port}"
    results: list[Result] = []
    placement: Placement | None = None
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, proxy_url, daemon, log)
            placement = (
                Placement.create(daemon.pid, [os.getpid(), fake.pid], writer_processes)
                if args.pin
                else None
            )
            setup = Setup(args, session, upstream_url, proxy_url, fake.pid, daemon.pid, placement)
            chat = "/v1/chat/completions"
            for url in (upstream_url, proxy_url):  # warm both paths
                await throughput(session, setup.at(url) + chat, PLAIN_BODY, args.concurrency, 1.0)
                await throughput(session, url + chat, STREAM_BODY, args.concurrency, 0.5)
            if "passthrough" in args.only:
                results += await measure_passthrough(setup)
            if "responses" in args.only:
                results += await measure_responses(setup)
            if "mcp" in args.only:
                results += await measure_mcp(setup)
            if "agent" in args.only:
                results += await measure_agent_loop(setup)
            if "output" in args.only:
                results += await measure_model_output(setup)
            if "lifecycle" in args.only:
                results += await measure_lifecycle(args, tmp)
            if "routing" in args.only:
                results += await measure_routing(setup, tmp)
            async with session.get(upstream_url + "/bench/stats") as resp:
                upstream_stats = await resp.json()
    finally:
        memory = peak_rss_mb(daemon.pid)
        writer_memory = [peak_rss_mb(pid) for pid in writer_processes(daemon.pid)]
        await stop(daemon)
        await stop(fake)
    return {
        "machine": machine_description(),
        "settings": {
            "duration_s": args.duration,
            "rounds": args.rounds,
            "latency_requests": args.latency_requests,
            "concurrency": args.concurrency,
            "chain_turns": args.chain_turns,
            "agent_turns": args.agent_turns,
            "daemon_log_level": args.log_level,
            "placement": (placement.describe() if placement is not None else "left to the kernel"),
        },
        "results": [r.__dict__ for r in results],
        "proxy_peak_rss_mb": memory,
        "writer_peak_rss_mb": writer_memory[0] if writer_memory else None,
        "upstream": upstream_stats,
        "validation_us": await asyncio.to_thread(validation_cost_us),
    }


def validation_cost_us(models: int = 50, calls: int = 200_000) -> float:
    """CPU cost of resolving a model against a fresh cached list, in microseconds."""
    from proxy.catalog import ModelCatalog
    from proxy.config import ModelsConfig
    from proxy.model_records import ModelInfo, ModelList

    listing = ModelList.build(
        [ModelInfo(f"publisher/model-{i}", "llm", "loaded") for i in range(models)],
        "openai",
        time.monotonic(),
    )

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


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"machine: {report['machine']}",
        f"placement: {report['settings']['placement']}",
        "",
    ]
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
    if report.get("writer_peak_rss_mb") is not None:
        lines.append(f"its SQLite writer process: {report['writer_peak_rss_mb']:.1f} MB")
    return "\n".join(lines) + "\n"
