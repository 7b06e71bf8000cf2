"""The docs stay true: every setting documented, the CI command is the README's, every
metric and error code listed."""

from __future__ import annotations

import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from proxy import errors
from proxy.config import SECTIONS
from proxy.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def section_of(doc: str, section: str) -> str:
    start = doc.index(f"### [{section}]")
    end = doc.find("\n### [", start + 1)
    return doc[start:] if end < 0 else doc[start:end]


@pytest.mark.parametrize(
    ("section", "key"),
    [(s, k) for s, model in SECTIONS.items() for k in model.model_fields],
)
def test_every_setting_is_in_the_configuration_reference(section, key):
    """docs/configuration.md lists every key of every section with its env variable."""
    doc = (ROOT / "docs" / "configuration.md").read_text()
    part = section_of(doc, section)
    assert f"| `{key}` |" in part
    assert f"`LMBRIDGE_{section.upper()}_{key.upper()}`" in part
    description = SECTIONS[section].model_fields[key].description
    assert description and description in part


def test_ci_runs_the_readme_commands_as_written():
    """The README opens with its install-and-serve and test commands, and .ci/run runs
    both exactly as written, then the checks the README names."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)\n```", readme, re.S)
    assert readme.index("```sh") < readme.index("\n## ")
    assert blocks[0] == "pip install . && lmbridge serve"
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert blocks[0] in ci
    assert blocks[1] in ci
    checks = next(line for line in readme.splitlines() if line.startswith("ruff check"))
    assert checks.split("#")[0].strip() in ci


def test_every_metric_is_documented():
    """docs/operations.md names every metric the app exports."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    for metric in Metrics().registry.collect():
        name = metric.name + ("_total" if metric.type == "counter" else "")
        assert f"`{name}`" in doc, name


def test_every_error_code_is_documented():
    """docs/compatibility.md lists the code of every error class."""
    doc = (ROOT / "docs" / "compatibility.md").read_text()
    classes = [
        c
        for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.LMBridgeError)
    ]
    for cls in classes:
        if cls in (
            errors.LMBridgeError,
            errors.UpstreamError,
            errors.UpstreamStatus,
            errors.NotFound,
            errors.Forbidden,
        ):
            continue
        assert f"`{cls.code}`" in doc, cls.__name__


def test_every_per_model_setting_is_documented():
    """docs/configuration.md lists every key of a [models."PATTERN"] table."""
    from proxy.config import ModelSettings

    doc = (ROOT / "docs" / "configuration.md").read_text()
    part = section_of(doc, 'models."PATTERN"')
    for key, info in ModelSettings.model_fields.items():
        assert f"| `{key}` |" in part
        assert info.description and info.description in part


def test_every_mcp_server_setting_is_documented():
    """docs/configuration.md lists every key of an [mcp.servers.NAME] table."""
    from proxy.config import MCPServerConfig

    doc = (ROOT / "docs" / "configuration.md").read_text()
    part = doc[doc.index("### [mcp.servers.NAME]") :]
    for key, info in MCPServerConfig.model_fields.items():
        assert f"| `{key}` |" in part
        assert info.description and info.description in part


# --- snippets: every TOML, mcp.json and `lmbridge` command line in the docs works ----


def snippets(language: str) -> list[tuple[str, str]]:
    """(where, text) of every fenced block in that language in README.md and docs/."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        for match in re.finditer(rf"```{language}\n(.*?)```", text, re.S):
            line = text.count("\n", 0, match.start()) + 1
            found.append((f"{doc.relative_to(ROOT)}:{line}", match.group(1)))
    return found


def mcp_json_snippet() -> str:
    """docs/mcp.md's example mcp.json: where its TOML example says it lives."""
    return next(text for where, text in snippets("json") if where.startswith("docs/mcp.md"))


