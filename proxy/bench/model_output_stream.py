"""``lmbridge bench --only output``: streamed chat completions through the daemon with
what models write read (text calls with a tool offered, ``<think>`` without tools)
against the same requests with the reading turned off by the request's ``lmbridge``
field, in alternating rounds."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from proxy.bench.load import Load, cpu_per_request_us, latencies, percentile, throughput
from proxy.bench.upstream import BENCH_MODEL, STREAM_CHUNKS, stream_chunk
from proxy.chat_output import ChatStreamRewriter, output_for
from proxy.chat_stream_editor import ChatStreamEditor
from proxy.profiles import ModelProfile

if TYPE_CHECKING:
    from proxy.bench.fake import Result, Setup


def _stream_body(**extra: Any) -> bytes:
    ask = [{"role": "user", "content": "Say hello."}]
    return json.dumps({"model": BENCH_MODEL, "stream": True, "messages": ask, **extra}).encode()


_BENCH_TOOL = {
    "type": "function",
    "function": {"name": "lookup", "parameters": {"type": "object", "properties": {}}},
}
# The model answers in text (tool_choice "none"), so every delta goes through the readers.
_WITH_TOOLS = {"tools": [_BENCH_TOOL], "tool_choice": "none"}
OUTPUT_PAIRS = (
    (
        "stream with tools offered, text calls read vs not",
        _stream_body(**_WITH_TOOLS, lmbridge={"text_tool_calls": False, "think_tags": False}),
        _stream_body(**_WITH_TOOLS),
    ),
    (
        "stream without tools, <think> looked for vs not",
        _stream_body(lmbridge={"think_tags": False}),
        _stream_body(),
    ),
)


def editor_cost_us(tools: list[Any], *, repeat: int = 400) -> float:
    """Microseconds of CPU the readers take over one stream of the fast upstream (its own
    bytes, one event per read), from the request's tools to the stream's end: the best
    of ``repeat``. In this process, so that a machine shared with other work still gives
    a figure that holds (the daemon's CPU per request varies by 10% from round to round
    on such a machine)."""
    profile = ModelProfile()
    events = [stream_chunk(1, i) for i in range(STREAM_CHUNKS)] + [b"data: [DONE]\n\n"]
    best = float("inf")
    for _ in range(repeat):
        start = time.thread_time_ns()
        editor = ChatStreamEditor(ChatStreamRewriter(output_for(tools, profile)))
        for event in events:
            if not editor.relaying:
                editor.feed(event)
        editor.finish()
        best = min(best, time.thread_time_ns() - start)
    return best / 1000


async def measure_model_output(setup: Setup) -> list[Result]:
    """Streamed chat completions through the daemon with what models write read (text
    calls, <think>) against the same requests with the reading turned off (the
    ``lmbridge`` field), alternating rounds: requests/s at concurrency 32 and latency at
    concurrency 1. Reported as direct = off, proxy = on."""
    from proxy.bench.fake import Result, _median_rps

    args, session = setup.args, setup.session
    url = setup.proxy_url + "/v1/chat/completions"
    results: list[Result] = []
    for label, off_body, on_body in OUTPUT_PAIRS:
        off: list[Load] = []
        on: list[Load] = []
        for _ in range(args.rounds):
            setup.at(setup.proxy_url)
            pid = setup.daemon_pid
            off.append(
                await throughput(session, url, off_body, args.concurrency, args.duration, pid)
            )
            on.append(await throughput(session, url, on_body, args.concurrency, args.duration, pid))
        spread_off = [round(load.rps) for load in off]
        spread_on = [round(load.rps) for load in on]
        cpu_off, cpu_on = cpu_per_request_us(off), cpu_per_request_us(on)
        # The readers alone, measured here: steadier than the daemon's CPU rows.
        readers = editor_cost_us(json.loads(on_body).get("tools") or [])
        share = f" ({readers / cpu_off:.1%} of a request with them off)" if cpu_off else ""
        results.append(
            Result(
                f"{label}: requests/s at concurrency {args.concurrency}",
                _median_rps(off),
                _median_rps(on),
                "req/s",
                note=f"on/off = {_median_rps(on) / _median_rps(off):.1%}; rounds off "
                f"{spread_off}, on {spread_on}; the readers' CPU over one stream, in "
                f"process: {readers:.1f} us{share}",
            )
        )
        if cpu_off is not None and cpu_on is not None:
            results.append(
                Result(
                    f"{label}: lmbridge's CPU per request",
                    cpu_off,
                    cpu_on,
                    "us",
                    note=f"added {cpu_on - cpu_off:+.1f} us ({cpu_on / cpu_off - 1:+.1%})",
                )
            )
        lat_off: list[float] = []
        lat_on: list[float] = []
        setup.unpinned()
        for _ in range(args.rounds):
            n = args.latency_requests // args.rounds
            lat_off += await latencies(session, url, off_body, n)
            lat_on += await latencies(session, url, on_body, n)
        for q in (50, 99):
            oq, nq = percentile(lat_off, q) * 1000, percentile(lat_on, q) * 1000
            results.append(
                Result(
                    f"{label}: p{q} latency at concurrency 1",
                    oq,
                    nq,
                    "ms",
                    note=f"added {nq - oq:+.3f} ms",
                )
            )
    return results
