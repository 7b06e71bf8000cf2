"""Configuration loading: sources and precedence, value types, secrets, errors, rendering.

Every load passes an explicit path (a tmp_path file or os.devnull) and an
explicit ``environ`` so the developer's own environment and config file are
never read. ``env:VAR`` secrets are resolved from the process environment, so
those tests set variables with monkeypatch.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import (
    MASK,
    Config,
    ConfigError,
    load_config,
    render_toml,
)

WriteToml = Callable[[str], Path]


@pytest.fixture
def write_toml(tmp_path: Path) -> WriteToml:
    """Write a TOML file into tmp_path and return its path."""

    def write(text: str) -> Path:
        path = tmp_path / "config.toml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def load(
    path: Path | str = os.devnull,
    *,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> Config:
    # Secrets named env:LMB_TEST_* come from the real environment (monkeypatch.setenv);
    # nothing else of it is seen.
    secrets = {k: v for k, v in os.environ.items() if k.startswith("LMB_TEST_")}
    return load_config(path, environ={**secrets, **(environ or {})}, flags=flags)


def config_error(
    path: Path | str = os.devnull,
    *,
    environ: dict[str, str] | None = None,
    flags: dict[str, Any] | None = None,
) -> str:
    with pytest.raises(ConfigError) as info:
        load(path, environ=environ, flags=flags)
    message = str(info.value)
    assert "\n" not in message, "a configuration error is one line"
    return message


def dig(config: Config, dotted: str) -> Any:
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# --- defaults and precedence -------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "expected"),
    [
        ("server.host", "127.0.0.1"),
        ("server.port", 1235),
        ("server.max_body_size", 100_000_000),
        ("server.shutdown_grace", 30.0),
        ("upstream.url", "http://127.0.0.1:1234"),
        ("upstream.api_key", None),
        ("upstream.retry_attempts", 3),
        ("upstream.retry_backoff", 0.2),
        ("models.cache_ttl", 60.0),
        ("models.default", None),
        ("models.aliases", {}),
        ("auth.api_keys", []),
        ("logging.level", "info"),
        ("logging.format", "text"),
        ("logging.library_level", "warning"),
        ("embedded.enabled", False),
        ("embedded.model", None),
        ("embedded.alias", "smollm2"),
    ],
)
def test_defaults(dotted, expected):
    """An empty file and an empty environment give the documented defaults."""
    assert dig(load(), dotted) == expected


def test_storage_path_default_is_a_database_file():
    """The default storage path is an lmbridge.db file in the data directory."""
    path = load().storage.path
    assert path.name == "lmbridge.db"
    assert path.parent.name == "lmbridge"


@pytest.mark.parametrize(
    ("toml", "environ", "flags", "expected"),
    [
        (None, {}, {}, 1235),
        ("[server]\nport = 2000\n", {}, {}, 2000),
        (None, {"LMBRIDGE_SERVER_PORT": "3000"}, {}, 3000),
        ("[server]\nport = 2000\n", {"LMBRIDGE_SERVER_PORT": "3000"}, {}, 3000),
        ("[server]\nport = 2000\n", {}, {"server.port": 4000}, 4000),
        ("[server]\nport = 2000\n", {"LMBRIDGE_SERVER_PORT": "3000"}, {"server.port": 4000}, 4000),
        ("[server]\nport = 2000\n", {"LMBRIDGE_SERVER_PORT": "3000"}, {"server.port": None}, 3000),
        ("[server]\nport = 2000\n", {}, {"server.port": None}, 2000),
    ],
    ids=[
        "default",
        "file",
        "env",
        "env-over-file",
        "flag-over-file",
        "flag-over-env",
        "none-flag-ignored-env-wins",
        "none-flag-ignored-file-wins",
    ],
)
def test_precedence(write_toml, toml, environ, flags, expected):
    """defaults < TOML file < LMBRIDGE_* environment < flags; a None flag is ignored."""
    path = write_toml(toml) if toml is not None else os.devnull
    assert load(path, environ=environ, flags=flags).server.port == expected


def test_precedence_is_per_key(write_toml):
    """A higher source overrides only the keys it sets; the rest of a section stays."""
    path = write_toml('[server]\nhost = "0.0.0.0"\nport = 2000\n[logging]\nlevel = "debug"\n')
    config = load(
        path,
        environ={"LMBRIDGE_SERVER_PORT": "3000"},
        flags={"logging.format": "json"},
    )
    assert (config.server.host, config.server.port) == ("0.0.0.0", 3000)
    assert (config.logging.level, config.logging.format) == ("debug", "json")


def test_config_file_from_lmbridge_config_variable(write_toml):
    """Without a path, $LMBRIDGE_CONFIG (from environ=) names the file to read."""
    path = write_toml("[server]\nport = 2222\n")
    config = load_config(None, environ={"LMBRIDGE_CONFIG": str(path)})
    assert config.server.port == 2222


def test_explicit_path_wins_over_lmbridge_config(write_toml, tmp_path):
    """An explicit path is read even when $LMBRIDGE_CONFIG names another file."""
    path = write_toml("[server]\nport = 2222\n")
    config = load_config(path, environ={"LMBRIDGE_CONFIG": str(tmp_path / "missing.toml")})
    assert config.server.port == 2222


def test_config_is_frozen():
    """The loaded configuration cannot be changed afterwards."""
    config = load()
    with pytest.raises(ValueError, match="frozen"):
        config.server.port = 1  # type: ignore[misc]


# --- durations and sizes -----------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("30d", 2_592_000.0),
        ("1.5h", 5400.0),
        (" 10 s ", 10.0),
        ("45", 45.0),
        ("0", 0.0),
        (12, 12.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_durations(value, seconds):
    """Durations are seconds as numbers, or strings with ms/s/m/h/d units."""
    assert load(flags={"server.shutdown_grace": value}).server.shutdown_grace == seconds


@pytest.mark.parametrize(
    ("toml_value", "seconds"),
    [('"500ms"', 0.5), ('"5m"', 300.0), ("90", 90.0), ("1.5", 1.5)],
)
def test_durations_from_file(write_toml, toml_value, seconds):
    """Durations written in the TOML file are parsed the same way."""
    path = write_toml(f"[upstream]\nidle_timeout = {toml_value}\n")
    assert load(path).upstream.idle_timeout == seconds


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("5x", "not a duration: '5x'"),
        ("-5s", "not a duration: '-5s'"),
        ("ms", "not a duration: 'ms'"),
        ("1e3", "not a duration: '1e3'"),
        ("", "not a duration: ''"),
        ("5 mins", "not a duration: '5 mins'"),
        ("inf", "not a duration: 'inf'"),
        (-1, "greater than or equal to 0"),
        (float("inf"), "finite number"),
    ],
)
def test_bad_durations(value, problem):
    """A bad duration names the key, the problem and where the value came from."""
    message = config_error(flags={"server.shutdown_grace": value})
    assert message.startswith("server.shutdown_grace: ")
    assert problem in message
    assert message.endswith("[from command line]")


@pytest.mark.parametrize(
    ("value", "size"),
    [
        ("100MB", 100_000_000),
        ("512KiB", 524_288),
        ("1GiB", 2**30),
        ("1gb", 10**9),
        ("2k", 2000),
        ("1 MiB", 1_048_576),
        ("1TiB", 2**40),
        ("1.5KB", 1500),
        ("10b", 10),
        ("64", 64),
        (1024, 1024),
    ],
)
def test_sizes(value, size):
    """Sizes are bytes as integers, or strings with decimal (KB) or binary (KiB) units."""
    assert load(flags={"server.max_body_size": value}).server.max_body_size == size


def test_size_from_environment():
    """A size given in an LMBRIDGE_* variable is parsed like one from the file."""
    config = load(environ={"LMBRIDGE_SERVER_MAX_BODY_SIZE": "2MiB"})
    assert config.server.max_body_size == 2 * 1024 * 1024


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("10XB", "not a size: '10XB'"),
        ("MB", "not a size: 'MB'"),
        ("-1MB", "not a size: '-1MB'"),
        ("0", "greater than 0"),
        (0, "greater than 0"),
        (1.5, "valid integer"),
    ],
)
def test_bad_sizes(value, problem):
    """A bad size names the key and the problem."""
    message = config_error(flags={"server.max_body_size": value})
    assert message.startswith("server.max_body_size: ")
    assert problem in message


# --- secrets ------------------------------------------------------------------


def test_env_secret_is_read_from_the_environment(write_toml, monkeypatch):
    """upstream.api_key = "env:VAR" takes the value of VAR."""
    monkeypatch.setenv("LMB_TEST_UPSTREAM_KEY", "sk-upstream-123")
    path = write_toml('[upstream]\napi_key = "env:LMB_TEST_UPSTREAM_KEY"\n')
    key = load(path).upstream.api_key
    assert key is not None
    assert key.get_secret_value() == "sk-upstream-123"


def test_env_secrets_in_a_list(write_toml, monkeypatch):
    """Each auth.api_keys entry may be a literal key or env:VAR."""
    monkeypatch.setenv("LMB_TEST_CLIENT_KEY", "sk-client-456")
    path = write_toml('[auth]\napi_keys = ["env:LMB_TEST_CLIENT_KEY", "sk-literal"]\n')
    keys = [k.get_secret_value() for k in load(path).auth.api_keys]
    assert keys == ["sk-client-456", "sk-literal"]


def test_env_secret_named_in_an_environment_variable(monkeypatch):
    """LMBRIDGE_UPSTREAM_API_KEY=env:VAR is resolved as well."""
    monkeypatch.setenv("LMB_TEST_UPSTREAM_KEY", "sk-upstream-123")
    config = load(environ={"LMBRIDGE_UPSTREAM_API_KEY": "env:LMB_TEST_UPSTREAM_KEY"})
    assert config.upstream.api_key is not None
    assert config.upstream.api_key.get_secret_value() == "sk-upstream-123"


def test_secret_is_hidden_in_repr(monkeypatch):
    """A loaded secret does not appear in the configuration's repr."""
    monkeypatch.setenv("LMB_TEST_UPSTREAM_KEY", "sk-upstream-123")
    config = load(
        flags={
            "upstream.api_key": "env:LMB_TEST_UPSTREAM_KEY",
            "auth.api_keys": ["sk-client-789"],
        }
    )
    assert "sk-upstream-123" not in repr(config)
    assert "sk-client-789" not in repr(config)


