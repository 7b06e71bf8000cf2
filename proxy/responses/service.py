"""The Responses service: one function per endpoint, the data flow top to bottom.

create: validate -> resolve the model -> load the chain or conversation ->
render to a chat request -> upstream (streamed or not) -> ResponseBuilder ->
store -> respond. The transport is not known here: ``execute`` hands events to
a sink (an SSE writer, a background response's event log, or nothing), so the
WebSocket mode can reuse it as it is.

Durability: a response is written (and committed) before the client sees its
final state: before the JSON reply, before ``response.completed``, and before
a background response is acknowledged as queued. A background response's final
state must reach storage, where it is polled and replayed from: when storage
cannot take it, the response ends failed, and is stored so as soon as storage
works again (``_store_final``, ``_repair``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from proxy import chat_upstream
from proxy.catalog import ModelCatalog, ModelInfo
from proxy.config import Config
from proxy.errors import (
    BadRequest,
    ConversationLocked,
    LMBridgeError,
    NotFound,
    PreviousResponseNotFound,
    UpstreamError,
    UpstreamStatus,
)
from proxy.ids import new_id
from proxy.jsontext import dumps, loads
from proxy.mcp.policy import LIMIT_NOTE, Answered, Decision, LoopPolicy
from proxy.mcp.servers import MCPServers
from proxy.responses import render
from proxy.responses.builder import (
    TERMINAL_EVENTS,
    Event,
    McpTarget,
    PendingMcpCall,
    ResponseBuilder,
    replay_events,
)
from proxy.responses.mcp_tools import McpSetup, run_mcp_call, setup_mcp
from proxy.responses.objects import list_page, response_object
from proxy.responses.render import ChatTools, ToolNames
from proxy.responses.request import CreateRequest, normalize_item, parse_create
from proxy.tasks import BackgroundTasks, WorkerThread
from proxy.upstream import UpstreamClient
from proxy.usage import usage_from_chat
from storage.errors import StorageError
from storage.records import ResponseRecord, ResponseStore, StoredItem

log = logging.getLogger("lmbridge.responses")

CHAT_PATH = chat_upstream.CHAT_PATH
ROUTE = "/v1/responses"
Sink = Callable[[list[Event]], Awaitable[None]]

UNSTORED = "lmbridge could not store the final state of this response."
# How often the failed state of such responses is tried again, besides after any
# write that succeeds.
REPAIR_INTERVAL = 5.0
# A turn holds its conversation for this long (clock seconds) unless it renews its
# claim, as it does every third of it while it runs: a daemon that dies mid-turn
# leaves the conversation busy no longer than this.
CONVERSATION_LEASE = 60


# A release that failed is tried again after 0.25 s, then at doubling intervals.
RELEASE_RETRY_FIRST = 0.25
RELEASE_RETRIES = 8


def owner_of(api_key: bytes | None) -> str:
    """Stored objects belong to the hash of the key that created them ("" without keys)."""
    return hashlib.sha256(api_key).hexdigest()[:32] if api_key else ""


async def _discard(events: list[Event]) -> None:
    return None


@dataclass
class Prepared:
    """Everything the upstream call needs, loaded and rendered."""

    request: CreateRequest
    model: ModelInfo
    tools: ChatTools
    settings: dict[str, Any]
    system: list[dict[str, Any]]
    history: list[str]  # JSON array texts, oldest turn first
    history_tokens: list[int]
    input_items: list[dict[str, Any]]
    new_messages: list[dict[str, Any]]
    owner: str
    mcp: McpSetup | None = None
    # Calls the client approved (mcp_approval_response): the request item and its target.
    approved: list[tuple[dict[str, Any], McpTarget]] = field(default_factory=list)
    mcp_listed: tuple[str, ...] = ()
    # The input items as stored, made at the first save.
    stored_inputs: tuple[StoredItem, ...] | None = None


@dataclass
class ConversationTurn:
    """A turn's claim on its conversation (storage/records.py ``claim_conversation``)."""

    conversation_id: str
    owner: str
    holder: str  # the response id
    renewing: asyncio.Task[None] | None = None


