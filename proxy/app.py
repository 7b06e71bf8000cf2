"""The application factory. Nothing at module level opens a connection, reads
the environment or registers a metric: ``create_app`` builds everything, and
each resource is opened and closed in one ``cleanup_ctx`` generator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import web

from proxy import health, model_admin, passthrough, usage_http
from proxy.browsers import BrowserPolicy
from proxy.config import Config
from proxy.embedded import context_hint
from proxy.keys import (
    API_KEYS,
    BROWSERS,
    CATALOG,
    CONFIG,
    CONVERSATIONS,
    LIFECYCLE,
    MCP,
    METRICS,
    QUEUES,
    QUOTAS,
    REQUEST_LOG,
    RESPONSES,
    STORE,
    TASKS,
    TURNS,
    UPSTREAM,
    UPSTREAMS,
    USAGE,
    USAGE_ADMINS,
    WORKER,
)
from proxy.logs import RequestLog
from proxy.mcp import routes as mcp_routes
from proxy.mcp.servers import MCPServers
from proxy.mcp.turns import TurnMemory
from proxy.metrics import Metrics
from proxy.middleware import handle_request
from proxy.owners import owner_of
from proxy.queues import ModelQueues
from proxy.quotas import Quota, QuotaBook
from proxy.responses import routes as responses_routes
from proxy.responses.conversations import ConversationService
from proxy.responses.service import ResponsesService
from proxy.tasks import BackgroundTasks, WorkerThread
from proxy.upstream import CONTEXT_HINT, UpstreamClient, new_session
from proxy.upstreams import Upstream, UpstreamPool
from proxy.usage_recorder import UsageRecorder
from storage.sqlite import SQLiteStore


def create_app(
    config: Config,
    *,
    session: aiohttp.ClientSession | None = None,
    store: SQLiteStore | None = None,
    request_log: RequestLog | None = None,
) -> web.Application:
    """Build the daemon's app. Tests may hand in their own upstream session, store or
    request log; what is handed in is not closed by the app."""
    app = web.Application(
        client_max_size=config.server.max_body_size,
        middlewares=[handle_request],
    )
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[REQUEST_LOG] = request_log or RequestLog(
        config.logging.format, enabled=config.logging.level in ("debug", "info")
    )
    app.on_cleanup.append(lambda app: _flush(app[REQUEST_LOG]))
    keys = [key.get_secret_value().encode() for key in config.auth.api_keys]
    app[API_KEYS] = {key: owner_of(key) for key in keys}
    app[QUEUES] = _queues(config, app[METRICS])
    usage = config.usage
    app[USAGE_ADMINS] = frozenset(
        owner_of(key.get_secret_value().encode()) for key in usage.admin_keys
    )
    app[QUOTAS] = QuotaBook(
        {
            owner_of(q.key.get_secret_value().encode()): Quota(
                q.tokens_per_day, q.requests_per_minute
            )
            for q in usage.quotas
        }
    )
    app[BROWSERS] = BrowserPolicy(config.server.allowed_hosts, config.server.cors_origins)
    app[TURNS] = TurnMemory()
    app.cleanup_ctx.append(_worker_ctx)
    app.cleanup_ctx.append(_upstream_ctx(session))
    app.cleanup_ctx.append(_storage_ctx(store))
    app.cleanup_ctx.append(_usage_ctx)
    app.cleanup_ctx.append(_mcp_ctx)
    app.cleanup_ctx.append(_responses_ctx)
    _add_routes(app)
    responses_routes.add_routes(app)
    return app


async def _flush(request_log: RequestLog) -> None:
    request_log.flush()


def _add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/healthz", health.healthz)
    r.add_get("/readyz", health.readyz)
    r.add_get("/metrics", health.metrics)
    r.add_get("/v1/models", passthrough.list_models)
    r.add_get("/v1/models/{model:.+}", passthrough.get_model)
    r.add_post("/v1/chat/completions", passthrough.chat_completions)
    r.add_post("/v1/completions", passthrough.completions)
    r.add_post("/v1/embeddings", passthrough.embeddings)
    r.add_get("/v1/mcp/servers", mcp_routes.list_servers)
    model_admin.add_routes(app)
    r.add_get("/v1/lmbridge/usage", usage_http.get_usage)


CleanupCtx = Callable[[web.Application], AsyncIterator[None]]


def _upstream_ctx(given: aiohttp.ClientSession | None) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        config = app[CONFIG]
        hint = context_hint(config.embedded) if config.embedded.enabled else CONTEXT_HINT
        opened: list[aiohttp.ClientSession] = []
        try:
            upstreams = []
            for number, entry in enumerate(config.upstream_list):
                session = given
                if session is None:
                    session = new_session(entry)
                    opened.append(session)
                client = UpstreamClient(entry, session, app[METRICS], context_hint=hint)
                # The first upstream's queues are the app's (made with the app).
                queues = app[QUEUES] if number == 0 else _queues(config, app[METRICS])
                upstreams.append(Upstream(entry, client, config.models, app[METRICS], queues))
            pool = UpstreamPool(upstreams, config.models, app[METRICS])
            app[UPSTREAMS] = pool
            app[UPSTREAM] = pool.first.client
            app[CATALOG] = pool.catalog
            app[LIFECYCLE] = pool.first.lifecycle
            tasks = _start_lifecycles(app, pool)
            try:
                yield
            finally:
                await tasks.close()
                for upstream in upstreams:
                    await upstream.lifecycle.close()
        finally:
            for session in opened:
                await session.close()

    return ctx


def _queues(config: Config, metrics: Metrics) -> ModelQueues:
    low_priority = [key.get_secret_value().encode() for key in config.auth.low_priority_keys]
    return ModelQueues(config.models, metrics, low_priority={owner_of(key) for key in low_priority})


def _start_lifecycles(app: web.Application, pool: UpstreamPool) -> BackgroundTasks:
    """Each upstream's model lifecycle: its idle reaper, and models.preload where each
    model would be served, in the background (a slow or failed preload never holds
    start-up). A function, not a context manager: an async generator inside the upstream
    context could be finalized before it when start-up fails later and nothing runs the
    clean-up."""
    config = app[CONFIG].models
    tasks = BackgroundTasks()
    for upstream in pool.upstreams:
        tasks.spawn(upstream.lifecycle.reap_forever(), f"unload idle models of {upstream.name}")
    if config.preload:
        tasks.spawn(pool.preload(config.preload), "preload models")
    return tasks


async def _worker_ctx(app: web.Application) -> AsyncIterator[None]:
    worker = WorkerThread()
    app[WORKER] = worker
    try:
        yield
    finally:
        worker.close()


async def _mcp_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    servers = MCPServers(config.mcp, app[METRICS], log_dir=config.storage.path.parent)
    app[MCP] = servers
    servers.start()
    try:
        yield
    finally:
        await servers.close()


async def _usage_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG].usage
    recorder = UsageRecorder(
        app[STORE],
        app[METRICS],
        app[QUOTAS],
        enabled=config.enabled,
        flush_interval=config.flush_interval,
        max_pending=config.max_pending,
    )
    app[USAGE] = recorder
    await recorder.start()
    tasks = BackgroundTasks()
    tasks.spawn(recorder.run(), "write usage records")
    if config.retention:
        interval = app[CONFIG].responses.purge_interval
        tasks.spawn(recorder.purge_forever(config.retention, interval), "purge usage records")
    try:
        yield
    finally:
        # After the responses' clean-up (contexts close in reverse): the records of the
        # background responses it stopped are written too.
        await tasks.close()
        await recorder.flush()


async def _responses_ctx(app: web.Application) -> AsyncIterator[None]:
    tasks = BackgroundTasks()
    app[TASKS] = tasks
    service = ResponsesService(
        app[CONFIG],
        app[STORE],
        app[UPSTREAMS],
        tasks,
        app[MCP],
        app[WORKER],
        usage=app[USAGE],
        metrics=app[METRICS],
    )
    app[RESPONSES] = service
    app[CONVERSATIONS] = ConversationService(
        app[STORE],
        retention=int(app[CONFIG].responses.retention),
        clock=lambda: service.clock(),
        ids=service.ids,
    )
    await service.recover()
    tasks.spawn(service.purge_forever(), "purge expired responses")
    try:
        yield
    finally:
        # Running background responses are stored as failed when cancelled here.
        await tasks.close()


def _storage_ctx(given: SQLiteStore | None) -> CleanupCtx:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        store = given or await SQLiteStore.open(app[CONFIG].storage.path)
        app[STORE] = store

        def stats() -> tuple[int, int]:
            current = store.write_stats
            return current.writes, current.batches

        app[METRICS].watch_storage(stats)
        try:
            yield
        finally:
            if given is None:
                await store.close()

    return ctx