@pytest.mark.parametrize("value", [None, ""])
@pytest.mark.parametrize(
    ("dotted", "flag_value", "where"),
    [
        ("upstream.api_key", "env:LMB_TEST_MISSING", "upstream.api_key"),
        ("auth.api_keys", ["sk-ok", "env:LMB_TEST_MISSING"], "auth.api_keys.1"),
    ],
)
def test_missing_env_secret_is_an_error(monkeypatch, value, dotted, flag_value, where):
    """An unset or empty env:VAR stops loading with a line naming the key and the variable."""
    if value is None:
        monkeypatch.delenv("LMB_TEST_MISSING", raising=False)
    else:
        monkeypatch.setenv("LMB_TEST_MISSING", value)
    message = config_error(flags={dotted: flag_value})
    assert message.startswith(f"{where}: ")
    assert "environment variable LMB_TEST_MISSING is not set or empty" in message
    assert "sk-ok" not in message


@pytest.mark.parametrize(
    ("toml", "secret"),
    [
        ("[upstream]\napi_key = 98765432\n", "98765432"),
        ('[upstream]\napi_key = ["sk-in-a-list"]\n', "sk-in-a-list"),
        ('[auth]\napi_keys = "sk-not-a-list"\n', "sk-not-a-list"),
        ('[auth]\napi_keys = ["sk-fine", 13572468]\n', "13572468"),
    ],
)
def test_errors_never_echo_a_secret(write_toml, toml, secret):
    """A wrongly typed secret is reported by key, without its value."""
    message = config_error(write_toml(toml))
    assert "api_key" in message
    assert secret not in message
    assert "sk-fine" not in message