@pytest.fixture
def snippet_home(tmp_path, monkeypatch):
    """A home directory holding the files the snippets name (~/.lmstudio/mcp.json)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".lmstudio").mkdir()
    (tmp_path / ".lmstudio" / "mcp.json").write_text(mcp_json_snippet())
    return tmp_path


# Codex CLI's config.toml in docs/clients.md, not lmbridge's: each starts with this line.
CODEX_CONFIG = "# ~/.codex/config.toml"
LMBRIDGE_TOML = [(w, t) for w, t in snippets("toml") if not t.lstrip().startswith(CODEX_CONFIG)]
CODEX_TOML = [(w, t) for w, t in snippets("toml") if t.lstrip().startswith(CODEX_CONFIG)]


@pytest.mark.parametrize(("where", "text"), LMBRIDGE_TOML, ids=lambda v: v[:30])
def test_every_toml_snippet_is_a_valid_configuration(where, text, snippet_home):
    """check-config accepts each TOML example of the docs, given the environment
    variables its env:VAR secrets name."""
    from proxy.config import load_config

    path = snippet_home / "snippet.toml"
    path.write_text(text)
    environ = {name: "a-secret" for name in re.findall(r"env:([A-Za-z_][A-Za-z0-9_]*)", text)}
    load_config(path, environ=environ)


@pytest.mark.parametrize(("where", "text"), CODEX_TOML, ids=lambda v: v[:30])
def test_every_codex_snippet_is_toml(where, text):
    """Each Codex config.toml example parses (tests/e2e/test_codex.py runs Codex with the
    provider tables and the offline tables, in Codex's strict mode)."""
    tomllib.loads(text)


def test_the_docs_give_codex_both_transports():
    """docs/clients.md has a Codex provider table for HTTP and one for the WebSocket."""
    providers = [t for w, t in CODEX_TOML if "[model_providers.lmbridge]" in t]
    assert sorted("supports_websockets = true" in t for t in providers) == [False, True]


MCP_JSON_SNIPPETS = [(w, t) for w, t in snippets("json") if '"mcpServers"' in t]


@pytest.mark.parametrize(("where", "text"), MCP_JSON_SNIPPETS, ids=lambda v: v[:30])
def test_every_mcp_json_snippet_loads(where, text, snippet_home):
    """Each mcp.json example of the docs is read as MCP servers lmbridge can use."""
    from proxy.config import load_config

    path = snippet_home / "mcp.json"
    path.write_text(text)
    data = json.loads(text)
    environ = {name: "a-secret" for name in re.findall(r"env:([A-Za-z_][A-Za-z0-9_]*)", text)}
    config = load_config(os.devnull, flags={"mcp.config_files": [str(path)]}, environ=environ)
    assert set(config.mcp.servers) == set(data["mcpServers"])


def lmbridge_command_lines() -> list[tuple[str, list[str]]]:
    """Every ``lmbridge COMMAND ...`` in a shell snippet, as the arguments after
    ``lmbridge``, with the environment assignments before it."""
    from proxy.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    found = []
    for where, text in snippets("sh"):
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words[:-1]):
                if Path(word).name == "lmbridge" and words[i + 1] in commands:
                    found.append((where, words[: i + 1] + words[i + 1 :]))
    return found


@pytest.mark.parametrize(("where", "words"), lmbridge_command_lines(), ids=lambda v: str(v)[:40])
def test_every_lmbridge_command_in_the_docs_parses(where, words):
    """Each `lmbridge ...` line of the docs names a real command with real flags, and the
    LMBRIDGE_* variables set before it are real settings."""
    from proxy.cli import build_parser
    from proxy.config import ENV_PREFIX, load_config

    start = max(i for i, w in enumerate(words) if Path(w).name == "lmbridge")
    environ = dict(w.split("=", 1) for w in words[:start] if re.match(r"[A-Z_]+=", w))
    args = words[start + 1 :]
    try:
        build_parser().parse_args(args)
    except SystemExit as exc:
        pytest.fail(f"{where}: `lmbridge {' '.join(args)}` does not parse ({exc})")
    settings = {k: v for k, v in environ.items() if k.startswith(ENV_PREFIX)}
    settings.pop("LMBRIDGE_CONFIG", None)
    load_config(os.devnull, environ=settings)


def test_the_docs_show_lmbridge_commands():
    """The snippet scan finds the commands it is meant to check."""
    lines = [" ".join(words) for _, words in lmbridge_command_lines()]
    assert any("check-config" in line for line in lines)
    assert any("mcp --standalone" in line for line in lines)
