"""The routing layer's cost: chat pass-through through the daemon with one upstream
(the benchmark's own daemon) against a second daemon configured with two
``[[upstreams]]`` that both serve the model (two entries for the same fast fake
upstream, so that only lmbridge's work differs), in alternate rounds of the same run.

Reported: requests/s at ``--concurrency`` and lmbridge's CPU per request, plain and
streamed; the target is a two-upstream daemon no more than 5% slower per request.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from proxy.bench.load import PLAIN_BODY, STREAM_BODY, Load, cpu_per_request_us, throughput
from proxy.bench.processes import free_port, start_daemon, stop, wait_ready

if TYPE_CHECKING:
    from proxy.bench.fake import Result, Setup

CHAT = "/v1/chat/completions"


def two_upstreams_config(upstream_url: str) -> str:
    return "".join(
        f'[[upstreams]]\nname = "{name}"\nurl = "{upstream_url}"\nkind = "openai"\n\n'
        for name in ("first", "second")
    )


async def measure_routing(setup: Setup, tmp: Path) -> list[Result]:
    from proxy.bench.fake import Result

    args, session = setup.args, setup.session
    config = tmp / "two-upstreams.toml"
    config.write_text(two_upstreams_config(setup.upstream_url))
    port = free_port()
    log = tmp / "lmbridge-two.log"
    daemon = await start_daemon(
        ["--config", str(config), "--port", str(port), "--db", str(tmp / "two.db")], log
    )
    two_url = f"http://127.0.0.1:{port}"
    results: list[Result] = []
    try:
        await wait_ready(session, two_url, daemon, log)
        for base in (setup.proxy_url, two_url):  # warm both
            await throughput(session, base + CHAT, PLAIN_BODY, args.concurrency, 1.0)
        for label, body in (("plain", PLAIN_BODY), ("stream (20 chunks)", STREAM_BODY)):
            one: list[Load] = []
            two: list[Load] = []
            for _ in range(args.rounds):
                setup.at(setup.proxy_url)
                one.append(
                    await throughput(
                        session,
                        setup.proxy_url + CHAT,
                        body,
                        args.concurrency,
                        args.duration,
                        setup.daemon_pid,
                    )
                )
                two.append(
                    await throughput(
                        session, two_url + CHAT, body, args.concurrency, args.duration, daemon.pid
                    )
                )
            rps_one = statistics.median(load.rps for load in one)
            rps_two = statistics.median(load.rps for load in two)
            results.append(
                Result(
                    f"routing, {label}: req/s, one upstream vs two",
                    rps_one,
                    rps_two,
                    "req/s",
                    note=f"two/one = {rps_two / rps_one:.0%}",
                )
            )
            cpu_one, cpu_two = cpu_per_request_us(one), cpu_per_request_us(two)
            if cpu_one is not None and cpu_two is not None:
                results.append(
                    Result(
                        f"routing, {label}: lmbridge CPU per request, one upstream vs two",
                        cpu_one,
                        cpu_two,
                        "us",
                        note=f"{cpu_two / cpu_one - 1:+.1%}",
                    )
                )
    finally:
        await stop(daemon)
    return results