def test_other_errors_do_not_echo_secrets(write_toml, monkeypatch):
    """An error elsewhere in the file does not carry a valid secret into the message."""
    monkeypatch.setenv("LMB_TEST_UPSTREAM_KEY", "sk-upstream-123")
    path = write_toml(
        '[upstream]\napi_key = "env:LMB_TEST_UPSTREAM_KEY"\nretry_attempts = 0\n'
        '[auth]\napi_keys = ["sk-client-789"]\n'
    )
    message = config_error(path)
    assert message.startswith("upstream.retry_attempts: ")
    assert "sk-upstream-123" not in message
    assert "sk-client-789" not in message


# --- unknown names -------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            "[server]\nbogus = 1\n",
            "server.bogus: unknown key (known keys of [server]: host, port, max_body_size, "
            "shutdown_grace, header_timeout, body_timeout, idle_timeout, max_connections, "
            "allowed_hosts, cors_origins, relay_unknown_routes)",
        ),
        (
            "[models]\naliases = {}\ncache = 5\n",
            "models.cache: unknown key (known keys of [models]: cache_ttl, default, aliases, "
            "text_tool_calls, text_call_hold, describe_tools, think_tags, think_opened, "
            "template_tools, "
            "reasoning_in_history, max_concurrent, queue_size, queue_timeout, ttl, "
            "context_length, preload, load_keepalive, schema_retry, fallbacks); "
            'a table [models."PATTERN"] holds the settings of some models',
        ),
        (
            "[bogus]\nkey = 1\n",
            "bogus: unknown section (known sections: server, upstream, models, storage, auth, "
            "logging, embedded, responses, mcp, bridge, usage)",
        ),
        ("port = 1\n", "port: unknown section"),
        ("[server.extra]\nkey = 1\n", "server.extra: unknown key"),
    ],
    ids=["key", "key-in-models", "section", "top-level-scalar", "subtable"],
)
def test_unknown_names_in_file(write_toml, toml, expected):
    """An unknown key or section in the file is one line naming it, the known names and file."""
    path = write_toml(toml)
    message = config_error(path)
    assert message.startswith(expected)
    assert message.endswith(f"[from {path}]")


@pytest.mark.parametrize(
    "var",
    ["LMBRIDGE_SERVER_PROT", "LMBRIDGE_NOPE", "LMBRIDGE_SERVER", "LMBRIDGE_", "LMBRIDGE_PORT"],
)
def test_unknown_environment_variable(var):
    """An LMBRIDGE_* variable that is no configuration key is an error naming it."""
    message = config_error(environ={var: "1"})
    assert message.startswith(f"{var}: not a configuration key")
    assert "LMBRIDGE_<SECTION>_<KEY>" in message


@pytest.mark.parametrize(
    "environ",
    [
        {"PATH": "/usr/bin", "HOME": "/nowhere", "LMBRIDGE": "x"},
        {"lmbridge_server_port": "1"},
        {"LMBRIDGE_CONFIG": "/nonexistent/ignored-because-a-path-is-given.toml"},
    ],
    ids=["unrelated", "lower-case-prefix", "reserved"],
)
def test_unrelated_environment_is_ignored(environ):
    """Variables without the LMBRIDGE_ prefix, and LMBRIDGE_CONFIG, are not keys."""
    assert load(environ=environ) == load()


