"""Tool names the model sees: ``<server>__<tool>``, cleaned for OpenAI's rules.

OpenAI function names allow ``[A-Za-z0-9_-]`` and at most 64 characters; MCP tool
names may hold dots and run to 128. Names are cleaned, cut with a short hash when
too long (so that two long names stay distinct), and kept in a map back to the
server and tool: calls are always routed by this map, never by the bare tool name
(several servers may offer tools of the same name).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

SEPARATOR = "__"
MAX_LENGTH = 64
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def clean(text: str) -> str:
    return _UNSAFE.sub("_", text)


def exposed_name(server: str, tool: str) -> str:
    name = f"{clean(server)}{SEPARATOR}{clean(tool)}"
    if len(name) <= MAX_LENGTH:
        return name
    digest = hashlib.sha256(f"{server}\0{tool}".encode()).hexdigest()[:8]
    return f"{name[: MAX_LENGTH - 9]}_{digest}"


@dataclass(frozen=True, slots=True)
class ToolRef:
    server: str
    tool: str


@dataclass
class ToolDirectory:
    """Exposed name <-> (server, tool), for the tools offered in one request."""

    by_name: dict[str, ToolRef] = field(default_factory=dict)

    def add(self, server: str, tool: str) -> str:
        name = exposed_name(server, tool)
        suffix = 2
        while name in self.by_name and self.by_name[name] != ToolRef(server, tool):
            # Two names that clean to the same text: make the later one distinct.
            name = f"{exposed_name(server, tool)[: MAX_LENGTH - 3]}_{suffix}"
            suffix += 1
        self.by_name[name] = ToolRef(server, tool)
        return name

    def route(self, name: str) -> ToolRef | None:
        return self.by_name.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self.by_name

    def __iter__(self) -> Iterator[str]:
        return iter(self.by_name)

    def __len__(self) -> int:
        return len(self.by_name)
