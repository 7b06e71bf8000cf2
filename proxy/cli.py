"""The ``lmbridge`` command: serve, check-config, models, ps, load, unload, usage, bench.

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
from proxy.redact import redact_url

EXIT_FAILURE = 1
EXIT_CONFIG = 2


# Which configuration flags each command takes: only flags that change what it does.
SERVE_FLAGS = ("listen", "upstream", "storage", "logging", "mcp", "embedded")


def _add_config_flags(parser: argparse.ArgumentParser, *groups: str) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    if "listen" in groups:
        parser.add_argument("--host", help="address the daemon listens on (default 127.0.0.1)")
        parser.add_argument("--port", type=int, help="port the daemon listens on (default 1235)")
    if "upstream" in groups:
        parser.add_argument(
            "--upstream", metavar="URL", help="upstream server (default http://127.0.0.1:1234)"
        )
    if "storage" in groups:
        parser.add_argument("--db", metavar="PATH", help="SQLite database file")
    if "logging" in groups:
        parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
        parser.add_argument("--log-format", choices=["text", "json"])
    if "mcp" in groups:
        parser.add_argument(
            "--mcp-config",
            metavar="FILE",
            action="append",
            help="an mcp.json file of MCP servers (repeatable; later files override earlier names)",
        )
    if "embedded" in groups:
        parser.add_argument(
            "--embedded",
            action="store_true",
            default=None,
            help="start llama.cpp with a small model as the upstream (needs lmbridge[local])",
        )


def _add_upstream_name(parser: argparse.ArgumentParser) -> None:
    # Not dest "upstream": that one is the --upstream URL of the configuration flags.
    parser.add_argument(
        "--upstream",
        dest="upstream_name",
        metavar="NAME",
        help="the [[upstreams]] entry to act on (default: the first that lists the model)",
    )


def _flags(args: argparse.Namespace) -> dict[str, Any]:
    flag = vars(args).get
    return {
        "server.host": flag("host"),
        "server.port": flag("port"),
        "bridge.url": flag("url"),
        "upstream.url": flag("upstream"),
        "storage.path": flag("db"),
        "logging.level": flag("log_level"),
        "logging.format": flag("log_format"),
        "embedded.enabled": flag("embedded"),
        "mcp.config_files": flag("mcp_config"),
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
    _add_config_flags(serve, *SERVE_FLAGS)
    serve.set_defaults(func=cmd_serve)

    check = commands.add_parser(
        "check-config", help="validate the configuration and print it (secrets masked)"
    )
    _add_config_flags(check, *SERVE_FLAGS)
    check.set_defaults(func=cmd_check_config)

    models = commands.add_parser(
        "models",
        help="list the models the daemon serves (or, when it is not running, the upstream's)",
        description="Asks the running daemon (where the configuration says it listens) for "
        "its models; when none runs, or with --upstream, reads the upstream's list directly.",
    )
    _add_config_flags(models, "listen", "upstream")
    models.add_argument("--json", action="store_true", help="print JSON instead of a table")
    models.set_defaults(func=cmd_models)

    ps = commands.add_parser(
        "ps",
        help="the models loaded upstream: by whom, idle for how long, requests on them",
        description="Asks the running daemon (where the configuration says it listens).",
    )
    _add_config_flags(ps, "listen")
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    ps.set_defaults(func=cmd_ps)
    load = commands.add_parser(
        "load",
        help="have the running daemon load a model (LM Studio 0.4+, llama.cpp router, Ollama)",
    )
    _add_config_flags(load, "listen")
    load.add_argument("model", help="the model id (or an alias)")
    load.add_argument(
        "--ttl", metavar="S", help="unload it after this idle time (seconds or e.g. 30m)"
    )
    _add_upstream_name(load)
    load.set_defaults(func=cmd_load)
    unload = commands.add_parser(
        "unload",
        help="have the running daemon unload a model (LM Studio 0.4+, llama.cpp router, Ollama)",
    )
    _add_config_flags(unload, "listen")
    unload.add_argument("model", help="the model id (or an alias)")
    _add_upstream_name(unload)
    unload.set_defaults(func=cmd_unload)

    mcp_list = commands.add_parser(
        "mcp-list", help="connect to the configured MCP servers and print their tools"
    )
    _add_config_flags(mcp_list, "mcp")
    mcp_list.add_argument("--json", action="store_true", help="print JSON instead of text")
    mcp_list.set_defaults(func=cmd_mcp_list)

    mcp = commands.add_parser(
        "mcp",
        help="run lmbridge as an MCP server (stdio) so that coding assistants can hand "
        "work to local models",
    )
    mcp.add_argument(
        "--url",
        help="the daemon to talk to (default: where the configuration's "
        "daemon listens, http://127.0.0.1:1235)",
    )
    mcp.add_argument(
        "--transport",
        choices=["stdio", "http"],
        default="stdio",
        help="stdio (default) or streamable HTTP on 127.0.0.1",
    )
    mcp.add_argument(
        "--port",
        dest="mcp_port",
        metavar="P",
        type=int,
        default=1236,
        help="port of the HTTP transport (default 1236)",
    )
    mcp.add_argument(
        "--standalone",
        action="store_true",
        help="run the daemon in this process instead of talking to one",
    )
    # Without --standalone these would do nothing: cmd_mcp refuses them.
    _add_config_flags(mcp, "upstream", "storage", "logging", "mcp", "embedded")
    mcp.set_defaults(func=cmd_mcp)

    usage = commands.add_parser(
        "usage",
        help="tokens, requests, errors and latency per key, model, upstream or day",
        description="Asks the running daemon (where the configuration says it listens) for "
        "its usage records summed per group. Times are unix seconds, a date (2025-01-31) or "
        "an RFC 3339 time; without --since, the last 24 hours.",
    )
    _add_config_flags(usage, "listen")
    usage.add_argument("--since", help="from this time (inclusive)")
    usage.add_argument("--until", help="up to this time (exclusive; default: now)")
    usage.add_argument(
        "--group-by", choices=["key", "model", "upstream", "day"], help="default: model"
    )
    usage.add_argument("--json", action="store_true", help="print JSON instead of a table")
    usage.set_defaults(func=cmd_usage)

    gc = commands.add_parser(
        "gc", help="purge expired responses and conversations from the database now"
    )
    _add_config_flags(gc, "storage")
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
        for problem in exc.problems:
            _fail(f"configuration error: {problem}")
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
    configure_logging(
        config.logging.level,
        config.logging.format,
        library_level=config.logging.library_level,
    )
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
    from proxy.bridge.client import DaemonError, DaemonUnreachable
    from proxy.errors import LMBridgeError

    config = _load(args)
    try:
        models, source = asyncio.run(_read_models(config, daemon_first=args.upstream is None))
    except (LMBridgeError, DaemonError) as exc:
        _fail(exc.message)
        return EXIT_FAILURE
    except DaemonUnreachable as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    if args.json:
        sys.stdout.write(json.dumps(models, indent=2) + "\n")
        return 0
    sys.stdout.write(render_models(models))
    sys.stdout.write(f"({len(models)} model(s) {source})\n")
    return 0


def render_models(models: list[dict[str, Any]]) -> str:
    """The models of /v1/models (lmbridge's shape) as a table; with several upstreams,
    which of them list each model."""
    several = len({u for m in models for u in m.get("upstreams") or ()}) > 1
    header = ("ID", "TYPE", "STATE", "CONTEXT", "TOOLS", "PROFILE")
    rows: list[tuple[str, ...]] = [(*header, "UPSTREAMS") if several else header]
    for m in models:
        name = str(m["id"]) + (f" (alias of {m['alias_for']})" if m.get("alias_for") else "")
        context = m.get("max_context_length")
        supports = m.get("supports_tools")
        tools = "-" if supports is None else "yes" if supports else "no (template drops them)"
        row: tuple[str, ...] = (
            name,
            str(m.get("type", "-")),
            str(m.get("state", "-")),
            str(context) if context else "-",
            tools,
            profile_summary(m.get("profile")),
        )
        if several:
            row = (*row, ", ".join(m.get("upstreams") or ()) or "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


def profile_summary(profile: Any) -> str:
    """A model profile (docs/profiles.md) in a few words: the thinking tags read ("+":
    opened by the template), reasoning sent back or not, tools described, text calls."""
    if not isinstance(profile, dict):
        return "-"
    tags = [str(t).split(",")[0] for t in profile.get("think_tags") or []]
    think = "/".join(tags) + ("+" if profile.get("think_opened") else "") if tags else "off"
    words = [f"think {think}", f"reasoning {profile.get('reasoning_in_history')}"]
    if profile.get("describe_tools"):
        words.append("tools described")
    if profile.get("text_tool_calls") is False:
        words.append("no text calls")
    return ", ".join(words)


async def _read_models(config: Config, *, daemon_first: bool) -> tuple[list[dict[str, Any]], str]:
    """What the daemon of this configuration serves; when none runs, what its upstream
    lists. The second value says where the list came from."""
    from proxy.bridge.client import DaemonClient, DaemonUnreachable
    from proxy.bridge.run import daemon_key, daemon_url
    from proxy.catalog import ModelCatalog, ModelListReader
    from proxy.metrics import Metrics
    from proxy.upstream import UpstreamClient, new_session

    if daemon_first:
        url = daemon_url(config)
        client = DaemonClient(url, daemon_key(config))
        try:
            listing = await client.get("/v1/models")
            return list(listing.get("data") or []), f"served by lmbridge at {url}"
        except DaemonUnreachable:
            if config.embedded.enabled:
                raise DaemonUnreachable(
                    f"lmbridge is not running at {url}; the embedded model runs inside "
                    "`lmbridge serve --embedded`: start it, then ask again"
                ) from None
        finally:
            await client.close()
    session: aiohttp.ClientSession = new_session(config.upstream)
    async with session:
        upstream = UpstreamClient(config.upstream, session, Metrics())
        models = await ModelListReader(upstream.get_json).read()
    where = f"listed by the upstream at {redact_url(config.upstream.url)}"
    if daemon_first:
        where += f"; lmbridge is not running at {daemon_url(config)}"
    catalog = ModelCatalog(config.models, ModelListReader(upstream.get_json).read)
    return [catalog.described(m) for m in models.models], where


def cmd_ps(args: argparse.Namespace) -> int:
    from proxy.model_commands import ps

    return ps(_load(args), as_json=args.json)


def cmd_load(args: argparse.Namespace) -> int:
    from proxy.model_commands import load

    return load(_load(args), args.model, args.ttl, args.upstream_name)


def cmd_unload(args: argparse.Namespace) -> int:
    from proxy.model_commands import unload

    return unload(_load(args), args.model, args.upstream_name)


def cmd_usage(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    from proxy.bridge.client import DaemonClient, DaemonError, DaemonUnreachable
    from proxy.bridge.run import daemon_key, daemon_url
    from proxy.usage_report import render_table

    config = _load(args)
    params = {"since": args.since, "until": args.until, "group_by": args.group_by}
    query = urlencode({name: value for name, value in params.items() if value})

    async def ask() -> dict[str, Any]:
        client = DaemonClient(daemon_url(config), daemon_key(config))
        try:
            return await client.get("/v1/lmbridge/usage" + (f"?{query}" if query else ""))
        finally:
            await client.close()

    try:
        answer = asyncio.run(ask())
    except DaemonError as exc:
        _fail(exc.message)
        return EXIT_FAILURE
    except DaemonUnreachable as exc:
        _fail(str(exc))
        return EXIT_FAILURE
    sys.stdout.write(json.dumps(answer, indent=2) + "\n" if args.json else render_table(answer))
    return 0


def cmd_mcp(args: argparse.Namespace) -> int:
    from proxy.bridge.run import run
    from proxy.logs import configure_logging

    daemon_only = {
        "--upstream": args.upstream,
        "--db": args.db,
        "--mcp-config": args.mcp_config,
        "--embedded": args.embedded,
    }
    given = [flag for flag, value in daemon_only.items() if value is not None]
    if given and not args.standalone:
        _fail(
            f"{', '.join(given)} configure the daemon and only apply with --standalone "
            "(without it, `lmbridge mcp` talks to the daemon at --url)"
        )
        return EXIT_CONFIG
    config = _load(args)
    # stdout belongs to the MCP protocol on stdio: every log goes to stderr.
    configure_logging(
        config.logging.level,
        config.logging.format,
        library_level=config.logging.library_level,
    )
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
            return await store.purge_expired(
                int(time.time()), retention=int(config.responses.retention)
            )
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