def test_unknown_flag_key():
    """An unknown dotted flag is an error naming it and the command line."""
    message = config_error(flags={"server.bogus": 1})
    assert message.startswith("server.bogus: unknown key")
    assert message.endswith("[from command line]")


# --- files ------------------------------------------------------------------


def test_bad_toml(write_toml):
    """Invalid TOML is one line naming the file and the parser's complaint."""
    path = write_toml("[server\nport = 1\n")
    message = config_error(path)
    assert message.startswith(f"{path}: invalid TOML: ")
    assert "line 1" in message


def test_duplicate_key_is_bad_toml(write_toml):
    """A key written twice is rejected by the TOML parser."""
    path = write_toml("[server]\nport = 1\nport = 2\n")
    assert config_error(path).startswith(f"{path}: invalid TOML: ")


def test_missing_file(tmp_path):
    """A config file that does not exist is one line naming it."""
    path = tmp_path / "nope.toml"
    assert config_error(path) == f"{path}: no such file"


def test_directory_instead_of_file(tmp_path):
    """A directory given as the config file is reported as such."""
    assert config_error(tmp_path) == f"{tmp_path}: is a directory, not a TOML file"


def test_file_not_utf8(tmp_path):
    """A file that is not UTF-8 is reported as such."""
    path = tmp_path / "latin1.toml"
    path.write_bytes('[models]\ndefault = "caf\xe9"\n'.encode("latin-1"))
    assert config_error(path) == f"{path}: not UTF-8 text"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_file(write_toml):
    """A file without read permission is reported as such."""
    path = write_toml("[server]\nport = 1\n")
    path.chmod(0)
    assert config_error(path) == f"{path}: permission denied"


# --- wrong types -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("toml", "environ", "flags", "start", "contains", "source"),
    [
        (
            '[server]\nport = "abc"\n',
            {},
            {},
            "server.port: ",
            "valid integer, unable to parse string as an integer (got 'abc')",
            "FILE",
        ),
        (
            None,
            {"LMBRIDGE_SERVER_PORT": "abc"},
            {},
            "server.port: ",
            "(got 'abc')",
            "LMBRIDGE_SERVER_PORT",
        ),
        (
            None,
            {},
            {"server.port": 70000},
            "server.port: ",
            "less than or equal to 65535 (got 70000)",
            "command line",
        ),
        (
            '[logging]\nlevel = "loud"\n',
            {},
            {},
            "logging.level: ",
            "'debug', 'info', 'warning' or 'error' (got 'loud')",
            "FILE",
        ),
        (
            None,
            {"LMBRIDGE_LOGGING_FORMAT": "xml"},
            {},
            "logging.format: ",
            "(got 'xml')",
            "LMBRIDGE_LOGGING_FORMAT",
        ),
        (
            '[embedded]\nenabled = "maybe"\n',
            {},
            {},
            "embedded.enabled: ",
            "valid boolean",
            "FILE",
        ),
        (
            "[models]\naliases = { small = 1 }\n",
            {},
            {},
            "models.aliases.small: ",
            "valid string (got 1)",
            "FILE",
        ),
        (
            '[models]\naliases = "gpt=qwen"\n',
            {},
            {},
            "models.aliases: ",
            "valid dictionary",
            "FILE",
        ),
        (
            "[upstream]\nretry_attempts = 0\n",
            {},
            {},
            "upstream.retry_attempts: ",
            "greater than or equal to 1 (got 0)",
            "FILE",
        ),
        ("server = 5\n", {}, {}, "server: ", "valid dictionary", "FILE"),
        (
            None,
            {"LMBRIDGE_AUTH_API_KEYS": "[1,"},
            {},
            "auth.api_keys: ",
            "valid list",
            "LMBRIDGE_AUTH_API_KEYS",
        ),
        (
            None,
            {"LMBRIDGE_MODELS_ALIASES": '["not", "a table"]'},
            {},
            "models.aliases: ",
            "valid dictionary",
            "LMBRIDGE_MODELS_ALIASES",
        ),
    ],
)
def test_wrong_types(write_toml, toml, environ, flags, start, contains, source):
    """A wrongly typed value is one line naming the key, the problem and its source."""
    path = write_toml(toml) if toml is not None else os.devnull
    message = config_error(path, environ=environ, flags=flags)
    assert message.startswith(start)
    assert contains in message
    expected_source = str(path) if source == "FILE" else source
    assert message.endswith(f"[from {expected_source}]")


