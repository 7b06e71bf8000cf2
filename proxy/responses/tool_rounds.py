"""The rounds of one response: one upstream reply, or, with ``mcp`` tools, the loop
model -> tools -> model under the rules of ``proxy.mcp.policy`` (the same as chat
completions'), each step handed to the builder, whose events go to the sink."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from proxy.chat_output import normalise_completion
from proxy.config import MCPConfig
from proxy.errors import SchemaMismatch
from proxy.mcp.policy import LIMIT_NOTE, Answered, Decision, LoopPolicy
from proxy.mcp.servers import MCPServers
from proxy.metrics import Metrics
from proxy.responses import render
from proxy.responses.builder import ResponseBuilder
from proxy.responses.mcp_items import McpTarget, PendingMcpCall
from proxy.responses.mcp_tools import McpSetup, run_mcp_call
from proxy.responses.runs import ResponseRun, Sink
from proxy.responses.upstream_turn import complete_chat, stream_chat
from proxy.structured import Outcome, feedback, first_message, summed_usage

log = logging.getLogger("lmbridge.responses")


class ResponseRounds:
    def __init__(
        self,
        mcp: MCPServers,
        limits: MCPConfig,
        metrics: Metrics | None = None,
    ) -> None:
        self.mcp = mcp
        self.limits = limits
        self.metrics = metrics

    async def run(self, run: ResponseRun, sink: Sink, streamed: bool) -> None:
        """One upstream reply, or, with MCP tools, the loop model -> tools -> model."""
        builder = run.builder
        prepared = run.prepared
        setup = prepared.mcp
        limits = self.limits
        max_calls = min(limits.max_tool_calls, prepared.request.max_tool_calls or 1 << 30)
        max_rounds = min(limits.max_rounds, prepared.request.mcp_max_rounds or 1 << 30)
        extra: list[dict[str, Any]] = []  # messages of earlier rounds of this response
        keep = prepared.profile.keeps_reasoning
        policy = LoopPolicy(max_rounds=max_rounds, max_tool_calls=max_calls)
        if setup is not None:
            for label, tools, error in setup.to_list:
                await sink(builder.list_tools(label, tools, error))
            for request_item, target in prepared.approved:
                pending = builder.add_mcp_call(
                    target.label,
                    target.tool,
                    request_item.get("arguments") or "{}",
                    request_item["id"],
                )
                await sink(builder.added_events(pending))
                decision = policy.decide(pending.flat_name, pending.arguments)
                await self._run_mcp(setup, pending, target, decision, policy, builder, sink)
                extra += render.render_items([pending.item], prepared.tools.names, reasoning=keep)
        forced = False
        while True:
            policy.next_round()
            first_item = len(builder.items)
            overrides = {"tool_choice": "none"} if forced else None
            if prepared.schema is not None:
                await self._answer_in_json(run, sink, streamed, extra, overrides)
            else:
                await self._answer(run, sink, streamed, extra, overrides)
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
                await asyncio.gather(
                    *(
                        self._run_mcp(
                            setup, p, setup.targets[p.flat_name], decision, policy, builder, sink
                        )
                        for p, decision in zip(runnable, decisions, strict=True)
                    )
                )
            waits_for_client = any(p.call.kind == "approval" for p in pending_calls) or any(
                call["status"] == "in_progress" for call in builder.function_calls()
            )
            if forced or not runnable or waits_for_client:
                return
            extra += render.render_items(
                builder.output[first_item:], prepared.tools.names, reasoning=keep
            )
            if policy.must_finish():
                log.info(
                    "tool loop limit reached after %d round(s), %d call(s): asking for "
                    "the final answer",
                    policy.rounds,
                    policy.calls,
                )
                extra.append({"role": "user", "content": LIMIT_NOTE})
                forced = True
            builder.new_round()

    async def _answer(
        self,
        run: ResponseRun,
        sink: Sink,
        streamed: bool,
        extra: list[dict[str, Any]],
        overrides: dict[str, Any] | None,
    ) -> None:
        """One model call, its reply fed to the builder as it comes."""
        builder = run.builder
        # A slot of the model for this call only: none is held while tools run.
        async with run.route:
            if streamed:
                chunks = stream_chat(run.route, run.prepared, extra, overrides)
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        await sink(builder.feed(chunk))
            else:
                builder.feed_completion(
                    await complete_chat(run.route, run.prepared, extra, overrides)
                )

    async def _answer_in_json(
        self,
        run: ResponseRun,
        sink: Sink,
        streamed: bool,
        extra: list[dict[str, Any]],
        overrides: dict[str, Any] | None,
    ) -> None:
        """A reply asked for in JSON: read whole (streamed too: a text cannot be taken
        back once sent), checked against the schema, asked for once more with the errors
        when it does not validate; only the final reply reaches the builder. Raises
        SchemaMismatch when that one does not validate either (the turn fails)."""
        prepared = run.prepared
        schema = prepared.schema
        assert schema is not None
        builder = run.builder
        async with run.route:
            completion = await complete_chat(run.route, prepared, extra, overrides)
        normalise_completion(completion, builder.reading)
        message = first_message(completion)
        if message is None or message.get("tool_calls"):
            await self._feed(run, sink, streamed, completion)  # a call, not an answer
            return
        verdict = schema.check(message.get("content"))
        outcome: Outcome = "valid" if verdict.valid else "invalid"
        if not verdict.valid and prepared.schema_retry:
            log.info(
                "response %s: the answer did not match the schema (%d error(s)); asking once more",
                run.id,
                len(verdict.errors),
            )
            asked = [*extra, *feedback(message.get("content"), verdict)]
            async with run.route:
                again = await complete_chat(run.route, prepared, asked, overrides)
            normalise_completion(again, builder.reading)
            again["usage"] = summed_usage(completion.get("usage"), again.get("usage"))
            completion, message = again, first_message(again)
            verdict = schema.check(message.get("content") if message is not None else None)
            if not verdict.valid:
                self._count(run, "invalid")
                raise SchemaMismatch(
                    "The model's answer did not match the JSON schema of text.format, also "
                    f"when asked again with the errors: {verdict.summary()}",
                    param="text.format",
                )
            outcome = "valid_after_retry"
        self._count(run, outcome)
        if message is not None and verdict.text is not None:
            message["content"] = verdict.text
        await self._feed(run, sink, streamed, completion)

    @staticmethod
    async def _feed(
        run: ResponseRun, sink: Sink, streamed: bool, completion: dict[str, Any]
    ) -> None:
        events = run.builder.feed_completion(completion)
        if streamed:
            await sink(events)

    def _count(self, run: ResponseRun, outcome: Outcome) -> None:
        run.schema_outcome = "invalid" if outcome == "invalid" else "valid"
        if self.metrics is not None:
            self.metrics.schema_answers.labels(run.prepared.model.id, outcome).inc()

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
                {
                    "type": "mcp_tool_execution_error",
                    "content": [{"type": "text", "text": output.text}],
                }
                if output.kind == "tool"
                else {"type": "mcp_protocol_error", "code": -32000, "message": output.text}
            )
        await sink(builder.complete_mcp(pending, None if error else output.text, error))
