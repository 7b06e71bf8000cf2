"""A soak of the daemon: mixed requests at a concurrency for a bounded time, faults on
request, then a check that nothing acknowledged was lost.

    python -m tests.soak --duration 240 --concurrency 64 --kill-writer-every 20 --kill-daemon

Runs ``lmbridge serve`` (this installation's, or ``--lmbridge PATH``) against the
bench's fast fake upstream on 127.0.0.1, with a database in a temporary directory.
Each worker loops over a mix: chat completions (plain and streamed), stored responses,
continuations of a response it was given earlier, background responses, conversation
turns, and reads of stored responses. With ``--kill-writer-every S`` the daemon's
SQLite writer process is killed (SIGKILL) every S seconds; with ``--kill-daemon`` the
daemon itself is killed at the end of the load and started again on the same database.
Then every acknowledged response id must be readable, and a sample of them
continuable.

Prints one JSON report; exits 1 when a request failed in a way a client should never
see (a 5xx other than the faults' own, a malformed answer) or an acknowledged id is
lost. Not part of the default test run (tests/e2e/test_soak.py runs it for seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from proxy.bench.processes import (
    free_port,
    peak_rss_mb,
    start_child,
    start_daemon,
    stop,
    wait_ready,
    writer_processes,
)
from proxy.bench.upstream import BENCH_MODEL

CHAT = "/v1/chat/completions"
RESPONSES = "/v1/responses"
# While a fault is injected, these are the answers a client may get for a request in
# flight: the daemon says storage failed (503) or the connection drops. Anything else
# 5xx is a failure of the soak.
FAULT_STATUSES = frozenset({503})


@dataclass
class Tally:
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)
    faults_active: bool = False

    def failed(self, what: str) -> None:
        if len(self.failures) < 50:
            self.failures.append(what)


async def _post(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], tally: Tally, kind: str
) -> dict[str, Any] | None:
    tally.requests[kind] += 1
    try:
        async with session.post(url, json=body) as resp:
            raw = await resp.read()
            tally.statuses[f"{kind} {resp.status}"] += 1
            if resp.status == 200:
                if body.get("stream"):
                    if not raw.rstrip().endswith(b"data: [DONE]"):
                        tally.failed(f"{kind}: a stream without [DONE]")
                    return None
                return dict(json.loads(raw))
            if resp.status == 409:  # conversation_locked: a concurrent turn, by design
                return None
            if resp.status in FAULT_STATUSES and tally.faults_active:
                return None
            tally.failed(f"{kind}: {resp.status} {raw[:200]!r}")
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.statuses[f"{kind} {type(exc).__name__}"] += 1
        if not tally.faults_active:
            tally.failed(f"{kind}: {type(exc).__name__} {exc}")
    return None


async def worker(
    session: aiohttp.ClientSession, base: str, deadline: float, tally: Tally, seed: int
) -> None:
    rng = random.Random(seed)
    conversation: str | None = None
    mine: list[str] = []
    while time.monotonic() < deadline:
        pick = rng.random()
        ask = {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "Hi."}]}
        if pick < 0.25:
            await _post(session, base + CHAT, ask, tally, "chat")
        elif pick < 0.35:
            await _post(session, base + CHAT, {**ask, "stream": True}, tally, "chat stream")
        elif pick < 0.60:
            body: dict[str, Any] = {"model": BENCH_MODEL, "input": "Hello."}
            kind = "response"
            if mine and rng.random() < 0.5:
                body["previous_response_id"] = rng.choice(mine)
                kind = "continuation"
            answer = await _post(session, base + RESPONSES, body, tally, kind)
            if answer is not None:
                mine.append(answer["id"])
                tally.acknowledged.append(answer["id"])
        elif pick < 0.70:
            body = {"model": BENCH_MODEL, "input": "Hello.", "background": True}
            answer = await _post(session, base + RESPONSES, body, tally, "background")
            if answer is not None:
                tally.acknowledged.append(answer["id"])
        elif pick < 0.85:
            if conversation is None:
                created = await _post(session, base + "/v1/conversations", {}, tally, "conv")
                conversation = created["id"] if created else None
                continue
            body = {"model": BENCH_MODEL, "input": "Hello.", "conversation": conversation}
            answer = await _post(session, base + RESPONSES, body, tally, "conversation turn")
            if answer is not None:
                tally.acknowledged.append(answer["id"])
        elif mine:
            tally.requests["read"] += 1
            try:
                async with session.get(f"{base}{RESPONSES}/{rng.choice(mine)}") as resp:
                    await resp.read()
                    tally.statuses[f"read {resp.status}"] += 1
                    if resp.status != 200 and not tally.faults_active:
                        tally.failed(f"read: {resp.status}")
            except aiohttp.ClientError as exc:
                if not tally.faults_active:
                    tally.failed(f"read: {exc}")


async def kill_writers(daemon_pid: int, every: float, deadline: float, tally: Tally) -> int:
    kills = 0
    while time.monotonic() + every < deadline:
        await asyncio.sleep(every)
        for pid in writer_processes(daemon_pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills += 1
    return kills


async def verify(
    session: aiohttp.ClientSession, base: str, ids: list[str], sample: int
) -> dict[str, Any]:
    """Every acknowledged id is readable; a sample is continuable."""
    missing: list[str] = []
    unfinished = 0
    gate = asyncio.Semaphore(32)

    async def check(response_id: str) -> None:
        nonlocal unfinished
        async with gate, session.get(f"{base}{RESPONSES}/{response_id}") as resp:
            if resp.status != 200:
                missing.append(response_id)
            elif (await resp.json())["status"] in ("queued", "in_progress"):
                unfinished += 1

    await asyncio.gather(*(check(response_id) for response_id in ids))
    continued = 0
    for response_id in random.sample(ids, min(sample, len(ids))):
        body = {"model": BENCH_MODEL, "input": "Again.", "previous_response_id": response_id}
        async with session.post(base + RESPONSES, json=body) as resp:
            await resp.read()
            continued += resp.status == 200
    return {
        "acknowledged": len(ids),
        "missing": len(missing),
        "missing_ids": missing[:20],
        # Background responses still running when the load stopped (none after a kill:
        # a restart marks them failed).
        "unfinished": unfinished,
        "continuations_tried": min(sample, len(ids)),
        "continuations_ok": continued,
    }


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="lmbridge-soak-"))
    fake, upstream = await start_child(
        [sys.executable, "-m", "proxy.bench.upstream"], tmp / "upstream.log"
    )
    port = free_port()
    flags = [
        "--upstream",
        upstream,
        "--port",
        str(port),
        "--db",
        str(tmp / "soak.db"),
        "--log-level",
        "warning",
    ]
    log = tmp / "lmbridge.log"
    base = f"http://127.0.0.1:{port}"
    tally = Tally()
    report: dict[str, Any] = {"duration_s": args.duration, "concurrency": args.concurrency}
    command = [args.lmbridge] if args.lmbridge else None
    daemon = await start_daemon(flags, log, command)
    connector = aiohttp.TCPConnector(limit=0)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            await wait_ready(session, base, daemon, log)
            started_rss = peak_rss_mb(daemon.pid)
            deadline = time.monotonic() + args.duration
            tally.faults_active = bool(args.kill_writer_every)
            killer = (
                asyncio.ensure_future(
                    kill_writers(daemon.pid, args.kill_writer_every, deadline, tally)
                )
                if args.kill_writer_every
                else None
            )
            started = time.monotonic()
            await asyncio.gather(
                *(worker(session, base, deadline, tally, n) for n in range(args.concurrency))
            )
            elapsed = time.monotonic() - started
            report["writer_kills"] = await killer if killer is not None else 0
            report["daemon_peak_rss_mb"] = {"start": started_rss, "end": peak_rss_mb(daemon.pid)}
            if args.kill_daemon:
                daemon.kill()
                await daemon.wait()
                daemon = await start_daemon(flags, log, command)
                await wait_ready(session, base, daemon, log)
                report["daemon_killed"] = True
            await asyncio.sleep(args.settle)  # background responses finish
            report["verify"] = await verify(session, base, tally.acknowledged, args.sample)
    finally:
        await stop(daemon)
        await stop(fake)
    total = sum(tally.requests.values())
    report.update(
        requests=total,
        requests_per_s=round(total / elapsed, 1),
        by_kind=dict(tally.requests),
        statuses=dict(sorted(tally.statuses.items())),
        failures=tally.failures,
    )
    return report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--kill-writer-every", type=float, default=0.0, metavar="S")
    parser.add_argument("--kill-daemon", action="store_true")
    parser.add_argument("--sample", type=int, default=200, help="continuations to check")
    parser.add_argument(
        "--lmbridge", metavar="PATH", help="the lmbridge command to run (default: this one's)"
    )
    parser.add_argument("--settle", type=float, default=1.0, help="seconds before checking")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    report = asyncio.run(soak(args))
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    verified = report["verify"]
    ok = not report["failures"] and not verified["missing"]
    ok = ok and verified["continuations_ok"] == verified["continuations_tried"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