@dataclass
class ResponseRun:
    """One response being produced."""

    id: str
    prepared: Prepared
    builder: ResponseBuilder
    created_at: int
    events: list[Event] = field(default_factory=list)
    finished: bool = False
    task: asyncio.Task[Any] | None = None
    cancel_requested: bool = False
    # A background run has begun (a cancel before then is seen when it begins: a task
    # cancelled before its first step never runs its clean-up).
    started: bool = False
    # Its final state is decided: a cancel can no longer change it.
    settling: bool = False
    # Storage could not take its final state: it is failed, and stored so later.
    unstored: bool = False
    # The Response as last stored (JSON text), so that the reply need not serialise
    # it a second time; while ``unstored``, as storage will hold it.
    stored_json: str | None = None
    turn: ConversationTurn | None = None
    _changed: asyncio.Condition | None = None
    _settled: asyncio.Event | None = None

    @property
    def changed(self) -> asyncio.Condition:
        """Wakes readers of a background response (made only for those)."""
        if self._changed is None:
            self._changed = asyncio.Condition()
        return self._changed

    @property
    def settled(self) -> asyncio.Event:
        """Set once a background run's final state is stored (or, ``unstored``, known)."""
        if self._settled is None:
            self._settled = asyncio.Event()
        return self._settled

    @property
    def request(self) -> CreateRequest:
        return self.prepared.request

    @property
    def response(self) -> dict[str, Any]:
        return self.builder.response

    async def record(self, events: list[Event]) -> None:
        """The sink of a background response: keep the events, wake the readers."""
        if not events:
            return
        async with self.changed:
            self.events.extend(events)
            self.changed.notify_all()

    async def follow(self, starting_after: int | None) -> AsyncIterator[Event]:
        """Events so far (after ``starting_after``), then live ones until the end."""
        position = 0
        while True:
            async with self.changed:
                while position >= len(self.events) and not self.finished:
                    await self.changed.wait()
                batch = self.events[position:]
                position = len(self.events)
                done = self.finished
            for event in batch:
                if starting_after is None or event["sequence_number"] > starting_after:
                    yield event
            if done and position >= len(self.events):
                return


