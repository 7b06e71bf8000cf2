"""``lmbridge bench``: what lmbridge costs, measured side by side with direct requests.

Not on the request path: only the command line imports this package.

- ``fake``: the proxy against a fast fake upstream (``upstream``, run as a child) and
  an MCP server with one cheap tool (``mcp_server``), throughput and latency, direct and
  through the daemon, in alternating rounds of one run;
- ``agent_loop``: an agent loop over the WebSocket mode and over HTTP SSE;
- ``lifecycle``: the first requests for a model that must be loaded;
- ``real`` (``--real``): prompt-cache reuse over a Responses chain on llama.cpp;
- ``load`` generates the requests, ``processes`` starts the children and reads their
  CPU and memory, ``placement`` pins them to CPUs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from proxy.bench.processes import BenchError


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
    parser.add_argument(
        "--chain-turns",
        type=int,
        default=1000,
        help="length of the chain whose last turn is timed (default 1000)",
    )
    parser.add_argument(
        "--chain-samples", type=int, default=50, help="timed continuations per round (default 50)"
    )
    parser.add_argument(
        "--agent-turns",
        type=int,
        default=50,
        help="turns of the agent loops over WebSocket and HTTP SSE (default 50)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=["passthrough", "responses", "mcp", "agent", "output", "lifecycle", "routing"],
        default=["passthrough", "responses", "mcp", "agent", "output", "lifecycle", "routing"],
        help="what to measure (output: streamed chat with text calls and <think> read, "
        "against the same with the reading off; lifecycle: --concurrency first requests "
        "for a model LM Studio loads in 2 s; routing: pass-through with two upstreams against "
        "one)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="instead: prompt-cache reuse over a /v1/responses chain on "
        "llama.cpp with SmolLM2 (needs lmbridge[local])",
    )
    parser.add_argument(
        "--real-turns", type=int, default=6, help="turns of the --real chain (default 6)"
    )
    parser.add_argument(
        "--no-pin",
        dest="pin",
        action="store_false",
        help="let the kernel place the processes (default on Linux: lmbridge gets a CPU of "
        "its own in proxied rounds; see proxy/bench/placement.py)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument(
        "--log-level",
        default="info",
        help="the daemon's log level during the run (default info; its log goes to /dev/null)",
    )


def run_bench(args: argparse.Namespace) -> int:
    import importlib

    from proxy.embedded import EmbeddedError

    chosen = importlib.import_module("proxy.bench.real" if args.real else "proxy.bench.fake")

    try:
        report = asyncio.run(chosen.run(args))
    except (BenchError, EmbeddedError) as exc:
        sys.stderr.write(f"lmbridge bench: {exc}\n")
        return 1
    sys.stdout.write(chosen.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0