def test_every_problem_is_reported_at_once(write_toml):
    """Every problem of the file, the environment and the flags is reported, one line
    each, so that one run of check-config finds them all."""
    path = write_toml(
        '[server]\nport = "high"\nhots = "x"\n[upstream]\nurl = "ftp://x"\n'
        '[mcp]\nconfig_files = ["missing.json"]\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={"LMBRIDGE_NOPE": "1"}, flags={"logging.level": "loud"})
    problems = info.value.problems
    assert [p.split(":")[0] for p in problems] == [
        "LMBRIDGE_NOPE",
        "mcp.config_files",
        "server.port",
        "server.hots",
        "upstream.url",
        "logging.level",
    ]
    assert all("\n" not in p for p in problems)
    assert str(info.value) == "\n".join(problems)


@pytest.mark.parametrize(("given", "level"), [("DEBUG", "debug"), ("Warning", "warning")])
def test_log_level_is_case_insensitive(given, level):
    """The log levels may be written in any case."""
    assert load(environ={"LMBRIDGE_LOGGING_LEVEL": given}).logging.level == level
    assert load(environ={"LMBRIDGE_LOGGING_LIBRARY_LEVEL": given}).logging.library_level == level


# --- upstream.url -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://127.0.0.1:1234", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/v1", "http://127.0.0.1:1234"),
        ("http://127.0.0.1:1234/v1/", "http://127.0.0.1:1234"),
        ("https://gpu.local:8443///", "https://gpu.local:8443"),
        ("https://gpu.local/api/v1", "https://gpu.local/api"),
        ("http://host/v10", "http://host/v10"),
        ("http://host/xv1", "http://host/xv1"),
        ("http://host/llm", "http://host/llm"),
    ],
)
def test_upstream_url_is_normalised(given, expected):
    """Trailing slashes and a trailing /v1 are dropped from upstream.url."""
    assert load(flags={"upstream.url": given}).upstream.url == expected


def test_upstream_url_host_named_v1():
    """A host that happens to be called v1 is kept."""
    assert load(flags={"upstream.url": "http://v1:8080"}).upstream.url == "http://v1:8080"
    assert load(flags={"upstream.url": "http://v1"}).upstream.url == "http://v1"


@pytest.mark.parametrize(
    "given",
    ["ftp://host", "127.0.0.1:1234", "localhost", "", "http://", "http:///v1", "ws://h/v1"],
)
def test_non_http_upstream_url_is_rejected(given):
    """upstream.url must be an http:// or https:// URL with a host."""
    message = config_error(environ={"LMBRIDGE_UPSTREAM_URL": given})
    assert message.startswith("upstream.url: must be an http:// or https:// URL")
    assert message.endswith("[from LMBRIDGE_UPSTREAM_URL]")


@pytest.mark.parametrize(
    ("given", "shown"),
    [
        ("ftp://bob:hunter2@host/v1", "ftp://***@host/v1"),
        ("ws://host/v1?api_key=sk-query-1", "ws://host/v1?api_key=***"),
        ("ws://a@b:hunter2@host/v1#sk-frag", "ws://***@host/v1#***"),
    ],
)
def test_a_refused_url_is_shown_without_its_secrets(given, shown):
    """A URL's user:password, query values and fragment are masked in the error line."""
    message = config_error(environ={"LMBRIDGE_UPSTREAM_URL": given})
    assert f"got {shown!r}" in message
    assert "hunter2" not in message and "sk-" not in message


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("http://127.0.0.1:*/mcp?x=1", "has a ? or #"),
        ("http://api-*.example.com/mcp", "has a * inside a host label"),
        ("http://127.0.0.1:70000/mcp", "has a port that is not a number from 1 to 65535"),
        ("127.0.0.1:*/mcp", "is not an http:// or https:// URL"),
        ("http*://127.0.0.1:*/mcp", "is not an http:// or https:// URL"),
    ],
)
def test_a_remote_servers_pattern_that_cannot_match_stops_start_up(write_toml, pattern, problem):
    """Each bad mcp.remote_servers entry is one line naming its index and the problem."""
    toml = f'[mcp]\nremote_servers = ["http://127.0.0.1:*/mcp", {pattern!r}]\n'
    message = config_error(write_toml(toml.replace("'", '"')))
    assert message.startswith(f"mcp.remote_servers.1: this pattern {problem}")
    assert "[from " in message


def test_a_remote_servers_pattern_with_a_password_is_masked(write_toml):
    """The refused pattern is quoted without the password it carried."""
    message = config_error(write_toml('[mcp]\nremote_servers = ["http://u:hunter2@x/mcp"]\n'))
    assert message.startswith("mcp.remote_servers.0: this pattern has a user name or password")
    assert "hunter2" not in message and "http://***@x/mcp" in message