class ResponsesService:
    def __init__(
        self,
        config: Config,
        store: ResponseStore,
        upstream: UpstreamClient,
        catalog: ModelCatalog,
        tasks: BackgroundTasks,
        mcp: MCPServers,
        worker: WorkerThread,
        *,
        clock: Callable[[], float] = time.time,
        ids: Callable[[str], str] = new_id,
    ) -> None:
        self.config = config
        self.store = store
        self.upstream = upstream
        self.catalog = catalog
        self.tasks = tasks
        self.clock = clock
        self.ids = ids
        # Background runs not yet stored in their final state: running, or unstored.
        self.running: dict[str, ResponseRun] = {}
        self.mcp = mcp
        self.repair_interval = REPAIR_INTERVAL
        self.conversation_lease = CONVERSATION_LEASE
        self.lease_renewal = CONVERSATION_LEASE / 3  # seconds of real time
        self._repairing: asyncio.Task[None] | None = None
        self._storage_works = asyncio.Event()
        self.worker = worker

    # --- create -----------------------------------------------------------

    async def parse(self, body: dict[str, Any]) -> CreateRequest:
        def parse() -> CreateRequest:
            limit = self.config.responses.max_input_items
            return parse_create(body, self.ids, max_input_items=limit)

        return await self.worker.run_if(_count(body.get("input")) > LARGE_INPUT, parse)

    async def create(self, body: dict[str, Any], owner: str) -> ResponseRun:
        request = await self.parse(body)
        response_id = self.ids("resp")
        # Before its items are read: the turn sees every turn before it.
        turn = await self._claim(request, owner, response_id)
        try:
            run = await self._create(request, owner, response_id)
        except BaseException:
            if turn is not None:
                await asyncio.shield(self._release(turn))
            raise
        run.turn = turn
        if request.background:
            self.running[run.id] = run
            run.task = self.tasks.spawn(self._run_background(run), f"response {run.id}")
            run.task.add_done_callback(lambda _: run.settled.set())  # whatever happened
        return run

    async def _create(self, request: CreateRequest, owner: str, response_id: str) -> ResponseRun:
        prepared = await self.prepare(request, owner)
        if not (prepared.system or prepared.new_messages or prepared.approved) and all(
            turn == "[]" for turn in prepared.history
        ):
            # Upstreams answer an empty message list with an error of their own, or worse.
            raise BadRequest(
                "There is nothing to answer: send 'input' (a string or an array of items), "
                "'instructions', or continue with 'previous_response_id' or 'conversation'.",
                param="input",
            )
        created_at = int(self.clock())
        response = response_object(
            request, response_id=response_id, model=prepared.model.id, created_at=created_at
        )
        builder = ResponseBuilder(
            response, prepared.tools.names, ids=self.ids,
            max_tool_calls=request.max_tool_calls, clock=self.clock,
            emit=request.stream or request.background,
            mcp=prepared.mcp.targets if prepared.mcp is not None else None,
        )  # fmt: skip
        run = ResponseRun(response_id, prepared, builder, created_at)
        if request.background:
            await run.record(builder.start(queued=True))
            await self._save(run)  # acknowledged as queued only once it is durable
        return run

    # --- conversations: one turn at a time -------------------------------

    async def _claim(
        self, request: CreateRequest, owner: str, response_id: str
    ) -> ConversationTurn | None:
        """Take the request's conversation for this turn, or ConversationLocked. A turn
        with ``store: false`` appends nothing, so it takes nothing."""
        if request.conversation_id is None or not request.store:
            return None
        turn = ConversationTurn(request.conversation_id, owner, response_id)
        claimed = await self.store.claim_conversation(
            turn.conversation_id, owner, response_id, self._lease_end()
        )
        if claimed is False:
            raise ConversationLocked(
                f"Another response is in progress in conversation '{turn.conversation_id}'; "
                "a conversation takes one turn at a time. Retry once it has finished.",
                param="conversation",
            )
        if claimed is None:
            return None  # absent: prepare() answers 404
        turn.renewing = self.tasks.spawn(self._renew(turn), f"claim on {turn.conversation_id}")
        return turn

    def _lease_end(self) -> int:
        return int(self.clock()) + int(self.conversation_lease)

    async def _renew(self, turn: ConversationTurn) -> None:
        while True:
            await asyncio.sleep(self.lease_renewal)
            try:
                await self.store.claim_conversation(
                    turn.conversation_id, turn.owner, turn.holder, self._lease_end()
                )
            except StorageError as exc:
                log.warning("could not renew the claim on a conversation: %s", exc)

    async def _release(self, turn: ConversationTurn) -> None:
        """After the turn's final state is stored (the next turn must see its items)."""
        if turn.renewing is not None:
            turn.renewing.cancel()
        try:
            await self.store.release_conversation(turn.conversation_id, turn.holder)
        except StorageError as exc:
            # A writer that died is replaced on the next write: try again shortly rather
            # than leave the conversation locked for the rest of the lease.
            log.warning("could not release a conversation, trying again: %s", exc)
            self.tasks.spawn(self._release_later(turn), f"release {turn.conversation_id}")

    async def _release_later(self, turn: ConversationTurn) -> None:
        delay = RELEASE_RETRY_FIRST
        for _ in range(RELEASE_RETRIES):
            await asyncio.sleep(delay)
            try:
                await self.store.release_conversation(turn.conversation_id, turn.holder)
                return
            except StorageError:
                delay = min(delay * 2, self.lease_renewal)
        log.warning("could not release a conversation (free again in %gs at most)",
                    self.conversation_lease)  # fmt: skip

    async def prepare(self, request: CreateRequest, owner: str) -> Prepared:
        model = await self.catalog.resolve(request.model, "chat")
        tools = render.convert_tools(
            request, reject_unsupported=self.config.responses.unsupported_tools == "reject"
        )
        history: list[str] = []
        history_tokens: list[int] = []
        listed_before: set[str] = set()
        if request.previous_response_id is not None:
            chain = await self.store.load_chain(request.previous_response_id, owner)
            if chain is None:
                raise PreviousResponseNotFound(
                    f"Previous response with id '{request.previous_response_id}' not found.",
                    param="previous_response_id",
                )
            if chain.broken_at is not None:
                raise PreviousResponseNotFound(
                    f"Previous response '{request.previous_response_id}' cannot be continued: "
                    f"an earlier response of its chain ('{chain.broken_at}') was deleted or "
                    "has expired.",
                    param="previous_response_id",
                )
            history = list(chain.turn_messages)
            history_tokens = list(chain.turn_tokens)
            listed_before = set(chain.mcp_listed)
        elif request.conversation_id is not None:
            items = await self.store.all_conversation_items(request.conversation_id, owner)
            if items is None:
                raise NotFound(
                    f"Conversation with id '{request.conversation_id}' not found.",
                    param="conversation",
                    code="conversation_not_found",
                )
            limit = self.config.responses.max_history_items
            if len(items) > limit:
                raise BadRequest(
                    f"Conversation '{request.conversation_id}' holds {len(items)} items, more "
                    f"than the {limit} one turn carries as history "
                    "(responses.max_history_items): start a new conversation, or delete "
                    "old items.",
                    param="conversation",
                    code="too_many_items",
                )
            if items:
                rendered, listed_before = await self.worker.run_if(
                    len(items) > LARGE_INPUT,
                    partial(_render_stored, items, tools.names, images=model.vision is not False),
                )
                history, history_tokens = [rendered], [render.estimate_tokens(rendered)]
        input_items = await self._resolve_references(request.input, owner)
        # A client that re-sends the whole history (no previous_response_id) sends the
        # listings too: those servers are listed already.
        listed_before |= {i["server_label"] for i in input_items
                          if i.get("type") == "mcp_list_tools" and "server_label" in i}  # fmt: skip
        settings = render.chat_settings(request, model.id, tools)
        setup = None
        if any(tool.get("type") == "mcp" for tool in request.tools):
            setup = await setup_mcp(request.tools, request.tool_choice, self.mcp, self.config.mcp,
                                    listed_before, self.config.storage.path.parent)  # fmt: skip
        try:
            approved = await self._approvals(input_items, owner, setup)
        except BaseException:
            if setup is not None:
                await setup.close()
            raise
        if setup is not None and setup.chat_tools:
            settings["tools"] = [*settings.get("tools", []), *setup.chat_tools]
            choice = setup.tool_choice or request.tool_choice
            if isinstance(choice, str) or setup.tool_choice is not None:
                settings["tool_choice"] = choice
        return Prepared(
            request=request,
            model=model,
            tools=tools,
            settings=settings,
            system=render.system_messages(request),
            history=history,
            history_tokens=history_tokens,
            input_items=input_items,
            new_messages=await self.worker.run_if(
                len(input_items) > LARGE_INPUT,
                partial(
                    render.render_items, input_items, tools.names, images=model.vision is not False
                ),
            ),
            owner=owner,
            mcp=setup,
            approved=approved,
            mcp_listed=setup.listed if setup is not None else tuple(sorted(listed_before)),
        )

    async def _approvals(
        self, items: list[dict[str, Any]], owner: str, setup: McpSetup | None
    ) -> list[tuple[dict[str, Any], McpTarget]]:
        """The calls approved by mcp_approval_response items, with what they call."""
        approved: list[tuple[dict[str, Any], McpTarget]] = []
        for index, item in enumerate(items):
            if item["type"] != "mcp_approval_response":
                continue
            stored = await self.store.find_item(item["approval_request_id"], owner)
            request_item = loads(stored.json) if stored is not None else None
            if request_item is None or request_item.get("type") != "mcp_approval_request":
                raise NotFound(
                    f"Approval request '{item['approval_request_id']}' not found.",
                    param=f"input[{index}].approval_request_id", code="item_not_found",
                )  # fmt: skip
            if not item["approve"]:
                continue
            target = None
            if setup is not None:
                target = next((t for t in setup.targets.values()
                               if t.label == request_item["server_label"]
                               and t.tool == request_item["name"]), None)  # fmt: skip
            if target is None:
                raise BadRequest(
                    f"The approved call to {request_item['name']!r} of the MCP server "
                    f"{request_item['server_label']!r} needs that server's mcp tool in 'tools'.",
                    param=f"input[{index}]",
                )
            approved.append((request_item, target))
        return approved

    async def _resolve_references(
        self, items: list[dict[str, Any]], owner: str
    ) -> list[dict[str, Any]]:
        resolved = []
        for index, item in enumerate(items):
            if item["type"] != "item_reference":
                resolved.append(item)
                continue
            stored = await self.store.find_item(item["id"], owner)
            if stored is None:
                raise NotFound(
                    f"Item with id '{item['id']}' not found.", param=f"input[{index}].id",
                    code="item_not_found",
                )  # fmt: skip
            resolved.append(loads(stored.json))
        return resolved

    # --- running ----------------------------------------------------------

    async def execute(self, run: ResponseRun, sink: Sink = _discard) -> dict[str, Any]:
        """Produce the response, handing events to ``sink``; store it; return it.

        Foreground requests run this in their handler; when the client goes away
        the task is cancelled and the partial response is stored as cancelled.
        """
        try:
            return await self._execute(run, sink)
        finally:
            if run.turn is not None:
                await asyncio.shield(self._release(run.turn))

    async def _execute(self, run: ResponseRun, sink: Sink) -> dict[str, Any]:
        builder = run.builder
        request = run.request
        streamed = request.stream or request.background
        run.started = True
        try:
            if not request.background:
                await sink(builder.start())
            else:
                if run.cancel_requested:  # cancelled while queued
                    raise asyncio.CancelledError
                await sink(builder.in_progress())
                await self._save(run)
            await self._rounds(run, sink, streamed)
            final = builder.finish()
        except asyncio.CancelledError:
            if request.background and not run.cancel_requested:
                final = builder.fail("server_error", "The daemon stopped while this response ran.")
            else:
                final = builder.cancel()  # cancelled by the client, or the client went away
            final = await asyncio.shield(self._store_final(run, final))
            await _deliver(sink, final)
            raise
        except UpstreamError as exc:
            code = _failure_code(exc)
            final = builder.fail(_response_error_code(exc, code), exc.message, kind=code)
            final = await self._store_final(run, final)
            await sink(final)
            if not streamed:
                raise _client_error(exc, code, run.id) from exc
            return builder.response
        finally:
            if run.prepared.mcp is not None:
                await asyncio.shield(run.prepared.mcp.close())
        final = await self._store_final(run, final)
        await sink(final)
        return builder.response

    async def _rounds(self, run: ResponseRun, sink: Sink, streamed: bool) -> None:
        """One upstream reply, or, with MCP tools, the loop model -> tools -> model."""
        builder = run.builder
        prepared = run.prepared
        setup = prepared.mcp
        limits = self.config.mcp
        max_calls = min(limits.max_tool_calls, prepared.request.max_tool_calls or 1 << 30)
        max_rounds = min(limits.max_rounds, prepared.request.mcp_max_rounds or 1 << 30)
        extra: list[dict[str, Any]] = []  # messages of earlier rounds of this response
        policy = LoopPolicy(max_rounds=max_rounds, max_tool_calls=max_calls)
        if setup is not None:
            for label, tools, error in setup.to_list:
                await sink(builder.list_tools(label, tools, error))
            for request_item, target in prepared.approved:
                pending = builder.add_mcp_call(target.label, target.tool,
                                               request_item.get("arguments") or "{}",
                                               request_item["id"])  # fmt: skip
                await sink(builder.added_events(pending))
                decision = policy.decide(pending.flat_name, pending.arguments)
                await self._run_mcp(setup, pending, target, decision, policy, builder, sink)
                extra += render.render_items([pending.item], prepared.tools.names)
        forced = False
        while True:
            policy.next_round()
            first_item = len(builder.items)
            overrides = {"tool_choice": "none"} if forced else None
            if streamed:
                async for chunk in self._stream_chat(prepared, extra, overrides):
                    await sink(builder.feed(chunk))
            else:
                builder.feed_completion(await self._complete_chat(prepared, extra, overrides))
            if setup is None:
                return
            events, pending_calls = builder.finish_round()
            await sink(events)
            runnable = [p for p in pending_calls if p.call.kind == "mcp"]
            if not forced:
                # Also when the client's own tools or an approval end the loop below: the
                # MCP calls of the same turn run first. Admitted in order, run together.
                decisions = [
                    policy.decide(p.flat_name, p.arguments)
                    if policy.admit()
                    else Answered(policy.over_budget())
                    for p in runnable
                ]
                await asyncio.gather(*(
                    self._run_mcp(setup, p, setup.targets[p.flat_name], decision, policy,
                                  builder, sink)
                    for p, decision in zip(runnable, decisions, strict=True)
                ))  # fmt: skip
            waits_for_client = any(p.call.kind == "approval" for p in pending_calls) or any(
                call["status"] == "in_progress" for call in builder.function_calls()
            )
            if forced or not runnable or waits_for_client:
                return
            extra += render.render_items(builder.output[first_item:], prepared.tools.names)
            if policy.must_finish():
                log.info("tool loop limit reached after %d round(s), %d call(s): asking for "
                         "the final answer", policy.rounds, policy.calls)  # fmt: skip
                extra.append({"role": "user", "content": LIMIT_NOTE})
                forced = True
            builder.new_round()

    async def _run_mcp(
        self,
        setup: McpSetup,
        pending: PendingMcpCall,
        target: McpTarget,
        decision: Decision,
        policy: LoopPolicy,
        builder: ResponseBuilder,
        sink: Sink,
    ) -> None:
        if isinstance(decision, Answered):
            output = decision.output
        else:
            output = await run_mcp_call(setup, self.mcp, target, decision.arguments)
            policy.remember(decision, output)
        error: dict[str, Any] | None = None
        if output.is_error:
            error = (
                {"type": "mcp_tool_execution_error",
                 "content": [{"type": "text", "text": output.text}]}
                if output.kind == "tool"
                else {"type": "mcp_protocol_error", "code": -32000, "message": output.text}
            )  # fmt: skip
        await sink(builder.complete_mcp(pending, None if error else output.text, error))

    async def _run_background(self, run: ResponseRun) -> None:
        try:
            await self.execute(run, run.record)
        except Exception:
            if not run.settling:  # storage failed as it began, or a bug: it still ends
                failed = run.builder.fail("server_error", "lmbridge failed while this ran.")
                await run.record(await self._store_final(run, failed))
            raise
        finally:
            async with run.changed:
                run.finished = True
                run.changed.notify_all()
            if not run.unstored:
                self.running.pop(run.id, None)

    def _chat_body(
        self,
        prepared: Prepared,
        history: list[str],
        *,
        stream: bool,
        extra: list[dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> bytes:
        messages = render.join_message_arrays([
            dumps(prepared.system), *history,
            dumps([*prepared.new_messages, *(extra or ())]),
        ])  # fmt: skip
        settings = {**prepared.settings, **overrides} if overrides else prepared.settings
        return render.chat_body_bytes(settings, messages, stream=stream)

    async def _open_chat(
        self,
        prepared: Prepared,
        *,
        stream: bool,
        extra: list[dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> Any:
        """Send the chat request, dropping the oldest turns while the upstream says the
        context is exceeded (``truncation: "auto"`` only)."""
        history = self._fit_history(prepared)
        while True:
            body = self._chat_body(prepared, history, stream=stream, extra=extra,
                                   overrides=overrides)  # fmt: skip
            try:
                return await self.upstream.open("POST", CHAT_PATH, body=body, route=ROUTE)
            except UpstreamStatus as exc:
                if not (exc.context_overflow and prepared.request.truncation == "auto"
                        and history):  # fmt: skip
                    raise
                history = history[len(history) // 2 + (len(history) % 2) :]

    def _fit_history(self, prepared: Prepared) -> list[str]:
        history = prepared.history
        context = prepared.model.context_length
        if prepared.request.truncation != "auto" or context is None or not history:
            return history
        fixed = render.estimate_tokens(dumps(prepared.system + prepared.new_messages))
        budget = context - (prepared.request.max_output_tokens or min(1024, context // 4)) - fixed
        tokens = list(prepared.history_tokens)
        start = 0
        while start < len(history) and sum(tokens[start:]) > budget:
            start += 1
        if start:
            log.info("truncation: dropped the %d oldest turn(s) to fit %d tokens", start, context)
        return history[start:]

    async def _complete_chat(
        self,
        prepared: Prepared,
        extra: list[dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        resp = await self._open_chat(prepared, stream=False, extra=extra, overrides=overrides)
        return await chat_upstream.read_completion(self.upstream, resp)

    async def _stream_chat(
        self,
        prepared: Prepared,
        extra: list[dict[str, Any]] | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        resp = await self._open_chat(prepared, stream=True, extra=extra, overrides=overrides)
        async with contextlib.aclosing(chat_upstream.read_chunks(self.upstream, resp)) as chunks:
            async for chunk in chunks:
                yield chunk

    # --- storing ----------------------------------------------------------

    async def _store_final(self, run: ResponseRun, final: list[Event]) -> list[Event]:
        """Store the final state; the events to send once it is stored.

        A foreground response that cannot be stored fails its request (nothing of it
        was acknowledged). A background one was acknowledged as queued and is polled
        and replayed from storage, so its end must get there: a writer process that
        died is replaced by the next write (tried once more, unless it had committed);
        when storage cannot take it, the response ends failed, as storage will hold
        it once it works again."""
        run.settling = True
        if not run.request.background:
            await self._save(run, final)
            return final
        try:
            try:
                await self._save(run, final)
            except StorageError:
                if await self._stored_status(run) != run.response["status"]:
                    await self._save(run, final)
        except StorageError as exc:
            log.error("background response %s: its final state could not be stored: %s",
                      run.id, exc)  # fmt: skip
            final = await self._fail_unstored(run)
        run.settled.set()
        return final

    async def _stored_status(self, run: ResponseRun) -> str | None:
        stored = await self.store.get_response(run.id, run.prepared.owner)
        return None if stored is None else loads(stored).get("status")

    async def _fail_unstored(self, run: ResponseRun) -> list[Event]:
        """End a background response as failed, in the state storage holds it in (its
        last stored state, failed), and get that stored now or as soon as it can be."""
        body = loads(run.stored_json) if run.stored_json else run.builder.snapshot()
        body["status"] = "failed"
        body["error"] = {"code": "server_error", "message": UNSTORED}
        run.stored_json = dumps(body)
        try:
            # One small update, where the whole final state did not fit.
            await self.store.fail_unfinished(int(self.clock()), UNSTORED, response_ids=(run.id,))
        except StorageError:
            run.unstored = True
            if self._repairing is None or self._repairing.done():
                self._repairing = self.tasks.spawn(self._repair(), "store unstored responses")
        return run.builder.end_as(body)

    async def _repair(self) -> None:
        """Store the unstored responses as failed once storage works again: after any
        save that succeeds, or every ``repair_interval`` seconds."""
        while ids := tuple(r.id for r in self.running.values() if r.unstored):
            self._storage_works.clear()
            try:
                await self.store.fail_unfinished(int(self.clock()), UNSTORED, response_ids=ids)
            except StorageError:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.repair_interval):
                        await self._storage_works.wait()
                continue
            for response_id in ids:
                run = self.running.get(response_id)
                if run is not None and run.unstored:
                    run.unstored = False
                    if run.finished:  # else _run_background lets it go as it ends
                        del self.running[response_id]
            log.warning("stored %d background response(s) as failed: their final state "
                        "could not be stored", len(ids))  # fmt: skip

    async def _save(self, run: ResponseRun, pending: Sequence[Event] = ()) -> None:
        """Store the response; ``pending`` are its events not yet handed to the sink
        (they are stored with it, then sent: nothing is sent before it is durable)."""
        if not run.request.store:
            return
        large = len(run.prepared.input_items) > LARGE_INPUT
        record = await self.worker.run_if(large, partial(self._record, run, pending))
        await self.store.save_response(record)
        run.stored_json = record.body
        if self._repairing is not None:
            self._storage_works.set()

    def _record(self, run: ResponseRun, pending: Sequence[Event]) -> ResponseRecord:
        request = run.request
        response = run.builder.response
        output = response["output"]
        output_items = tuple(_stored(item) for item in output)
        turn = dumps(_turn_messages(run.prepared, output))
        finished = response["status"] not in ("queued", "in_progress")
        prepared = run.prepared
        if prepared.stored_inputs is None:  # the same at every save of a background response
            prepared.stored_inputs = tuple(_stored(item) for item in prepared.input_items)
        input_items = prepared.stored_inputs
        conversation_items: tuple[StoredItem, ...] = ()
        if request.conversation_id is not None and finished:
            conversation_items = input_items + output_items
        body = dumps(response)
        return ResponseRecord(
            id=run.id,
            owner=run.prepared.owner,
            created_at=run.created_at,
            expires_at=run.created_at + int(self.config.responses.retention),
            status=response["status"],
            body=body,
            previous_response_id=request.previous_response_id,
            conversation_id=request.conversation_id,
            background=request.background,
            input_items=input_items,
            output_items=output_items,
            turn_messages=turn,
            turn_tokens=render.estimate_tokens(turn),
            events=tuple(dumps(e) for e in [*run.events, *pending]) if request.background else (),
            conversation_items=conversation_items,
            mcp_listed=run.prepared.mcp_listed,
        )

    # --- reading ----------------------------------------------------------

    async def get(self, response_id: str, owner: str) -> str:
        run = self.running.get(response_id)
        if run is not None and run.unstored and run.prepared.owner == owner:
            assert run.stored_json is not None
            return run.stored_json
        stored = await self.store.get_response(response_id, owner)
        if stored is None:
            raise _response_not_found(response_id)
        return stored

    async def events(
        self, response_id: str, owner: str, starting_after: int | None
    ) -> AsyncIterator[Event]:
        """A stored or running response's events, after ``starting_after``."""
        stored = await self.get(response_id, owner)
        run = self.running.get(response_id)
        if run is not None and run.prepared.owner == owner:
            async for event in run.follow(starting_after):
                yield event
            return
        kept = await self.store.get_events(response_id, owner, starting_after=starting_after)
        if kept:
            for text in kept:
                yield loads(text)
            return
        body = loads(stored)
        if body.get("background") and starting_after is not None:
            # Past the last stored event: a replay still ends with the terminal event.
            terminal = TERMINAL_EVENTS.get(body.get("status", ""))
            if terminal is not None:
                yield {"type": terminal, "sequence_number": starting_after + 1, "response": body}
            return
        for event in replay_events(body):
            if starting_after is None or event["sequence_number"] > starting_after:
                yield event

    async def delete(self, response_id: str, owner: str) -> None:
        run = self.running.get(response_id)
        if run is not None and run.prepared.owner == owner:
            await _stop(run)
        if not await self.store.delete_response(response_id, owner):
            raise _response_not_found(response_id)
        if run is not None and run.unstored:
            run.unstored = False
            self.running.pop(response_id, None)

    async def cancel(self, response_id: str, owner: str) -> str:
        """Cancel a background response; the state it is left in, once stored: cancelled,
        or the final state it had reached when the cancel came."""
        run = self.running.get(response_id)
        if run is not None and run.prepared.owner == owner:
            await _stop(run)
            if run.stored_json is not None:
                return run.stored_json
        stored = await self.get(response_id, owner)
        if not loads(stored).get("background"):
            raise BadRequest(
                "Only responses created with 'background': true can be cancelled.",
                param="response_id",
            )
        return stored

    async def input_items(
        self, response_id: str, owner: str, *, after: str | None, limit: int, order: str
    ) -> dict[str, Any]:
        page = await self.store.list_input_items(
            response_id,
            owner,
            after=after,
            limit=limit,
            order=order,  # type: ignore[arg-type]
        )
        if page is None:
            raise _response_not_found(response_id)
        return list_page([loads(i.json) for i in page.items], page.has_more)

    # --- counting and compacting ------------------------------------------

    async def input_tokens(self, body: dict[str, Any], owner: str) -> int:
        """What the next turn's input would cost: the upstream tokenises the rendered
        prompt (one token generated), so the count is the upstream's own."""
        body = {**body, "stream": False, "background": False, "store": False}
        prepared = await self.prepare(await self.parse(body), owner)
        settings = {**prepared.settings, "max_tokens": 1, "temperature": 0}
        messages = render.join_message_arrays(
            [dumps(prepared.system), *self._fit_history(prepared),
             dumps(prepared.new_messages)]
        )  # fmt: skip
        resp = await self.upstream.open(
            "POST", CHAT_PATH, body=render.chat_body_bytes(settings, messages, stream=False),
            route=ROUTE,
        )  # fmt: skip
        completion = loads(await self.upstream.read_body(resp) or b"{}")
        usage = usage_from_chat(completion.get("usage") if isinstance(completion, dict) else None)
        if usage and usage["input_tokens"]:
            return int(usage["input_tokens"])
        return render.estimate_tokens(messages)

    async def compact(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        """Summarise the conversation so far into one compaction item."""
        if not body.get("model"):
            raise BadRequest("Missing required parameter: 'model'.", param="model")
        body = {**body, "stream": False, "background": False, "store": False, "tools": []}
        prepared = await self.prepare(await self.parse(body), owner)
        transcript = render.join_message_arrays(
            [*self._fit_history(prepared), dumps(prepared.new_messages)]
        )
        instruction = {
            "role": "system",
            "content": "Summarise the conversation below so that it can be continued from "
            "the summary alone: keep the user's goals, decisions, facts, names, open "
            "questions and the state of any task. Write the summary only.",
        }
        request_messages = [instruction, {"role": "user", "content": _transcript(transcript)}]
        settings = {
            k: v
            for k, v in prepared.settings.items()
            if k not in ("tools", "tool_choice", "response_format")
        }
        resp = await self.upstream.open(
            "POST", CHAT_PATH,
            body=render.chat_body_bytes(settings, dumps(request_messages), stream=False),
            route=ROUTE,
        )  # fmt: skip
        completion = loads(await self.upstream.read_body(resp))
        names = ToolNames()
        builder = ResponseBuilder({}, names, ids=self.ids, clock=self.clock)
        builder.feed_completion(completion)
        summary = "".join(
            part.get("text", "")
            for item in builder.output if item["type"] == "message"
            for part in item["content"]
        )  # fmt: skip
        return {
            "id": self.ids("cmp"),
            "object": "response.compaction",
            "created_at": int(self.clock()),
            "output": [
                {
                    "id": self.ids("cmp"),
                    "type": "compaction",
                    "encrypted_content": render.encode_compaction(summary.strip()),
                }
            ],
            "usage": builder.usage or usage_from_chat({}),
        }

    # --- lifecycle --------------------------------------------------------

    async def recover(self) -> None:
        """After a restart nothing is running: what was left unfinished has failed, and
        no turn holds a conversation."""
        count = await self.store.fail_unfinished(
            int(self.clock()), "The daemon restarted before this response finished."
        )
        if count:
            log.warning("marked %d unfinished background response(s) failed", count)
        await self.store.release_all_conversations()

    async def purge_forever(self) -> None:
        interval = self.config.responses.purge_interval
        while True:
            try:
                purged = await self.store.purge_expired(
                    int(self.clock()), retention=int(self.config.responses.retention)
                )
                if purged:
                    log.info("purged %d expired response(s) and conversation(s)", purged)
            except Exception:
                log.exception("purging expired responses failed")
            await asyncio.sleep(interval)


# Inputs and histories with more items than this are read and rendered in the worker
# thread: at about 10 µs an item, more would hold the event loop for over 10 ms.
LARGE_INPUT = 1000


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 1


def _render_stored(
    items: Sequence[StoredItem], names: ToolNames, *, images: bool
) -> tuple[str, set[str]]:
    """A conversation's stored items as one chat message array text, and the MCP servers
    they listed."""
    parsed = [loads(i.json) for i in items]
    rendered = dumps(render.render_items(parsed, names, images=images))
    listed = {i["server_label"] for i in parsed if i.get("type") == "mcp_list_tools"}
    return rendered, listed


def _turn_messages(prepared: Prepared, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of this turn: its input, then its output. After a user, system
    or developer message nothing of the input can merge with the output (an assistant
    message takes the calls after it), so the input's rendering from ``prepare`` is
    reused; otherwise both are rendered together."""
    images = prepared.model.vision is not False
    inputs = prepared.input_items
    last = inputs[-1] if inputs else None
    if last is not None and last.get("type") == "message" and last.get("role") != "assistant":
        output_messages = render.render_items(output, prepared.tools.names, images=images)
        return [*prepared.new_messages, *output_messages]
    return render.render_items([*inputs, *output], prepared.tools.names, images=images)


def _stored(item: dict[str, Any]) -> StoredItem:
    return StoredItem(item["id"], dumps(item))


def _transcript(messages_json: str) -> str:
    lines = []
    for message in loads(messages_json):
        content = message.get("content")
        if isinstance(content, list):
            content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        if message.get("tool_calls"):
            calls = ", ".join(
                f"{c['function']['name']}({c['function']['arguments']})"
                for c in message["tool_calls"]
            )
            content = f"{content or ''} [called {calls}]".strip()
        lines.append(f"{message.get('role')}: {content or ''}")
    return "\n".join(lines)


def _failure_code(exc: UpstreamError) -> str:
    if isinstance(exc, UpstreamStatus) and exc.context_overflow:
        return "context_length_exceeded"
    return exc.code or "upstream_error"


def _response_error_code(exc: UpstreamError, code: str) -> str:
    """The Response's ``error.code``: one of the API's codes (the SDK's models accept no
    other); lmbridge's own, finer code goes in ``error.type``. The context error keeps
    its well-known code, which clients test for."""
    if code == "context_length_exceeded":
        return code
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        return "rate_limit_exceeded" if exc.status == 429 else "invalid_prompt"
    return "server_error"


def _client_error(exc: UpstreamError, code: str, response_id: str) -> LMBridgeError:
    """What a non-streamed create answers when the upstream failed: the request's own
    fault (context too long) is a 400, anything else keeps the upstream's status."""
    note = f" (response {response_id} was stored with status 'failed')"
    if code == "context_length_exceeded":
        return BadRequest(exc.message + note, param="input", code=code)
    if isinstance(exc, UpstreamStatus) and exc.status < 500:
        return BadRequest(exc.message + note, code=code)
    exc.extend_message(note)
    return exc


def _response_not_found(response_id: str) -> NotFound:
    return NotFound(f"Response with id '{response_id}' not found.", param="response_id")


async def _stop(run: ResponseRun) -> None:
    """Cancel a background run unless its final state is decided; wait until it is stored."""
    run.cancel_requested = True
    if not run.settling and run.started and run.task is not None:
        run.task.cancel()
    await run.settled.wait()


async def _deliver(sink: Sink, events: list[Event]) -> None:
    """Best effort for the last events of a cancelled run (the client may be gone)."""
    with contextlib.suppress(Exception):
        await asyncio.shield(sink(events))


def normalize_conversation_items(items: Any, ids: Callable[[str], str]) -> list[dict[str, Any]]:
    if not isinstance(items, list):
        raise BadRequest("'items' must be an array of items.", param="items")
    if len(items) > 20:
        raise BadRequest("At most 20 items can be added at a time.", param="items")
    return [normalize_item(item, f"items[{i}]", ids) for i, item in enumerate(items)]
