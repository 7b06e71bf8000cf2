"""``lmbridge ps``, ``load`` and ``unload``: the running daemon's admin routes of the
upstream's models (``proxy/model_admin.py``), asked where the configuration says the
daemon listens, with its key. A failure is one line on stderr and exit status 1."""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from proxy.bridge.client import DaemonClient, DaemonError, DaemonUnreachable
from proxy.bridge.run import daemon_key, daemon_url
from proxy.config import Config

ADMIN_PATH = "/v1/lmbridge/models"
EXIT_FAILURE = 1


def ps(config: Config, *, as_json: bool) -> int:
    listing = _ask(config, ADMIN_PATH, None)
    if listing is None:
        return EXIT_FAILURE
    if as_json:
        sys.stdout.write(json.dumps(listing, indent=2) + "\n")
    elif not listing.get("loads_models"):
        sys.stdout.write(
            "(the upstream loads and unloads models itself: lmbridge loads models on LM "
            "Studio 0.4+, llama.cpp's router mode and Ollama; nothing to show)\n"
        )
    else:
        sys.stdout.write(render_ps(listing.get("data") or []))
    return 0


def render_ps(entries: list[dict[str, Any]]) -> str:
    """The models of /v1/lmbridge/models as a table; an UPSTREAM column when there are
    several ([[upstreams]]: none is the shorthand's "default")."""
    several = any(e.get("upstream", "default") != "default" for e in entries)
    where_head = ("UPSTREAM",) if several else ()
    rows: list[tuple[str, ...]] = [
        ("MODEL", *where_head, "STATE", "LOADED BY", "IDLE", "TTL", "RUNNING", "QUEUED")
    ]
    for e in entries:
        idle, ttl = e.get("idle_seconds"), e.get("ttl")
        where = (str(e.get("upstream") or "-"),) if several else ()
        rows.append(
            (
                str(e["model"]),
                *where,
                str(e.get("state", "-")),
                str(e.get("loaded_by") or "-"),
                "-" if idle is None else f"{idle:g}s",
                "-" if ttl is None else f"{ttl:g}s",
                str(e.get("running", 0)),
                str(e.get("queued", 0)),
            )
        )
    if len(rows) == 1:
        return "(no model loaded)\n"
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() + "\n"
        for row in rows
    )


def load(config: Config, model: str, ttl: str | None, upstream: str | None = None) -> int:
    body: dict[str, Any] = {"model": model}
    if ttl is not None:
        body["ttl"] = ttl
    if upstream is not None:
        body["upstream"] = upstream
    entry = _ask(config, ADMIN_PATH + "/load", body)
    if entry is None:
        return EXIT_FAILURE
    took = entry.get("load_seconds")
    how = f" in {took:g}s" if took is not None and entry.get("loaded_by") == "lmbridge" else ""
    where = f" on {entry['upstream']}" if upstream is not None else ""
    sys.stdout.write(f"{entry['model']} loaded{where}{how} (by {entry.get('loaded_by')})\n")
    return 0


def unload(config: Config, model: str, upstream: str | None = None) -> int:
    body = {"model": model} if upstream is None else {"model": model, "upstream": upstream}
    entry = _ask(config, ADMIN_PATH + "/unload", body)
    if entry is None:
        return EXIT_FAILURE
    sys.stdout.write(f"{entry['model']} unloaded\n")
    return 0


def _ask(config: Config, path: str, body: dict[str, Any] | None) -> dict[str, Any] | None:
    """The daemon's answer (a GET without a body), or None after one line on stderr."""

    async def ask() -> dict[str, Any]:
        client = DaemonClient(daemon_url(config), daemon_key(config))
        try:
            if body is None:
                return await client.get(path)
            return await client.post(path, body)
        finally:
            await client.close()

    try:
        return asyncio.run(ask())
    except DaemonError as exc:
        sys.stderr.write(f"lmbridge: {exc.message}\n")
    except DaemonUnreachable as exc:
        sys.stderr.write(f"lmbridge: {exc}\n")
    return None
