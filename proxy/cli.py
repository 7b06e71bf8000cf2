"""The ``lmbridge`` command: serve, check-config, models, bench.

Every failure an operator can cause (a bad config, an unreachable upstream, a
port in use) ends with one readable line on stderr and a non-zero status,
never a traceback: 2 for configuration and usage errors, 1 for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Coroutine, Sequence
from typing import Any

import aiohttp

from proxy import __version__
from proxy.config import Config, ConfigError, load_config, render_toml

EXIT_FAILURE = 1
EXIT_CONFIG = 2


def _add_config_flags(parser: argparse.ArgumentParser, *, listen: bool = True) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    if listen:
        parser.add_argument("--host", help="address to listen on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, help="port to listen on (default 1235)")
    parser.add_argument(
        "--upstream", metavar="URL", help="upstream server (default http://127.0.0.1:1234)"
    )
    parser.add_argument("--db", metavar="PATH", help="SQLite database file")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["text", "json"])
    parser.add_argument(
        "--mcp-config",
        metavar="FILE",
        action="append",
        help="an mcp.json file of MCP servers (repeatable; later files override earlier names)",
    )
    parser.add_argument(
        "--embedded",
        action="store_true",
        default=None,
        help="start llama.cpp with a small model as the upstream (needs lmbridge[local])",
    )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "server.host": getattr(args, "host", None),
        "server.port": getattr(args, "port", None),
        "bridge.url": getattr(args, "url", None),
        "upstream.url": args.upstream,
        "storage.path": args.db,
        "logging.level": args.log_level,
        "logging.format": args.log_format,
        "embedded.enabled": args.embedded,
        "mcp.config_files": args.mcp_config,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lmbridge",
        description="A local OpenAI-compatible gateway in front of LM Studio and other "
        "local model servers.",
    )
    parser.add_argument("--version", action="version", version=f"lmbridge {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the daemon")
    _add_config_flags(serve)
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it (secrets masked)"
    )
    _add_config_flags(check)
    check.set_defaults(func=cmd_check_config)

    models = commands.add_parser("models", help="list the upstream's models")
    _add_config_flags(models)
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=cmd_models)

    mcp_list = commands.add_parser(
        "mcp-list", help="connect to the configured MCP servers and print their tools"
    )
    _add_config_flags(mcp_list)
    mcp_list.add_argument("--json", action="store_true", help="print JSON instead of text")
    mcp_list.set_defaults(func=cmd_mcp_list)

    mcp = commands.add_parser(
        "mcp",
        help="run lmbridge as an MCP server (stdio) so that coding assistants can hand "
        "work to local models",
    )
    mcp.add_argument("--url", help="the daemon to talk to (default: where the configuration's "
                     "daemon listens, http://127.0.0.1:1235)")  # fmt: skip
    mcp.add_argument("--transport", choices=["stdio", "http"], default="stdio",
                     help="stdio (default) or streamable HTTP on 127.0.0.1")  # fmt: skip
    mcp.add_argument("--port", dest="mcp_port", metavar="P", type=int, default=1236,
                     help="port of the HTTP transport (default 1236)")  # fmt: skip
    mcp.add_argument("--standalone", action="store_true",
                     help="run the daemon in this process instead of talking to one")  # fmt: skip
    _add_config_flags(mcp, listen=False)
    mcp.set_defaults(func=cmd_mcp)

    gc = commands.add_parser(
        "gc", help="purge expired responses and conversations from the database now"
    )
    _add_config_flags(gc)
    gc.set_defaults(func=cmd_gc)

    bench = commands.add_parser(
        "bench", help="measure the proxy against a fast fake upstream, side by side"
    )
    from proxy.bench import add_arguments

    add_arguments(bench)
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        _fail(f"configuration error: {exc}")
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


def _fail(message: str) -> None:
    sys.stderr.write(f"lmbridge: {message}\n")


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config, flags=_flags(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from proxy.logs import configure_logging
    from proxy.serve import run

    config = _load(args)
    configure_logging(config.logging.level, config.logging.format)
    return _run_service(run(config), f"cannot listen on {config.server.host}:{config.server.port}")


def _run_service(main: Coroutine[Any, Any, None], on_os_error: str) -> int:
    """Run the daemon (or what holds it) to its end; what stops it at start is one line."""
    from proxy.embedded import EmbeddedError
    from storage.sqlite import StorageError

    try:
        asyncio.run(main)
    except EmbeddedError as exc:
        _fail(str(exc))
        return EXIT_CONFIG
    except StorageError as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    except OSError as exc:
        _fail(f"{on_os_error}: {exc.strerror or exc}")
        return EXIT_FAILURE
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    sys.stdout.write(render_toml(config))
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from proxy.errors import LMBridgeError

    config = _load(args)
    try:
        models = asyncio.run(_read_models(config))
    except LMBridgeError as exc:
        _fail(exc.message)
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(json.dumps([m.as_openai() for m in models.models], indent=2) + "\n")
        return 0
    rows = [("ID", "TYPE", "STATE", "CONTEXT")]
    rows += [
        (m.id, m.type, m.state, str(m.context_length) if m.context_length else "-")
        for m in models.models
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        sys.stdout.write(
            "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        )
    if not models.models:
        sys.stdout.write(f"(the upstream at {config.upstream.url} lists no models)\n")
    return 0


async def _read_models(config: Config):  # type: ignore[no-untyped-def]
    from proxy.catalog import ModelListReader
    from proxy.metrics import Metrics
    from proxy.upstream import UpstreamClient, new_session

    session: aiohttp.ClientSession = new_session(config.upstream)
    async with session:
        upstream = UpstreamClient(config.upstream, session, Metrics())
        return await ModelListReader(upstream.get_json).read()


def cmd_mcp(args: argparse.Namespace) -> int:
    from proxy.bridge.run import run
    from proxy.logs import configure_logging

    config = _load(args)
    # stdout belongs to the MCP protocol on stdio: every log goes to stderr.
    configure_logging(config.logging.level, config.logging.format)
    return _run_service(
        run(config, args.transport, args.mcp_port, standalone=args.standalone), "cannot start"
    )


def cmd_mcp_list(args: argparse.Namespace) -> int:
    from proxy.logs import configure_logging

    config = _load(args)
    configure_logging("error", "text")
    servers = asyncio.run(_list_mcp(config))
    if args.json:
        sys.stdout.write(json.dumps(servers, indent=2) + "\n")
    else:
        if not servers:
            sys.stdout.write("no MCP servers configured (mcp.config_files, [mcp.servers])\n")
        for name, server in servers.items():
            state = server["state"] + (f": {server['error']}" if server.get("error") else "")
            sys.stdout.write(f"{name}  ({state})\n")
            for tool in server["tools"]:
                line = (tool["description"] or "").strip().splitlines()
                sys.stdout.write(f"  {tool['name']}" + (f"  {line[0][:80]}" if line else "") + "\n")
    return 0 if all(s["state"] in ("ready", "disabled") for s in servers.values()) else EXIT_FAILURE


async def _list_mcp(config: Config) -> dict[str, Any]:
    from proxy.mcp.servers import READY_WAIT, MCPServers
    from proxy.metrics import Metrics

    servers = MCPServers(config.mcp, Metrics(), config.storage.path.parent)
    try:
        await asyncio.gather(*(s.ready(READY_WAIT * 3) for s in servers.supervisors.values()))
        return {server.pop("name"): server for server in servers.describe()}
    finally:
        await servers.close()


def cmd_gc(args: argparse.Namespace) -> int:
    import time

    from storage.sqlite import SQLiteStore, StorageError

    config = _load(args)
    path = config.storage.path

    async def purge() -> int:
        store = await SQLiteStore.open(path)
        try:
            return await store.purge_expired(int(time.time()))
        finally:
            await store.close()

    before = path.stat().st_size if path.exists() else 0
    try:
        purged = asyncio.run(purge())
    except StorageError as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    after = path.stat().st_size if path.exists() else 0
    sys.stdout.write(
        f"purged {purged} expired object(s) from {path} ({before / 1e6:.1f} MB -> "
        f"{after / 1e6:.1f} MB)\n"
    )
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from proxy.bench import run_bench

    return run_bench(args)
