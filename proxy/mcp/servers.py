"""The configured MCP servers, as the rest of the daemon sees them.

``MCPServers`` holds one ``Supervisor`` per enabled server, starts the eager ones
with the daemon, offers a request the tools of the servers it asked for (as chat
tools named ``<server>__<tool>``), runs calls (turning every failure into a result
the model can read), and reports states for ``/readyz``, ``/metrics`` and
``lmbridge mcp-list``. Nothing here opens a connection before ``start()``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mcp import MCPError

from proxy.config import MCPConfig
from proxy.errors import BadRequest
from proxy.mcp.names import ToolDirectory, ToolRef
from proxy.mcp.results import ToolOutput, error_output, render_result
from proxy.mcp.supervisor import (
    CallTimedOut,
    ConnectionLost,
    MCPUnavailable,
    Supervisor,
    ToolInfo,
)
from proxy.metrics import Metrics

log = logging.getLogger("lmbridge.mcp")

# How long a request waits for a server that is still starting (npx may download).
READY_WAIT = 20.0

Selection = list[str]


@dataclass
class Offer:
    """The MCP tools one request may use."""

    directory: ToolDirectory = field(default_factory=ToolDirectory)
    tools: list[dict[str, Any]] = field(default_factory=list)  # chat tool definitions
    infos: dict[str, ToolInfo] = field(default_factory=dict)  # by exposed name
    missing: list[str] = field(default_factory=list)  # servers not connected

    def __bool__(self) -> bool:
        return bool(self.tools)


class MCPServers:
    def __init__(self, config: MCPConfig, metrics: Metrics, log_dir: Path) -> None:
        self.config = config
        self.metrics = metrics
        self.supervisors: dict[str, Supervisor] = {
            name: Supervisor(
                name,
                server,
                log_dir,
                backoff_max=config.restart_backoff_max,
                on_restart=self._restarted,
            )
            for name, server in config.servers.items()
            if not server.disabled
        }
        metrics.watch_mcp(self._states)

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        for supervisor in self.supervisors.values():
            if supervisor.config.start == "eager":
                supervisor.start()

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.supervisors.values()))

    def _restarted(self, name: str) -> None:
        self.metrics.mcp_restarts.labels(name).inc()

    def _states(self) -> dict[str, bool]:
        return {name: s.state == "ready" for name, s in self.supervisors.items()}

    # --- which servers a request gets --------------------------------------------

    def select(self, requested: Any, header: str | None) -> Selection:
        """The servers of one request: its ``mcp_servers`` field, else the
        ``X-MCP-Servers`` header, else ``mcp.default_servers``."""
        if requested is None and header is not None:
            requested = (
                []
                if header.strip().lower() in ("", "none")
                else (
                    "all"
                    if header.strip().lower() == "all"
                    else [n.strip() for n in header.split(",") if n.strip()]
                )
            )
            where = "X-MCP-Servers"
        else:
            where = "mcp_servers"
        if requested is None:
            requested = self.config.default_servers
            where = "mcp.default_servers"
        if requested == "all":
            return list(self.supervisors)
        if requested == "none":
            return []
        if not isinstance(requested, list) or not all(isinstance(n, str) for n in requested):
            raise BadRequest(
                "'mcp_servers' must be a list of MCP server names, \"all\" or [].",
                param="mcp_servers",
            )
        unknown = [n for n in requested if n not in self.supervisors]
        if unknown:
            known = ", ".join(self.supervisors) or "none configured"
            raise BadRequest(
                f"Unknown MCP server(s) in {where}: {', '.join(unknown)}. Configured: {known}.",
                param="mcp_servers",
            )
        return list(dict.fromkeys(requested))

    async def offer(
        self,
        names: Iterable[str],
        *,
        tool_filter: Callable[[str, ToolInfo], bool] | None = None,
        include_approval: bool = False,
    ) -> Offer:
        """The tools of the named servers that are (or become, within READY_WAIT)
        connected; a server that is not is left out and logged."""
        offer = Offer()
        chosen = [self.supervisors[n] for n in names]
        chosen = [s for s in chosen if include_approval or not s.config.require_approval]
        ready = await asyncio.gather(*(s.ready(READY_WAIT) for s in chosen))
        for supervisor, is_ready in zip(chosen, ready, strict=True):
            if not is_ready:
                offer.missing.append(supervisor.name)
                log.warning(
                    "MCP server %s is not connected (%s): its tools are not offered",
                    supervisor.name,
                    supervisor.last_error or supervisor.state,
                )
                continue
            for tool in self.tools_of(supervisor.name):
                if tool_filter is not None and not tool_filter(supervisor.name, tool):
                    continue
                name = offer.directory.add(supervisor.name, tool.name)
                offer.infos[name] = tool
                description = tool.description or f"{tool.name} (MCP server {supervisor.name})"
                offer.tools.append(
                    {
                        "type": "function",
                        "function": {
                            "name": name,
                            "description": description,
                            "parameters": tool.input_schema,
                        },
                    }
                )
        return offer

    def tools_of(self, name: str) -> list[ToolInfo]:
        """A server's tools after its allowed/denied lists."""
        supervisor = self.supervisors[name]
        config = supervisor.config
        tools = supervisor.tools
        if config.allowed_tools is not None:
            tools = [t for t in tools if t.name in config.allowed_tools]
        return [t for t in tools if t.name not in config.denied_tools]

    # --- calls ----------------------------------------------------------------

    async def call(
        self,
        ref: ToolRef,
        arguments: dict[str, Any],
        *,
        images: bool,
        supervisor: Supervisor | None = None,
    ) -> ToolOutput:
        """Run one call (on ``supervisor``, a server of one request, when given); every
        failure becomes a result that tells the model what happened."""
        started = time.perf_counter()
        outcome = "ok"
        server = supervisor or self.supervisors[ref.server]
        try:
            result = await server.call(ref.tool, arguments)
            output = render_result(result, images=images, max_chars=self.config.result_max_chars)
            if output.is_error:
                outcome = "tool_error"
        except CallTimedOut as exc:
            outcome, output = "timeout", error_output(str(exc))
        except (MCPUnavailable, ConnectionLost) as exc:
            outcome, output = "unavailable", error_output(str(exc))
        except MCPError as exc:
            outcome, output = "error", error_output(f"the MCP server answered: {exc}")
        except Exception as exc:  # a malformed result must not fail the request
            outcome, output = "error", error_output(f"{type(exc).__name__}: {exc}")
        elapsed = time.perf_counter() - started
        self.metrics.mcp_calls.labels(ref.server, ref.tool, outcome).inc()
        self.metrics.mcp_call_seconds.labels(ref.server).observe(elapsed)
        log.info(
            "mcp call",
            extra={
                "fields": {
                    "server": ref.server,
                    "tool": ref.tool,
                    "outcome": outcome,
                    "duration_ms": round(elapsed * 1000, 1),
                }
            },
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "mcp call arguments",
                extra={"fields": {"server": ref.server, "tool": ref.tool, "arguments": arguments}},
            )
        return output

    # --- reporting --------------------------------------------------------------

    def describe(self) -> list[dict[str, Any]]:
        """Every configured server with its state and the tools the model may be offered
        (after allowed/denied lists); disabled ones too, so that none looks forgotten."""
        described = [
            {
                "name": name,
                "state": s.state,
                "error": s.last_error,
                "require_approval": s.config.require_approval,
                "tools": [
                    {"name": t.name, "description": t.description, "read_only": t.read_only}
                    for t in self.tools_of(name)
                ],
            }
            for name, s in self.supervisors.items()
        ]
        described += [
            {
                "name": name,
                "state": "disabled",
                "error": None,
                "require_approval": server.require_approval,
                "tools": [],
            }
            for name, server in self.config.servers.items()
            if server.disabled
        ]
        return described

    def status(self) -> dict[str, Any]:
        return {
            name: {
                "state": s.state,
                "tools": len(s.tools),
                "restarts": max(0, s.connects - 1),
                **({"error": s.last_error} if s.last_error else {}),
            }
            for name, s in self.supervisors.items()
        }
