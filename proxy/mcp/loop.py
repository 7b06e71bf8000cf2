"""The tool loop on chat completions: model -> MCP tools -> model, until an answer.

After each upstream reply the MCP calls it holds run (in parallel), their results
go back as ``tool`` messages with the real call ids, and the upstream is asked
again, until a reply holds no MCP call. Bounded by ``mcp.max_rounds`` and
``mcp.max_tool_calls``: at the limit, one last call with ``tool_choice: "none"``
asks for the answer. A call identical to an earlier one (same tool, same
arguments) gets the earlier result with a note instead of running again. Calls to
the client's own tools end the loop and go back to the client (after the MCP calls
of the same turn ran). Usage is summed over all rounds.

The transport is a parameter: ``emit`` receives the chunks a streaming client should
see (content of every round as it arrives, one finish_reason, one usage chunk);
without it the loop returns one chat completion.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from proxy.mcp.names import ToolDirectory, ToolRef
from proxy.mcp.policy import LIMIT_NOTE, Answered, LoopPolicy
from proxy.mcp.results import ToolOutput, error_output
from proxy.mcp.rounds import Call, Round
from proxy.profiles import ModelProfile
from proxy.tool_prompt import describe_tools
from proxy.usage import add_usage, chat_usage

log = logging.getLogger("lmbridge.mcp")

# Runs one MCP call: (server, tool, arguments) -> the model's view of the result.
CallTool = Callable[[ToolRef, dict[str, Any]], Awaitable[ToolOutput]]
# One upstream chat call: streamed chunks (dicts) of the reply. Closed when the loop
# stops reading it (which releases what the call holds: the connection, the slot).
StreamChat = Callable[[dict[str, Any]], AsyncGenerator[dict[str, Any], None]]
# One upstream chat call, not streamed: the completion.
CompleteChat = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
Emit = Callable[[list[dict[str, Any]]], Awaitable[None]]


@dataclass
class ToolTrace:
    """One MCP call as it ran: for logs, metrics, the Responses items, delegate's trace."""

    call_id: str
    ref: ToolRef | None  # None: the model named a tool that does not exist
    name: str
    arguments: str
    output: ToolOutput
    seconds: float
    repeated: bool = False


@dataclass
class LoopResult:
    completion: dict[str, Any]  # the final chat completion (usage summed)
    traces: list[ToolTrace] = field(default_factory=list)
    rounds: int = 0
    messages: list[dict[str, Any]] = field(default_factory=list)  # the whole conversation
    # The last round called MCP tools beside the client's: its MCP calls ran and their
    # results end ``messages``, but the client is handed only its own calls.
    ended_mid_round: bool = False


