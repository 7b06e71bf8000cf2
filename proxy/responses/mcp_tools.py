"""The ``mcp`` tool of the Responses API: which servers one response may use.

``{"type": "mcp", "server_label": "X"}`` means lmbridge's configured server X.
With ``server_url`` lmbridge connects to that server for this response only, and
only if the URL matches ``mcp.remote_servers`` (deny by default: a request must
never make the daemon reach an address its operator did not allow), part by part
(``proxy.mcp.remote_urls``); a redirect must match too. For each
server: its tools after ``allowed_tools`` (names, or ``read_only`` from the
tools' ``readOnlyHint``), which of them ``require_approval``, and whether its
tool list must be shown (``mcp_list_tools``, once per server per conversation).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from proxy.config import MCPConfig, MCPServerConfig
from proxy.errors import BadRequest
from proxy.mcp.names import SEPARATOR, ToolDirectory, ToolRef, clean, exposed_name
from proxy.mcp.remote_urls import RemoteURLError, allows, parse_url
from proxy.mcp.results import ToolOutput, error_output
from proxy.mcp.servers import READY_WAIT, MCPServers
from proxy.mcp.supervisor import Supervisor, ToolInfo
from proxy.redact import redact_url
from proxy.responses.mcp_items import McpTarget


class McpTargets(Mapping[str, McpTarget]):
    """The MCP tools of a response by exposed name; a name the model made up under a
    server's prefix (``calc__multiply`` when calc has no such tool) resolves to an
    unoffered target, so that it is answered as an unknown tool, never called."""

    def __init__(self) -> None:
        self.offered: dict[str, McpTarget] = {}
        self.prefixes: dict[str, str] = {}  # "<cleaned label>__" -> label

    def __getitem__(self, name: str) -> McpTarget:
        target = self.offered.get(name)
        if target is not None:
            return target
        for prefix, label in self.prefixes.items():
            if name.startswith(prefix) and len(name) > len(prefix):
                return McpTarget(label, name[len(prefix) :], offered=False)
        raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.offered)

    def __len__(self) -> int:
        return len(self.offered)


@dataclass
class McpSetup:
    targets: McpTargets = field(default_factory=McpTargets)  # exposed name -> target
    chat_tools: list[dict[str, Any]] = field(default_factory=list)
    to_list: list[tuple[str, list[dict[str, Any]], str | None]] = field(default_factory=list)
    listed: tuple[str, ...] = ()
    tool_choice: Any = None  # a tool_choice of type mcp, as a chat tool_choice
    remote: dict[str, Supervisor] = field(default_factory=dict)  # by label, for this response
    by_label: dict[str, str] = field(default_factory=dict)  # label -> configured server name

    async def close(self) -> None:
        await asyncio.gather(*(s.stop() for s in self.remote.values()))


async def setup_mcp(
    tools: list[dict[str, Any]],
    tool_choice: Any,
    servers: MCPServers,
    config: MCPConfig,
    listed_before: set[str],
    log_dir: Path,
) -> McpSetup | None:
    mcp_tools = [(i, t) for i, t in enumerate(tools) if t.get("type") == "mcp"]
    if not mcp_tools:
        return None
    setup = McpSetup()
    directory = ToolDirectory()
    listed = set(listed_before)
    try:
        for index, tool in mcp_tools:
            label = tool["server_label"]
            where = f"tools[{index}]"
            if label in setup.by_label or label in setup.remote:
                raise BadRequest(
                    f"The server_label {label!r} is used twice.", param=f"{where}.server_label"
                )
            if tool.get("server_url"):
                supervisor = _remote(tool, label, config, log_dir, where)
                setup.remote[label] = supervisor
                ready = await supervisor.ready(READY_WAIT)
                available = supervisor.tools if ready else []
                default_approval = True  # as OpenAI: a remote server's calls need approval
            else:
                if label not in servers.supervisors:
                    known = ", ".join(servers.supervisors) or "none configured"
                    raise BadRequest(
                        f"No MCP server {label!r} is configured in lmbridge (configured: "
                        f"{known}); give a server_url or use one of those.",
                        param=f"{where}.server_label",
                    )
                supervisor = servers.supervisors[label]
                setup.by_label[label] = label
                ready = await supervisor.ready(READY_WAIT)
                available = servers.tools_of(label) if ready else []
                default_approval = supervisor.config.require_approval
            setup.targets.prefixes[clean(label) + SEPARATOR] = label
            chosen = [t for t in available if _allowed(tool.get("allowed_tools"), t)]
            for info in chosen:
                name = directory.add(label, info.name)
                approval = _needs_approval(tool.get("require_approval"), info, default_approval)
                setup.targets.offered[name] = McpTarget(label, info.name, approval)
                setup.chat_tools.append(
                    {
                        "type": "function",
                        "function": {
                            "name": name,
                            "description": info.description or f"{info.name} (MCP server {label})",
                            "parameters": info.input_schema,
                        },
                    }
                )
            if label not in listed:
                error = None if ready else (supervisor.last_error or "the server is not connected")
                setup.to_list.append((label, [_tool_json(t) for t in chosen], error))
                if ready:
                    listed.add(label)
        setup.listed = tuple(sorted(listed))
        setup.tool_choice = _tool_choice(tool_choice, setup)
    except BaseException:
        await setup.close()
        raise
    return setup


def _remote(
    tool: Mapping[str, Any], label: str, config: MCPConfig, log_dir: Path, where: str
) -> Supervisor:
    url = str(tool["server_url"])
    try:
        target = parse_url(url)
    except RemoteURLError as exc:
        raise BadRequest(
            f"The server_url {redact_url(url)!r} {exc}.", param=f"{where}.server_url"
        ) from None
    patterns = config.remote_servers
    if not allows(patterns, target):
        raise BadRequest(
            f"The server_url {redact_url(url)!r} is not allowed: lmbridge only connects to MCP "
            "servers its operator allows (mcp.remote_servers), and this URL matches none of them.",
            param=f"{where}.server_url",
        )
    headers = dict(tool.get("headers") or {})
    if tool.get("authorization"):
        headers["Authorization"] = f"Bearer {tool['authorization']}"
    # The URL as matched, not as written: no other parser gets to read it differently.
    server = MCPServerConfig.model_validate({"url": target.url, "headers": headers})
    return Supervisor(
        label,
        server,
        log_dir,
        backoff_max=config.restart_backoff_max,
        allows_redirect=lambda location: allows(patterns, location),
    )


def _allowed(allowed: Any, tool: ToolInfo) -> bool:
    if allowed is None:
        return True
    if isinstance(allowed, list):
        return tool.name in allowed
    return _matches(allowed, tool)


def _matches(tool_filter: Mapping[str, Any], tool: ToolInfo) -> bool:
    names = tool_filter.get("tool_names")
    if names is not None and tool.name not in names:
        return False
    read_only = tool_filter.get("read_only")
    return read_only is None or tool.read_only is read_only


def _needs_approval(setting: Any, tool: ToolInfo, default: bool) -> bool:
    if setting == "always":
        return True
    if setting == "never":
        return False
    if isinstance(setting, dict):
        if "never" in setting and _matches(setting["never"], tool):
            return False
        if "always" in setting and _matches(setting["always"], tool):
            return True
    return default


def _tool_json(tool: ToolInfo) -> dict[str, Any]:
    return {
        "name": tool.name,
        "input_schema": tool.input_schema,
        "description": tool.description or None,
        "annotations": tool.annotations,
    }


def _tool_choice(choice: Any, setup: McpSetup) -> Any:
    if not isinstance(choice, dict) or choice.get("type") != "mcp":
        return None
    label = choice.get("server_label")
    names = [n for n, t in setup.targets.items() if t.label == label]
    if not names:
        raise BadRequest(
            f"'tool_choice' names the MCP server {label!r}, which has no tools in this request.",
            param="tool_choice.server_label",
        )
    if choice.get("name"):
        name = exposed_name(str(label), str(choice["name"]))
        if name not in setup.targets.offered:
            raise BadRequest(
                f"'tool_choice' names the tool {choice['name']!r}, which the server "
                f"{label!r} does not offer here.",
                param="tool_choice.name",
            )
        return {"type": "function", "function": {"name": name}}
    return "required"


async def run_mcp_call(
    setup: McpSetup, servers: MCPServers, target: McpTarget, arguments: dict[str, Any]
) -> ToolOutput:
    if not target.offered:
        offered = sorted(t.tool for t in setup.targets.values() if t.label == target.label)
        return error_output(
            f"there is no tool named {target.tool!r} on the MCP server {target.label!r}; "
            f"its tools are: {', '.join(offered) or 'none'}"
        )
    ref = ToolRef(target.label, target.tool)
    remote = setup.remote.get(target.label)
    return await servers.call(ref, arguments, images=False, supervisor=remote)
