"""The Responses service: one function per endpoint, the data flow top to bottom.

create: validate -> resolve the model -> load the chain or conversation ->
render to a chat request -> upstream (streamed or not) -> ResponseBuilder ->
store -> respond. The transport is not known here: ``execute`` hands events to
a sink (an SSE writer, a background response's event log, or nothing), so the
WebSocket mode can reuse it as it is.

Beside it, each in a module of its own: the run and its readers (``runs``), one turn
at a time per conversation (``claims``), the turn sent upstream and fitted to the
context (``upstream_turn``), storing and the durability rules (``recorder``), and
what a failure becomes (``failures``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from typing import Any, Literal

from proxy.chat_output import ChatOutput, function_names, mcp_text_calls, output_for
from proxy.config import Config
from proxy.errors import BadRequest
from proxy.ids import new_id
from proxy.jsontext import dumps, loads
from proxy.lifecycle import request_ttl
from proxy.mcp.servers import MCPServers
from proxy.metrics import Metrics
from proxy.profiles import with_switches
from proxy.responses import compaction, render
from proxy.responses.builder import ResponseBuilder
from proxy.responses.claims import ConversationClaims
from proxy.responses.failures import (
    TURN_FAILURES,
    client_error,
    failure_code,
    response_error_code,
    response_not_found,
)
from proxy.responses.input_items import check_call_outputs
from proxy.responses.mcp_tools import setup_mcp
from proxy.responses.objects import list_page, response_object
from proxy.responses.output_items import FIRST_TOKEN_EVENTS, TERMINAL_EVENTS, Event
from proxy.responses.recorder import LARGE_INPUT, ResponseRecorder
from proxy.responses.replay import replay_events
from proxy.responses.request import CreateRequest, parse_create
from proxy.responses.runs import Prepared, ResponseRun, Sink, deliver, discard, still_running, stop
from proxy.responses.state import History, approvals, load_history, resolve_references
from proxy.responses.tool_rounds import ResponseRounds
from proxy.responses.upstream_turn import (
    CHAT_PATH,
    ROUTE,
    fit_history,
)
from proxy.structured import plan_answer
from proxy.tasks import BackgroundTasks, WorkerThread
from proxy.upstreams import UpstreamPool
from proxy.usage import usage_from_chat
from proxy.usage_recorder import UsageRecorder
from storage.records import ResponseStore

log = logging.getLogger("lmbridge.responses")


class ResponsesService:
    def __init__(
        self,
        config: Config,
        store: ResponseStore,
        upstreams: UpstreamPool,
        tasks: BackgroundTasks,
        mcp: MCPServers,
        worker: WorkerThread,
        *,
        usage: UsageRecorder | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.time,
        ids: Callable[[str], str] = new_id,
    ) -> None:
        self.config = config
        self.store = store
        self.upstreams = upstreams
        self.catalog = upstreams.catalog
        self.tasks = tasks
        self.clock = clock
        self.ids = ids
        # Background runs not yet stored in their final state: running, or unstored.
        self.running: dict[str, ResponseRun] = {}
        self.mcp = mcp
        # Priorities are the same on every upstream; the first's queues answer them.
        self.queues = upstreams.first.queues
        self.usage = usage
        self.rounds = ResponseRounds(mcp, config.mcp, metrics)
        self.claims = ConversationClaims(store, tasks, lambda: self.clock())
        self.worker = worker
        self.recorder = ResponseRecorder(
            store,
            worker,
            tasks,
            self.running,
            retention=int(config.responses.retention),
            clock=lambda: self.clock(),
        )

    # --- create -----------------------------------------------------------

    async def parse(self, body: dict[str, Any]) -> CreateRequest:
        def parse() -> CreateRequest:
            limit = self.config.responses.max_input_items
            return parse_create(body, self.ids, max_input_items=limit)

        return await self.worker.run_if(_count(body.get("input")) > LARGE_INPUT, parse)

    async def create(
        self, body: dict[str, Any], owner: str, *, history: History | None = None
    ) -> ResponseRun:
        """A response to ``body``, prepared (state loaded, the turn rendered), not yet
        run. ``history``: what ``previous_response_id`` continues, when the caller holds
        it (a WebSocket connection keeps its latest responses), instead of storage's."""
        ttl = request_ttl(body)  # LM Studio's ttl, Ollama's keep_alive: the model's idle time
        request = await self.parse(body)
        response_id = self.ids("resp")
        # Before its items are read: the turn sees every turn before it.
        turn = await self.claims.claim(request.conversation_id, request.store, owner, response_id)
        try:
            run = await self._create(request, owner, response_id, history)
        except BaseException:
            if turn is not None:
                await asyncio.shield(self.claims.release(turn))
            raise
        run.turn = turn
        if ttl is not None and (loader := self.queues.loader()) is not None:
            loader.set_ttl(run.prepared.model.id, ttl)
        if request.background:
            self.running[run.id] = run
            run.task = self.tasks.spawn(self._run_background(run), f"response {run.id}")
            run.task.add_done_callback(lambda _: run.settled.set())  # whatever happened
        return run

    async def _create(
        self, request: CreateRequest, owner: str, response_id: str, history: History | None
    ) -> ResponseRun:
        prepared = await self.prepare(request, owner, history)
        nothing = not (prepared.system or prepared.new_messages or prepared.approved)
        if nothing and request.generate and all(turn == "[]" for turn in prepared.history):
            # Upstreams answer an empty message list with an error of their own, or worse.
            raise BadRequest(
                "There is nothing to answer: send 'input' (a string or an array of items), "
                "'instructions', or continue with 'previous_response_id' or 'conversation'.",
                param="input",
            )
        priority = self.queues.priority(owner, background=request.background)
        if request.generate:
            # A full queue refuses now, as a plain 429, before a stream opens or a
            # background response is acknowledged.
            self.upstreams.check_room(prepared.model)
        created_at = int(self.clock())
        response = response_object(
            request, response_id=response_id, model=prepared.model.id, created_at=created_at
        )
        builder = ResponseBuilder(
            response,
            prepared.tools.names,
            ids=self.ids,
            max_tool_calls=request.max_tool_calls,
            clock=self.clock,
            emit=request.stream or request.background,
            kept=request.background,
            mcp=prepared.mcp.targets if prepared.mcp is not None else None,
            output=self.reading(prepared),
        )
        run = ResponseRun(
            response_id,
            prepared,
            builder,
            created_at,
            route=self.upstreams.route(prepared.model, priority),
        )
        if request.background:
            await run.record(builder.start(queued=True))
            await self.recorder.save(run)  # acknowledged as queued only once it is durable
        return run

    def reading(self, prepared: Prepared) -> ChatOutput:
        """What is read out of the answer (text calls to function and MCP tools, tags)."""
        switches = prepared.request.switches
        output = output_for(prepared.tools.tools, prepared.profile)
        setup = prepared.mcp
        if setup is None or not mcp_text_calls(
            prepared.profile.text_tool_calls, self.config.mcp.text_tool_calls, switches
        ):
            return output
        return replace(output, offered=output.offered | function_names(setup.chat_tools))

    async def prepare(
        self, request: CreateRequest, owner: str, history: History | None = None
    ) -> Prepared:
        model = await self.catalog.resolve(request.model, "chat")
        profile = with_switches(self.catalog.profile(model), request.switches)
        tools = render.convert_tools(
            request, reject_unsupported=self.config.responses.unsupported_tools == "reject"
        )
        if history is None:
            history = await load_history(
                self.store,
                self.worker,
                request,
                owner,
                tools.names,
                images=model.vision is not False,
                reasoning=profile.keeps_reasoning,
                max_items=self.config.responses.max_history_items,
            )
        listed_before = history.listed
        input_items = await resolve_references(self.store, request.input, owner)
        check_call_outputs(input_items, history.turns)
        # A client that re-sends the whole history (no previous_response_id) sends the
        # listings too: those servers are listed already.
        listed_before |= {
            i["server_label"]
            for i in input_items
            if i.get("type") == "mcp_list_tools" and "server_label" in i
        }
        settings = render.chat_settings(request, model.id, tools)
        listed = self.catalog.cached
        lmstudio = listed is not None and listed.dialect != "openai"
        schema = plan_answer(settings, lmstudio=lmstudio, param="text.format")
        setup = None
        if any(tool.get("type") == "mcp" for tool in request.tools):
            setup = await setup_mcp(
                request.tools,
                request.tool_choice,
                self.mcp,
                self.config.mcp,
                listed_before,
                self.config.storage.path.parent,
            )
        try:
            approved = await approvals(self.store, input_items, owner, setup)
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
            history=history.turns,
            history_tokens=history.tokens,
            input_items=input_items,
            new_messages=await self.worker.run_if(
                len(input_items) > LARGE_INPUT,
                partial(
                    render.render_items,
                    input_items,
                    tools.names,
                    images=model.vision is not False,
                    reasoning=profile.keeps_reasoning,
                ),
            ),
            owner=owner,
            profile=profile,
            mcp=setup,
            approved=approved,
            mcp_listed=setup.listed if setup is not None else tuple(sorted(listed_before)),
            schema=schema,
            schema_retry=bool(self.config.models.settings_for(model.id).schema_retry)
            and request.switches.get("schema_retry", True),
        )

    # --- running ----------------------------------------------------------

    async def execute(self, run: ResponseRun, sink: Sink = discard) -> dict[str, Any]:
        """Produce the response, handing events to ``sink``; store it; return it.

        Foreground requests run this in their handler; when the client goes away
        the task is cancelled and the partial response is stored as cancelled.
        """
        started = time.perf_counter()
        first: list[float] = []

        async def timed(events: list[Event]) -> None:
            if not first and any(e.get("type") in FIRST_TOKEN_EVENTS for e in events):
                first.append(time.perf_counter() - started)
            await sink(events)

        try:
            return await self._execute(run, timed)
        finally:
            if run.turn is not None:
                await asyncio.shield(self.claims.release(run.turn))
            if self.usage is not None and run.request.generate:
                self.usage.response_ended(
                    run.builder.response,
                    owner=run.prepared.owner,
                    model=run.prepared.model.id,
                    seconds=time.perf_counter() - started,
                    ttft=first[0] if first else None,
                    upstream=run.route.upstream_name,
                )

    async def _execute(self, run: ResponseRun, sink: Sink) -> dict[str, Any]:
        builder = run.builder
        request = run.request
        streamed = request.stream or request.background
        run.started = True
        try:
            if not request.background:
                await sink(builder.start())
                if streamed:  # kept alive while its model loads
                    run.route.keepalive = partial(still_running, builder, sink)
            else:
                if run.cancel_requested:  # cancelled before it ran
                    raise asyncio.CancelledError
                # Queued until it holds a slot of its model.
                run.route.on_admitted = partial(self._running, run, sink)
            if request.generate:
                await self.rounds.run(run, sink, streamed)
            await run.route.admitted()  # a turn that called no model ran all the same
            final = builder.finish()
        except asyncio.CancelledError:
            if request.background and not run.cancel_requested:
                final = builder.fail("server_error", "The daemon stopped while this response ran.")
            else:
                final = builder.cancel()  # cancelled by the client, or the client went away
            final = await asyncio.shield(self.recorder.store_final(run, final))
            await deliver(sink, final)
            raise
        except TURN_FAILURES as exc:
            code = failure_code(exc)
            final = builder.fail(response_error_code(exc, code), exc.message, kind=code)
            final = await self.recorder.store_final(run, final)
            await sink(final)
            if not streamed:
                raise client_error(exc, code, run.id) from exc
            return builder.response
        finally:
            if run.prepared.mcp is not None:
                await asyncio.shield(run.prepared.mcp.close())
        final = await self.recorder.store_final(run, final)
        await sink(final)
        return builder.response

    async def _running(self, run: ResponseRun, sink: Sink) -> None:
        await sink(run.builder.in_progress())
        await self.recorder.save(run)

    async def _run_background(self, run: ResponseRun) -> None:
        try:
            await self.execute(run, run.record)
        except Exception:
            if not run.settling:  # storage failed as it began, or a bug: it still ends
                failed = run.builder.fail("server_error", "lmbridge failed while this ran.")
                await run.record(await self.recorder.store_final(run, failed))
            raise
        finally:
            async with run.changed:
                run.finished = True
                run.changed.notify_all()
            if not run.unstored:
                self.running.pop(run.id, None)

    # --- storing ----------------------------------------------------------

    # --- reading ----------------------------------------------------------

    async def get(self, response_id: str, owner: str) -> str:
        run = self.running.get(response_id)
        if run is not None and run.unstored and run.prepared.owner == owner:
            assert run.stored_json is not None
            return run.stored_json
        stored = await self.store.get_response(response_id, owner)
        if stored is None:
            raise response_not_found(response_id)
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
            await stop(run)
        if not await self.store.delete_response(response_id, owner):
            raise response_not_found(response_id)
        if run is not None and run.unstored:
            run.unstored = False
            self.running.pop(response_id, None)

    async def cancel(self, response_id: str, owner: str) -> str:
        """Cancel a background response; the state it is left in, once stored: cancelled,
        or the final state it had reached when the cancel came."""
        run = self.running.get(response_id)
        if run is not None and run.prepared.owner == owner:
            await stop(run)
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
        self,
        response_id: str,
        owner: str,
        *,
        after: str | None,
        limit: int,
        order: Literal["asc", "desc"],
    ) -> dict[str, Any]:
        page = await self.store.list_input_items(
            response_id, owner, after=after, limit=limit, order=order
        )
        if page is None:
            raise response_not_found(response_id)
        return list_page([loads(i.json) for i in page.items], page.has_more)

    # --- counting and compacting ------------------------------------------

    async def input_tokens(self, body: dict[str, Any], owner: str) -> int:
        """What the next turn's input would cost: the upstream tokenises the rendered
        prompt (one token generated), so the count is the upstream's own."""
        body = {**body, "stream": False, "background": False, "store": False}
        prepared = await self.prepare(await self.parse(body), owner)
        settings = {**prepared.settings, "max_tokens": 1, "temperature": 0}
        messages = render.join_message_arrays(
            [dumps(prepared.system), *fit_history(prepared), dumps(prepared.new_messages)]
        )
        async with self.upstreams.route(prepared.model, self.queues.priority(owner)) as route:
            resp = await route.open(
                "POST",
                CHAT_PATH,
                body=render.chat_body_bytes(settings, messages, stream=False),
                route=ROUTE,
            )
            completion = loads(await route.read_body(resp) or b"{}")
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
        async with self.upstreams.route(prepared.model, self.queues.priority(owner)) as route:
            resp = await route.open(
                "POST", CHAT_PATH, body=compaction.request_body(prepared), route=ROUTE
            )
            completion = loads(await route.read_body(resp))
        return compaction.compaction_object(completion, ids=self.ids, clock=self.clock)

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


def _count(value: Any) -> int:
    return len(value) if isinstance(value, list) else 1