# --- environment value parsing -------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "raw", "dotted", "expected"),
    [
        ("LMBRIDGE_SERVER_PORT", "8080", "server.port", 8080),
        ("LMBRIDGE_SERVER_HOST", "0.0.0.0", "server.host", "0.0.0.0"),
        ("LMBRIDGE_UPSTREAM_CONNECT_TIMEOUT", "250ms", "upstream.connect_timeout", 0.25),
        ("LMBRIDGE_EMBEDDED_ENABLED", "true", "embedded.enabled", True),
        ("LMBRIDGE_EMBEDDED_ENABLED", "0", "embedded.enabled", False),
        ("LMBRIDGE_STORAGE_PATH", "/tmp/x/lm.db", "storage.path", Path("/tmp/x/lm.db")),
        ("LMBRIDGE_EMBEDDED_MODEL", "/m/a.gguf", "embedded.model", Path("/m/a.gguf")),
        ("LMBRIDGE_MODELS_DEFAULT", "qwen/qwen3-4b", "models.default", "qwen/qwen3-4b"),
        (
            "LMBRIDGE_MODELS_ALIASES",
            "gpt-4o=qwen/qwen3-4b",
            "models.aliases",
            {"gpt-4o": "qwen/qwen3-4b"},
        ),
        (
            "LMBRIDGE_MODELS_ALIASES",
            " gpt-4o = qwen/qwen3-4b , small=smollm2,, ",
            "models.aliases",
            {"gpt-4o": "qwen/qwen3-4b", "small": "smollm2"},
        ),
        (
            "LMBRIDGE_MODELS_ALIASES",
            '{"gpt-4o": "qwen/qwen3-4b", "a,b": "c=d"}',
            "models.aliases",
            {"gpt-4o": "qwen/qwen3-4b", "a,b": "c=d"},
        ),
        ("LMBRIDGE_MODELS_ALIASES", "", "models.aliases", {}),
    ],
)
def test_environment_values(var, raw, dotted, expected):
    """LMBRIDGE_<SECTION>_<KEY> values are parsed for the key's type (comma or JSON for dicts)."""
    assert dig(load(environ={var: raw}), dotted) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("sk-a,sk-b", ["sk-a", "sk-b"]),
        (" sk-a , sk-b ,, ", ["sk-a", "sk-b"]),
        ('["sk-a", "sk,b"]', ["sk-a", "sk,b"]),
        ("sk-only", ["sk-only"]),
        ("", []),
        ("[]", []),
    ],
)
def test_environment_lists(raw, expected):
    """List keys take a comma-separated list or a JSON array."""
    config = load(environ={"LMBRIDGE_AUTH_API_KEYS": raw})
    assert [k.get_secret_value() for k in config.auth.api_keys] == expected


def test_environment_lists_resolve_env_secrets(monkeypatch):
    """env:VAR items of a comma list are each resolved."""
    monkeypatch.setenv("LMB_TEST_A", "sk-from-a")
    monkeypatch.setenv("LMB_TEST_B", "sk-from-b")
    config = load(environ={"LMBRIDGE_AUTH_API_KEYS": "env:LMB_TEST_A,env:LMB_TEST_B"})
    assert [k.get_secret_value() for k in config.auth.api_keys] == ["sk-from-a", "sk-from-b"]


def test_environment_variable_section_case():
    """The section and key part of a variable name are matched case-insensitively."""
    assert load(environ={"LMBRIDGE_Server_Port": "4321"}).server.port == 4321


def test_environment_dict_item_without_equals_is_an_error():
    """LMBRIDGE_MODELS_ALIASES=name (no '=target') is reported, not mapped to ''."""
    message = config_error(environ={"LMBRIDGE_MODELS_ALIASES": "gpt-4o"})
    assert message.startswith("models.aliases")


# --- rendering -------------------------------------------------------------------


def rich_flags(tmp_path: Path) -> dict[str, Any]:
    return {
        "server.host": "0.0.0.0",
        "server.port": 8080,
        "server.max_body_size": "512KiB",
        "server.shutdown_grace": "500ms",
        "upstream.url": "https://gpu.local:8443/v1",
        "upstream.retry_backoff": 0.00001,
        "upstream.idle_timeout": "30d",
        "models.default": "qwen/qwen3-4b",
        "models.aliases": {"gpt-4o-mini": "qwen/qwen3-4b", 'odd "name" \\ café': "x"},
        "storage.path": str(tmp_path / "data dir" / "lm.db"),
        "logging.level": "warning",
        "logging.format": "json",
        "embedded.enabled": True,
        "embedded.model": str(tmp_path / "model.gguf"),
        "embedded.threads": 4,
    }


def round_trip(config: Config, tmp_path: Path) -> Config:
    text = render_toml(config)
    tomllib.loads(text)  # valid TOML
    path = tmp_path / "rendered.toml"
    path.write_text(text, encoding="utf-8")
    return load(path)


def test_render_round_trips_defaults(tmp_path):
    """The rendered default configuration parses back into the same configuration."""
    config = load()
    assert round_trip(config, tmp_path) == config


def test_render_round_trips_every_kind_of_value(tmp_path):
    """Strings, paths, durations, sizes, booleans and dicts survive render and reload."""
    config = load(flags=rich_flags(tmp_path))
    assert round_trip(config, tmp_path) == config


def test_render_unset_values_are_comments():
    """A key whose value is None is rendered as a comment, not as a value."""
    text = render_toml(load())
    assert "# api_key is not set" in text
    assert "# default is not set" in text
    assert "default" not in tomllib.loads(text)["models"]