class ToolLoop:
    def __init__(
        self,
        directory: ToolDirectory,
        call_tool: CallTool,
        *,
        max_rounds: int,
        max_tool_calls: int,
        text_tool_calls: bool = False,
        images: bool = False,
        client_tools: Collection[str] | None = None,
        keep_reasoning: bool = False,
        describe_tools: bool = False,
        profile: ModelProfile | None = None,
    ) -> None:
        # keep_reasoning: each round's reasoning goes back upstream with its calls;
        # describe_tools: the template cannot render tools, so each round's request
        # describes them in the system message (tool_prompt) and the calls are text.
        self.keep_reasoning = keep_reasoning
        self.describe_tools = describe_tools
        # What each round's content is read for: thinking tags, how long a call is held.
        self.profile = profile
        self.directory = directory
        self.client_tools = client_tools
        self.call_tool = call_tool
        self.max_rounds = max_rounds
        self.max_tool_calls = max_tool_calls
        self.text_tool_calls = text_tool_calls
        self.images = images
        self.traces: list[ToolTrace] = []
        self.policy = LoopPolicy(max_rounds=max_rounds, max_tool_calls=max_tool_calls)

    async def run(
        self,
        body: dict[str, Any],
        *,
        complete: CompleteChat | None = None,
        stream: StreamChat | None = None,
        emit: Emit | None = None,
    ) -> LoopResult:
        messages = list(body["messages"])
        usage: dict[str, Any] | None = None
        stream_id: str | None = None
        last: Round | None = None
        policy = self.policy
        forced_final = False
        ended_mid_round = False
        while True:
            policy.next_round()
            rounds = policy.rounds
            request = {**body, "messages": messages}
            if forced_final:
                request["tool_choice"] = "none"
            if self.describe_tools:
                describe_tools(request)
            reply = Round(
                self.directory,
                stream_id=stream_id,
                client_tools=self.client_tools,
                text_tool_calls=self.text_tool_calls,
                number=rounds,
                profile=self.profile,
            )
            if stream is not None:
                async with contextlib.aclosing(stream(request)) as chunks:
                    async for chunk in chunks:
                        relayed = reply.feed(chunk)
                        if stream_id is None and reply.first_id:
                            stream_id = reply.stream_id = reply.first_id
                            for out in relayed:
                                out["id"] = stream_id
                        if relayed and emit is not None:
                            await emit(relayed)
                tail = reply.end_of_stream()
                if tail and emit is not None:
                    await emit(tail)
            else:
                assert complete is not None
                reply.feed_completion(await complete(request))
            reply.finish()
            usage = add_usage(usage, reply.usage)
            last = reply
            calls = reply.mcp_calls
            if not calls or forced_final:
                break
            messages.append(
                reply.assistant_message(include_client_calls=False, reasoning=self.keep_reasoning)
            )
            outputs = await self._run_calls(calls)
            images: list[dict[str, Any]] = []
            for call, output in zip(calls, outputs, strict=True):
                messages.append({"role": "tool", "tool_call_id": call.id, "content": output.text})
                image_message = output.image_message(call.name) if self.images else None
                if image_message is not None:
                    images.append(image_message)
            messages += images
            if reply.client_calls:
                ended_mid_round = True
                break  # the client's tools: its turn now (MCP calls of this turn are done)
            if policy.must_finish():
                log.info(
                    "tool loop limit reached after %d round(s), %d call(s): asking for the"
                    " final answer",
                    rounds,
                    policy.calls,
                )
                messages.append({"role": "user", "content": LIMIT_NOTE})
                forced_final = True
        assert last is not None
        completion = self._final_completion(last, usage, body)
        return LoopResult(completion, self.traces, rounds, messages, ended_mid_round)

    async def _run_calls(self, calls: Sequence[Call]) -> list[ToolOutput]:
        # Admitted in call order, run together.
        runs = [self._run_one(call) if self.policy.admit() else self._skipped() for call in calls]
        return list(await asyncio.gather(*runs))

    def _unknown(self, name: str) -> ToolOutput:
        names = sorted({*self.directory.by_name, *(self.client_tools or ())})
        return error_output(
            f"there is no tool named {name!r}; the tools you can call are: "
            + (", ".join(names) or "none")
        )

    async def _skipped(self) -> ToolOutput:
        return self.policy.over_budget()

    async def _run_one(self, call: Call) -> ToolOutput:
        ref = self.directory.route(call.name)
        started = time.perf_counter()
        repeated = False
        if ref is None:
            output = self._unknown(call.name)
        else:
            decision = self.policy.decide(call.name, call.arguments_text)
            if isinstance(decision, Answered):
                output, repeated = decision.output, decision.repeated
            else:
                output = await self.call_tool(ref, decision.arguments)
                self.policy.remember(decision, output)
        self.traces.append(
            ToolTrace(
                call.id,
                ref,
                call.name,
                call.arguments_text,
                output,
                time.perf_counter() - started,
                repeated,
            )
        )
        return output

    def _final_completion(
        self, last: Round, usage: dict[str, Any] | None, body: dict[str, Any]
    ) -> dict[str, Any]:
        message = last.assistant_message(include_client_calls=True)
        message["tool_calls"] = [c.as_chat() for c in last.client_calls]
        if not message["tool_calls"]:
            del message["tool_calls"]
        reasoning = "".join(last.reasoning)
        if reasoning:
            message["reasoning_content"] = reasoning
        finish = (
            "tool_calls"
            if last.client_calls
            else (last.finish_reason if last.finish_reason not in (None, "tool_calls") else "stop")
        )
        completion: dict[str, Any] = {
            "id": last.first_id or "chatcmpl-lmbridge",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
        }
        if usage is not None:
            completion["usage"] = chat_usage(usage)
        return completion

    @staticmethod
    def closing_chunks(
        result: LoopResult, stream_id: str, model: Any, include_usage: bool
    ) -> list[dict[str, Any]]:
        """What ends a streamed loop: one finish_reason, then the summed usage if asked."""
        choice = result.completion["choices"][0]
        base = {
            "id": stream_id,
            "object": "chat.completion.chunk",
            "created": result.completion["created"],
            "model": model,
        }
        chunks = [
            {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]}],
            }
        ]
        if include_usage and "usage" in result.completion:
            chunks.append({**base, "choices": [], "usage": result.completion["usage"]})
        return chunks
