"""The shape docs/architecture.md draws, kept true: which package may import which, pure
translation code with no I/O, no import cycles."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Translation and policy code: fed values, returns values. None of it may reach an
# I/O module, so each is tested with tables and no sockets.
PURE = [
    "proxy.usage",
    "proxy.owners",
    "proxy.accounting",
    "proxy.quotas",
    "proxy.usage_report",
    "proxy.tool_deltas",
    "proxy.browsers",
    "proxy.breaker",
    "proxy.slots",
    "proxy.routing",
    "proxy.model_records",
    "proxy.relay_rules",
    "proxy.chat_stream",
    "proxy.chat_output",
    "proxy.chat_stream_editor",
    "proxy.tool_prompt",
    "proxy.profiles",
    "proxy.sse",
    "proxy.structured",
    "proxy.mcp.policy",
    "proxy.mcp.rounds",
    "proxy.mcp.names",
    "proxy.mcp.results",
    "proxy.model_output.lenient_json",
    "proxy.model_output.call_objects",
    "proxy.model_output.call_formats",
    "proxy.model_output.text_calls",
    "proxy.model_output.think_tags",
    "proxy.responses.request",
    "proxy.responses.input_items",
    "proxy.responses.render",
    "proxy.responses.prompt_shape",
    "proxy.responses.builder",
    "proxy.responses.output_items",
    "proxy.responses.mcp_items",
    "proxy.responses.objects",
    "proxy.responses.failures",
    "proxy.responses.replay",
    "proxy.responses.socket_session",
]
IO_MODULES = (
    "aiohttp",
    "aiosqlite",
    "sqlite3",
    "asyncio",
    "mcp",
    "httpx2",
    "socket",
    "subprocess",
    "storage",
    "proxy.upstream",
    "proxy.keys",
    "proxy.app",
)


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports(*, top_level_only: bool) -> dict[str, set[str]]:
    """Every module of proxy/ and storage/ with the modules it imports."""
    found: dict[str, set[str]] = defaultdict(set)
    for package in ("proxy", "storage"):
        for path in (ROOT / package).rglob("*.py"):
            tree = ast.parse(path.read_text())
            nodes = tree.body if top_level_only else list(ast.walk(tree))
            for node in nodes:
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found[module_name(path)].add(node.module)
                    found[module_name(path)].update(f"{node.module}.{a.name}" for a in node.names)
                elif isinstance(node, ast.Import):
                    found[module_name(path)].update(a.name for a in node.names)
    return found


def reaches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def test_storage_knows_nothing_of_the_service():
    """storage/ is the persistence layer: it imports nothing from proxy/."""
    offending = {
        m: sorted(i for i in imported if reaches(i, "proxy"))
        for m, imported in imports(top_level_only=False).items()
        if reaches(m, "storage")
    }
    assert not any(offending.values()), offending


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("proxy.mcp", ["proxy.responses", "proxy.bridge", "proxy.bench"]),
        ("proxy.model_output", ["proxy.mcp", "proxy.responses", "proxy.bridge", "proxy.bench"]),
        ("proxy.responses", ["proxy.bridge", "proxy.bench"]),
        ("proxy.bridge", ["proxy.bench", "storage"]),
    ],
)
def test_packages_import_in_one_direction(package, forbidden):
    """MCP serves both APIs and knows neither; the bridge talks to the daemon over HTTP."""
    for module, imported in imports(top_level_only=False).items():
        if reaches(module, package):
            bad = sorted(i for i in imported for f in forbidden if reaches(i, f))
            assert not bad, f"{module} imports {bad}"


def test_only_the_command_line_imports_the_bench():
    """The benchmark is not on the request path."""
    for module, imported in imports(top_level_only=False).items():
        if not reaches(module, "proxy.bench") and module != "proxy.cli":
            assert not [i for i in imported if reaches(i, "proxy.bench")], module


@pytest.mark.parametrize("module", PURE)
def test_translation_code_does_no_io(module):
    """Pure modules import no I/O module, directly or through another lmbridge module."""
    graph = imports(top_level_only=False)
    seen: set[str] = set()
    todo = [module]
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for imported in graph.get(current, ()):
            assert not any(reaches(imported, io) for io in IO_MODULES), (
                f"{module} reaches {imported} through {current}"
            )
            if imported in graph:
                todo.append(imported)


def test_no_import_cycles_between_modules():
    """Module-level imports form no cycle (a cycle is an import order waiting to break)."""
    graph = imports(top_level_only=True)
    modules = set(graph)
    edges = {m: {i for i in imported if i in modules and i != m} for m, imported in graph.items()}
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in done:
            return
        assert module not in visiting, " -> ".join([*path, module])
        visiting.add(module)
        for imported in sorted(edges.get(module, ())):
            visit(imported, [*path, module])
        visiting.discard(module)
        done.add(module)

    for module in sorted(modules):
        visit(module, [])


def test_the_app_keys_load_no_package():
    """proxy/keys.py names its classes for the type checker only."""
    loaded = imports(top_level_only=True)["proxy.keys"]
    assert not [i for i in loaded if reaches(i, "proxy") or reaches(i, "storage")]


@pytest.mark.parametrize("module", ["proxy.responses.routes", "proxy.passthrough", "proxy.app"])
def test_handlers_reach_storage_through_a_service(module):
    """Routes parse, call a service and render: they hold no storage call of their own
    (the app only opens the store it hands to the services)."""
    imported = imports(top_level_only=False)[module]
    allowed = {"storage.sqlite", "storage.sqlite.SQLiteStore"} if module == "proxy.app" else set()
    assert not [i for i in imported if reaches(i, "storage") and i not in allowed], module


def test_one_module_opens_event_streams():
    """Every streamed answer is opened, written and ended by proxy/event_stream.py, so
    that errors after the headers have one shape per API and another transport can take
    its place."""
    for path in (ROOT / "proxy").rglob("*.py"):
        if path.name == "event_stream.py" or "bench" in path.parts:
            continue
        text = path.read_text()
        assert "StreamResponse(" not in text and ".prepare(request)" not in text, path


# config.py is one tree and the only reader of the environment (STYLE), so it may be
# longer; every other module should be readable in one sitting.
LONG_ON_PURPOSE = {"proxy/config.py"}


def test_modules_stay_short():
    long = {
        str(path.relative_to(ROOT)): lines
        for package in ("proxy", "storage")
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 520
    }
    assert set(long) <= LONG_ON_PURPOSE, f"split these modules: {long}"