def test_render_masks_secrets(tmp_path, monkeypatch):
    """Secrets never appear in the rendered TOML; each is replaced by the mask."""
    monkeypatch.setenv("LMB_TEST_UPSTREAM_KEY", "sk-upstream-123")
    flags = rich_flags(tmp_path) | {
        "upstream.api_key": "env:LMB_TEST_UPSTREAM_KEY",
        "auth.api_keys": ["sk-client-789", "sk-client-000"],
    }
    config = load(flags=flags)
    text = render_toml(config)
    for secret in ("sk-upstream-123", "sk-client-789", "sk-client-000", "LMB_TEST_UPSTREAM_KEY"):
        assert secret not in text
    parsed = tomllib.loads(text)
    assert parsed["upstream"]["api_key"] == MASK
    assert parsed["auth"]["api_keys"] == [MASK, MASK]

    reloaded = round_trip(config, tmp_path)
    assert reloaded.upstream.api_key is not None
    assert reloaded.upstream.api_key.get_secret_value() == MASK
    assert [k.get_secret_value() for k in reloaded.auth.api_keys] == [MASK, MASK]
    secrets = {"upstream": {"api_key"}, "auth": {"api_keys"}}
    assert reloaded.model_dump(exclude=secrets) == config.model_dump(exclude=secrets)


def test_render_round_trips_characters_outside_the_bmp(tmp_path):
    """A model name with an emoji renders as valid TOML and reloads unchanged."""
    config = load(flags={"models.aliases": {"rocket-🚀": "qwen/qwen3-4b"}})
    assert round_trip(config, tmp_path) == config


# --- per-model tables ---------------------------------------------------------------

PER_MODEL = """
[models]
queue_size = 10
queue_timeout = "2m"

[models."*"]
max_concurrent = 8
queue_size = 3

[models."qwen3-*"]
max_concurrent = 2

[models."qwen3-4b"]
queue_timeout = "5s"

[models."qwen3-?b"]
max_concurrent = 5

[models."llama-3.1-8b"]
max_concurrent = 1

[models."q*"]
max_concurrent = 9

[models."Mistral-*"]
queue_size = 0

[models."mistral-?"]
queue_size = 7
"""


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("other", (8, 3, 120.0)),  # "*" only
        ("qwen3-4b", (5, 3, 5.0)),  # the exact id over every glob
        ("qwen3-8b", (5, 3, 120.0)),  # "qwen3-?b" is longer than "qwen3-*"
        ("QWEN3-32B", (2, 3, 120.0)),  # case-insensitive; "qwen3-?b" does not match
        ("qwen2", (9, 3, 120.0)),  # "q*" over "*"
        ("llama-3.1-8b", (1, 3, 120.0)),  # a dot in an exact id
        ("mistral-7", (8, 7, 120.0)),  # "Mistral-*" and "mistral-?" as long: the later
        ("mistral-7b", (8, 0, 120.0)),
    ],
)
def test_settings_for_a_model(write_toml, model, expected):
    """Every matching table applies, the more specific over the less: an exact id over
    globs, a longer glob over a shorter, the later of equals; unset keys come from
    [models]."""
    settings = load(write_toml(PER_MODEL)).models.settings_for(model)
    assert (settings.max_concurrent, settings.queue_size, settings.queue_timeout) == expected


def test_settings_for_without_tables_are_the_defaults():
    """Without tables every model gets the [models] values: no limit, 64 waiting, 300 s."""
    settings = load().models.settings_for("any")
    assert (settings.max_concurrent, settings.queue_size, settings.queue_timeout) == (
        None,
        64,
        300.0,
    )


def test_every_per_model_setting_has_a_default_in_models():
    """Each key of a [models."PATTERN"] table is also a key of [models], its default."""
    from proxy.config import ModelsConfig, ModelSettings

    assert set(ModelSettings.model_fields) <= set(ModelsConfig.model_fields)


def test_a_per_model_table_on_the_command_line():
    """A table given as a dotted flag (models.PATTERN) is read like one of the file."""
    config = load(flags={"models.qwen*": {"max_concurrent": 1}})
    assert config.models.settings_for("qwen3").max_concurrent == 1


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        (
            '[models."qwen3-*"]\nmax_concurent = 1\n',
            'models."qwen3-*".max_concurent: unknown key (known keys of a [models."PATTERN"] '
            "table: max_concurrent, queue_size, queue_timeout, "
            "text_tool_calls, text_call_hold, describe_tools, think_tags, think_opened, "
            "template_tools, "
            "reasoning_in_history, ttl, context_length, schema_retry)",
        ),
        (
            '[models."qwen3-*"]\nmax_concurrent = 0\n',
            'models."qwen3-*".max_concurrent: Input should be greater than or equal to 1 (got 0)',
        ),
        (
            '[models."qwen3-4b"]\nqueue_timeout = "soon"\n',
            "models.qwen3-4b.queue_timeout: not a duration: 'soon'",
        ),
        (
            '[models."qwen3-4b"]\nqueue_size = -1\n',
            "models.qwen3-4b.queue_size: Input should be greater than or equal to 0 (got -1)",
        ),
        ("[models]\nqueue_timeout = 0\n", "models.queue_timeout: Input should be greater than 0"),
    ],
    ids=["unknown-key", "max-concurrent-zero", "bad-duration", "negative-queue", "zero-timeout"],
)
def test_problems_in_per_model_tables(write_toml, toml, expected):
    """A mistake in a per-model table is one line naming the table, the key and the file."""
    path = write_toml(toml)
    message = config_error(path)
    assert message.startswith(expected)
    assert message.endswith(f"[from {path}]")


