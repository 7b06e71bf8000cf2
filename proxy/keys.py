"""Typed keys for what the app and each request share (aiohttp AppKey/RequestKey).

The classes are imported for the type checker only: importing this module (every
handler does) loads none of the packages whose objects the keys hold.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from proxy.accounting import Metered
    from proxy.browsers import BrowserPolicy
    from proxy.catalog import ModelCatalog
    from proxy.config import Config
    from proxy.event_stream import EventStream, RelayedStream
    from proxy.lifecycle import ModelLifecycle
    from proxy.logs import RequestLog
    from proxy.mcp.servers import MCPServers
    from proxy.mcp.turns import TurnMemory
    from proxy.metrics import Metrics
    from proxy.queues import ModelQueues
    from proxy.quotas import QuotaBook
    from proxy.responses.conversations import ConversationService
    from proxy.responses.service import ResponsesService
    from proxy.responses.websocket import Connection
    from proxy.tasks import BackgroundTasks, WorkerThread
    from proxy.upstream import UpstreamClient
    from proxy.upstreams import Route, UpstreamPool
    from proxy.usage_recorder import UsageRecorder
    from storage.sqlite import SQLiteStore

CONFIG: web.AppKey[Config] = web.AppKey("config")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
# Every upstream (proxy/upstreams.py): where each model call is routed.
UPSTREAMS: web.AppKey[UpstreamPool] = web.AppKey("upstreams")
# The first upstream's client (the only one with a single upstream).
UPSTREAM: web.AppKey[UpstreamClient] = web.AppKey("upstream")
# The model catalogue: the union of the upstreams' lists.
CATALOG: web.AppKey[ModelCatalog] = web.AppKey("catalog")
# The first upstream's model queues: each model's concurrency limit and the requests
# waiting for it (each upstream has its own, UpstreamPool).
QUEUES: web.AppKey[ModelQueues] = web.AppKey("queues")
# Loading and unloading the first upstream's models (proxy/lifecycle.py).
LIFECYCLE: web.AppKey[ModelLifecycle] = web.AppKey("lifecycle")
STORE: web.AppKey[SQLiteStore] = web.AppKey("store")
REQUEST_LOG: web.AppKey[RequestLog] = web.AppKey("request_log")
TASKS: web.AppKey[BackgroundTasks] = web.AppKey("tasks")
# The CPU work of large requests, off the event loop.
WORKER: web.AppKey[WorkerThread] = web.AppKey("worker")
MCP: web.AppKey[MCPServers] = web.AppKey("mcp")
# The MCP steps of chat-completions turns handed back to the client mid-loop.
TURNS: web.AppKey[TurnMemory] = web.AppKey("turns")
RESPONSES: web.AppKey[ResponsesService] = web.AppKey("responses")
CONVERSATIONS: web.AppKey[ConversationService] = web.AppKey("conversations")
# The open WebSocket connections to /v1/responses, closed after their turn at shutdown.
RESPONSE_SOCKETS: web.AppKey[set[Connection]] = web.AppKey("response_sockets")
# Client API keys, resolved once, each with the owner id of what it stores; empty
# means no authentication.
API_KEYS: web.AppKey[dict[bytes, str]] = web.AppKey("api_keys")
# Where usage records go (proxy/usage_recorder.py), and the per-key quotas they count.
USAGE: web.AppKey[UsageRecorder] = web.AppKey("usage")
QUOTAS: web.AppKey[QuotaBook] = web.AppKey("quotas")
# Keys that may read every key's usage (their owner ids).
USAGE_ADMINS: web.AppKey[frozenset[str]] = web.AppKey("usage_admins")
# server.allowed_hosts and server.cors_origins, applied to every request.
BROWSERS: web.AppKey[BrowserPolicy] = web.AppKey("browsers")

REQUEST_ID = web.RequestKey("request_id", str)
STARTED = web.RequestKey("started", float)
# The upstream model a request was resolved to, for logs and metrics.
MODEL = web.RequestKey("model", str)
# The model calls of a request (proxy/upstreams.py): the upstream that served it and the
# failed attempts before (the X-LMBridge-Upstream header, the log line's upstream, hops).
ROUTE: web.RequestKey[Route] = web.RequestKey("route")
# Seconds a request waited in its model's queue, when it had to (the log line's queued_ms).
QUEUED = web.RequestKey("queued", float)
# Seconds a request waited for its model to load, when it had to (load_wait_ms).
LOAD_WAIT = web.RequestKey("load_wait", float)
# Who owns what this request stores: the hash of its API key, "" without keys.
OWNER = web.RequestKey("owner", str)
# The CORS headers of an answer to an allowed cross-origin browser request.
CORS = web.RequestKey("cors", dict[str, str])
# A warning for the client about this request (sent as the X-LMBridge-Warning header).
WARNING = web.RequestKey("warning", str)
# Whether the answer to a request for JSON validated against its schema: "valid" or
# "invalid" (the X-LMBridge-Schema header, the log line's schema).
SCHEMA = web.RequestKey("schema", str)
# Set by a stream relay when the client went away before the end.
CLIENT_GONE = web.RequestKey("client_gone", bool)
# A request relayed to the upstream as it came (proxy/relay.py): its metric route label.
RELAYED = web.RequestKey("relayed", str)
# A request that calls a model: what it spent, recorded when it ends (proxy/accounting.py).
METERED: web.RequestKey[Metered] = web.RequestKey("metered")
# A stream whose headers are out: an error after that can only end it (middleware).
OPEN_STREAM: web.RequestKey[EventStream | RelayedStream] = web.RequestKey("open_stream")
