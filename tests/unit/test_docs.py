"""The docs stay true: every setting documented, the CI command is the README's, every
metric and error code listed."""

from __future__ import annotations

import re
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
        ):
            continue
        assert f"`{cls.code}`" in doc, cls.__name__


def test_every_mcp_server_setting_is_documented():
    """docs/configuration.md lists every key of an [mcp.servers.NAME] table."""
    from proxy.config import MCPServerConfig

    doc = (ROOT / "docs" / "configuration.md").read_text()
    part = doc[doc.index("### [mcp.servers.NAME]") :]
    for key, info in MCPServerConfig.model_fields.items():
        assert f"| `{key}` |" in part
        assert info.description and info.description in part