def test_environment_variables_cannot_name_a_model_table():
    """LMBRIDGE_MODELS_<PATTERN> is no configuration key: tables are written in the file."""
    message = config_error(environ={"LMBRIDGE_MODELS_QWEN3": '{"max_concurrent": 1}'})
    assert message.startswith("LMBRIDGE_MODELS_QWEN3: not a configuration key")


def test_render_round_trips_per_model_tables(write_toml, tmp_path):
    """check-config prints each table as [models."PATTERN"], which loads back the same."""
    config = load(write_toml(PER_MODEL))
    assert '[models."qwen3-*"]' in render_toml(config)
    reloaded = round_trip(config, tmp_path)
    assert reloaded == config
    assert list(reloaded.models.tables) == list(config.models.tables)


def test_low_priority_keys_are_among_the_api_keys(monkeypatch):
    """auth.low_priority_keys names keys of auth.api_keys (written again or as env:VAR);
    another key is an error that does not show it."""
    monkeypatch.setenv("LMB_TEST_BATCH_KEY", "sk-batch")
    config = load(
        flags={
            "auth.api_keys": ["sk-me", "env:LMB_TEST_BATCH_KEY"],
            "auth.low_priority_keys": ["sk-batch"],
        }
    )
    assert [k.get_secret_value() for k in config.auth.low_priority_keys] == ["sk-batch"]
    message = config_error(
        flags={"auth.api_keys": ["sk-me"], "auth.low_priority_keys": ["sk-me", "sk-other"]}
    )
    assert message.startswith("auth.low_priority_keys: key 2 of the list is not one of")
    assert "sk-other" not in message


TWO_UPSTREAMS = """
[[upstreams]]
name = "studio"
url = "http://127.0.0.1:1234"
kind = "lmstudio"

[[upstreams]]
name = "box"
url = "http://192.168.1.20:8080"
kind = "llamacpp"
api_key = "env:BOX_KEY"

[models]
fallbacks = { "qwen3-32b" = ["qwen3-8b"] }
"""


def test_upstreams_in_the_file(write_toml):
    """[[upstreams]] entries are the upstream list, in order; [upstream] stays the default."""
    config = load(write_toml(TWO_UPSTREAMS), environ={"BOX_KEY": "s3cret"})
    assert [(u.name, u.kind) for u in config.upstream_list] == [
        ("studio", "lmstudio"),
        ("box", "llamacpp"),
    ]
    assert config.upstreams[1].api_key is not None
    assert config.upstreams[1].api_key.get_secret_value() == "s3cret"
    assert config.models.fallbacks == {"qwen3-32b": ["qwen3-8b"]}
    assert "s3cret" not in render_toml(config)
    assert render_toml(config).count("[[upstreams]]") == 2


def test_one_upstream_is_the_shorthand():
    """Without [[upstreams]], the list is the one [upstream], named default."""
    config = load(flags={"upstream.url": "http://127.0.0.1:9"})
    assert [(u.name, u.url) for u in config.upstream_list] == [("default", "http://127.0.0.1:9")]


@pytest.mark.parametrize(
    ("extra", "flags", "expected"),
    [
        ('[upstream]\nurl = "http://127.0.0.1:1"\n', None, "[upstream] (or --upstream"),
        ("", {"upstream.url": "http://127.0.0.1:1"}, "[upstream] (or --upstream"),
        ("[embedded]\nenabled = true\n", None, "embedded.enabled replaces the upstream"),
        (
            '[[upstreams]]\nname = "box"\nurl = "http://127.0.0.1:2"\n',
            None,
            "upstreams: entry 3 repeats the name 'box'",
        ),
        ('[[upstreams]]\nurl = "http://127.0.0.1:2"\n', None, "upstreams: entry 3 has no name"),
        (
            '[[upstreams]]\nname = "no spaces"\nurl = "http://127.0.0.1:2"\n',
            None,
            "upstreams.2.name: an upstream name is 1 to 64",
        ),
        (
            '[[upstreams]]\nname = "c"\nkind = "tgi"\nurl = "http://127.0.0.1:2"\n',
            None,
            "upstreams.2.kind:",
        ),
    ],
    ids=["both-forms", "flag-and-list", "embedded", "duplicate", "no-name", "bad-name", "kind"],
)
def test_bad_upstreams_are_one_clear_line(write_toml, extra, flags, expected):
    """Each mistake with [[upstreams]] stops start-up with a line that says what to fix."""
    path = write_toml(TWO_UPSTREAMS + extra)
    message = config_error(path, environ={"BOX_KEY": "k"}, flags=flags)
    assert expected in message
