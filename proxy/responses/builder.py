"""Chat completion output -> Responses output items, events and the Response object.

``ResponseBuilder`` is a small state machine: ``feed(chunk)`` takes one chat
completion chunk (a non-streamed completion is fed as one chunk) and returns
the Responses streaming events it completes; ``finish()`` closes what is open
and returns the final events. It does no I/O; the service writes the events
and stores the result. Event order follows OpenAI's: an item is announced
(``output_item.added``) before its first delta and closed (``...done``) before
the next item of another kind begins; one ``sequence_number`` counter from 0.

Upstream quirks absorbed here: tool-call deltas that repeat ``id`` and
``name`` every time, no usage chunk, no ``finish_reason``, reasoning sent as
``reasoning_content`` (llama.cpp, LM Studio) or ``reasoning`` (vLLM, Ollama).

What local models write (``output``, a ``ChatOutput``): thinking in tags at the start of
the content becomes a reasoning item, tool calls written as text become function calls
(or MCP calls), each message's content read delta by delta by ``proxy/model_output``;
text released unchanged. What the upstream separated itself is left alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from proxy.chat_output import ChatOutput, MessageReader, Part, Reasoning
from proxy.ids import new_id
from proxy.responses.mcp_items import McpItems, McpTarget, PendingMcpCall
from proxy.responses.output_items import CallItem, Event, Item
from proxy.responses.render import ToolNames
from proxy.tool_deltas import arguments_piece, delta_index, merge_name
from proxy.usage import add_usage, usage_from_chat

# Calls read from the text are numbered apart from the upstream's own (0, 1, ...).
_TEXT_CALLS = 1 << 20


class ResponseBuilder(McpItems):
    def __init__(
        self,
        response: dict[str, Any],
        names: ToolNames,
        *,
        ids: Callable[[str], str] = new_id,
        max_tool_calls: int | None = None,
        clock: Callable[[], float] = time.time,
        emit: bool = True,
        kept: bool = True,
        mcp: Mapping[str, McpTarget] | None = None,
        output: ChatOutput | None = None,
    ) -> None:
        super().__init__(response, ids=ids, clock=clock, emit=emit, kept=kept)
        self.names = names
        self._max_tool_calls = max_tool_calls
        self._text: Item | None = None
        self._reasoning: Item | None = None
        self._calls: dict[int, CallItem] = {}
        self._dropped_calls: set[int] = set()
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.mcp = mcp or {}
        self._earlier_usage: dict[str, Any] | None = None  # of the rounds before this one
        self.reading = output or ChatOutput()
        self._reader = MessageReader(self.reading)  # each round's reply is one message
        self._text_calls = 0

    def start(self, *, queued: bool = False) -> list[Event]:
        """``response.created`` then ``response.queued`` or ``response.in_progress``."""
        self.response["status"] = "queued" if queued else "in_progress"
        events = [self._event("response.created", response=self.snapshot())]
        kind = "response.queued" if queued else "response.in_progress"
        events.append(self._event(kind, response=self.snapshot()))
        return events

    def in_progress(self) -> list[Event]:
        """A queued background response starts running."""
        self.response["status"] = "in_progress"
        return [self._event("response.in_progress", response=self.snapshot())]

    # --- input ------------------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        events: list[Event] = []
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            self.usage = add_usage(self._earlier_usage, usage_from_chat(usage))
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return events
        choice = choices[0]
        if not isinstance(choice, dict):
            return events
        delta: dict[str, Any] = {}
        for key in ("delta", "message"):  # a chunk has a delta, a completion a message
            if isinstance(choice.get(key), dict):
                delta = choice[key]
                break
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            events += self._parts(self._reader.separated_reasoning())
            events += self._reasoning_delta(reasoning)
        tool_calls = delta.get("tool_calls")
        if tool_calls:
            events += self._parts(self._reader.separated_calls())
        content = delta.get("content")
        if isinstance(content, str) and content:
            events += self._parts(self._reader.content(content))
        refusal = delta.get("refusal")
        if isinstance(refusal, str) and refusal:
            events += self._text_delta(refusal)
        if isinstance(tool_calls, list):
            for position, call in enumerate(tool_calls):
                if isinstance(call, dict):
                    events += self._call_delta(call, position)
        finish = choice.get("finish_reason")
        if isinstance(finish, str) and finish:
            self.finish_reason = finish
            events += self._end_message()
        return events

    # --- what the model wrote in the content ------------------------------

    def _parts(self, parts: list[Part]) -> list[Event]:
        events: list[Event] = []
        for part in parts:
            if isinstance(part, Reasoning):
                events += self._reasoning_delta(part.text)
            elif isinstance(part, str):
                events += self._text_delta(part)
            else:
                delta = {
                    "index": _TEXT_CALLS + self._text_calls,
                    "id": self._ids("call"),
                    "function": {"name": part.name, "arguments": part.arguments},
                }
                self._text_calls += 1
                events += self._call_delta(delta, 0)
        return events

    def _end_message(self) -> list[Event]:
        """The message ended (its finish_reason, or the end of the reply): what was held
        back is decided."""
        return self._parts(self._reader.end(truncated=self.finish_reason == "length"))

    def feed_completion(self, completion: dict[str, Any]) -> list[Event]:
        """A whole (non-streamed) chat completion, as one chunk."""
        return self.feed(completion)

    def _reasoning_delta(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._reasoning is None or not self._reasoning.open:
            events += self._close_text()
            body: dict[str, Any] = {
                "id": self._ids("rs"),
                "type": "reasoning",
                "summary": [],
                "content": [],
                "status": "in_progress",
            }
            self._reasoning, added = self._add_item(body)
            events.append(added)
            body["content"].append({"type": "reasoning_text", "text": ""})
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=body["id"],
                    output_index=self._reasoning.index,
                    content_index=0,
                    part={"type": "reasoning_text", "text": ""},
                )
            )
        item = self._reasoning
        item.body["content"][0]["text"] += text
        events.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=item.body["id"],
                output_index=item.index,
                content_index=0,
                delta=text,
            )
        )
        return events

    def _text_delta(self, text: str) -> list[Event]:
        events: list[Event] = []
        if self._text is None or not self._text.open:
            events += self._close_reasoning()
            body: dict[str, Any] = {
                "id": self._ids("msg"),
                "type": "message",
                "status": "in_progress",
                "role": "assistant",
                "content": [],
            }
            self._text, added = self._add_item(body)
            events.append(added)
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            body["content"].append(self._copy(part))
            events.append(
                self._event(
                    "response.content_part.added",
                    item_id=body["id"],
                    output_index=self._text.index,
                    content_index=0,
                    part=part,
                )
            )
        item = self._text
        item.body["content"][0]["text"] += text
        events.append(
            self._event(
                "response.output_text.delta",
                item_id=item.body["id"],
                output_index=item.index,
                content_index=0,
                delta=text,
                logprobs=[],
            )
        )
        return events

    def _call_delta(self, delta: dict[str, Any], position: int) -> list[Event]:
        ids = {index: call.call_id for index, call in self._calls.items()}
        index = delta_index(delta, position, ids, [*self._calls, *self._dropped_calls])
        if index in self._dropped_calls:
            return []
        function: dict[str, Any] = (
            delta["function"] if isinstance(delta.get("function"), dict) else {}
        )
        name: str = function["name"] if isinstance(function.get("name"), str) else ""
        arguments = function.get("arguments")
        events: list[Event] = []
        call = self._calls.get(index)
        if call is None:
            if self._max_tool_calls is not None and len(self._calls) >= self._max_tool_calls:
                self._dropped_calls.add(index)
                return []
            events += self._close_reasoning() + self._close_text()
            given_id = delta.get("id")
            call_id = given_id if isinstance(given_id, str) and given_id else self._ids("call")
            target = self.mcp.get(name)
            body: dict[str, Any]
            if target is None:
                body = {
                    "id": self._ids("fc"),
                    "type": "function_call",
                    "status": "in_progress",
                    "call_id": call_id,
                    "name": "",
                    "arguments": "",
                }
                call = CallItem(0, body, call_id=call_id)
                self._set_name(call, name)
            elif target.approval:
                body = {
                    "id": self._ids("mcpr"),
                    "type": "mcp_approval_request",
                    "server_label": target.label,
                    "name": target.tool,
                    "arguments": "",
                }
                call = CallItem(0, body, flat_name=name, kind="approval", call_id=call_id)
            else:
                body = {
                    "id": self._ids("mcp"),
                    "type": "mcp_call",
                    "server_label": target.label,
                    "name": target.tool,
                    "arguments": "",
                    "status": "in_progress",
                    "output": None,
                    "error": None,
                    "approval_request_id": None,
                }
                call = CallItem(0, body, flat_name=name, kind="mcp", call_id=call_id)
            self._calls[index] = call
            _, added = self._add_item(body, call)
            events.append(added)
        elif call.kind == "function":
            self._set_name(call, merge_name(call.flat_name, name))
        arguments = arguments_piece(arguments)
        if arguments is not None:
            call.arguments.append(arguments)
            kind = {
                "function": "response.function_call_arguments.delta",
                "mcp": "response.mcp_call_arguments.delta",
            }.get(call.kind)
            if kind is not None:
                events.append(
                    self._event(
                        kind,
                        item_id=call.body["id"],
                        output_index=call.index,
                        delta=arguments,
                    )
                )
        return events

    def _set_name(self, call: CallItem, flat: str) -> None:
        call.flat_name = flat
        namespace, name = self.names.split(flat)
        call.body["name"] = name
        if namespace is not None:
            call.body["namespace"] = namespace

    # --- closing ----------------------------------------------------------

    def _close_text(self, status: str = "completed") -> list[Event]:
        item = self._text
        if item is None or not item.open:
            return []
        item.open = False
        body = item.body
        part = body["content"][0]
        body["status"] = status
        return [
            self._event(
                "response.output_text.done",
                item_id=body["id"],
                output_index=item.index,
                content_index=0,
                text=part["text"],
                logprobs=[],
            ),
            *self._part_and_item_done(item, part),
        ]

    def _close_reasoning(self, status: str = "completed") -> list[Event]:
        item = self._reasoning
        if item is None or not item.open:
            return []
        item.open = False
        body = item.body
        part = body["content"][0]
        body["status"] = status
        return [
            self._event(
                "response.reasoning_text.done",
                item_id=body["id"],
                output_index=item.index,
                content_index=0,
                text=part["text"],
            ),
            *self._part_and_item_done(item, part),
        ]

    def _part_and_item_done(self, item: Item, part: dict[str, Any]) -> list[Event]:
        """The last two events of a text or reasoning item: its one part, then itself."""
        body = item.body
        return [
            self._event(
                "response.content_part.done",
                item_id=body["id"],
                output_index=item.index,
                content_index=0,
                part=self._copy(part),
            ),
            self._event(
                "response.output_item.done", output_index=item.index, item=self._copy(body)
            ),
        ]

    def _close_calls(self, status: str = "completed") -> list[Event]:
        events: list[Event] = []
        for call in sorted(self._calls.values(), key=lambda c: c.index):
            if not call.open:
                continue
            if call.kind != "function":
                events += self._close_mcp(call, status)
                continue
            call.open = False
            body = call.body
            body["arguments"] = "".join(call.arguments)
            body["status"] = status
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=body["id"],
                    output_index=call.index,
                    name=body["name"],
                    arguments=body["arguments"],
                )
            )
            events.append(
                self._event(
                    "response.output_item.done", output_index=call.index, item=self._copy(body)
                )
            )
        return events

    def _close_all(self, status: str) -> list[Event]:
        # In output order, so that done events arrive as the items were added.
        closers = {
            id(self._reasoning): self._close_reasoning,
            id(self._text): self._close_text,
        }
        events: list[Event] = []
        for item in self.items:
            if not item.open:
                continue
            closer = closers.get(id(item))
            if closer is not None:
                events += closer(status)
            else:
                events += self._close_calls(status)
        return events

    # --- tool loops (MCP) -------------------------------------------------

    def finish_round(self) -> tuple[list[Event], list[PendingMcpCall]]:
        """End of one upstream reply: close its text, and hand over its MCP calls (to run)
        and approval requests (to ask). Function calls of the client stay open for
        ``finish()``."""
        events = self._end_message()
        events += self._close_reasoning() + self._close_text()
        pending: list[PendingMcpCall] = []
        for call in sorted(self._calls.values(), key=lambda c: c.index):
            if call.kind == "function" or not call.open:
                continue
            body = call.body
            body["arguments"] = "".join(call.arguments)
            if call.kind == "approval":
                call.open = False
                events.append(
                    self._event(
                        "response.output_item.done", output_index=call.index, item=self._copy(body)
                    )
                )
            else:
                events.append(
                    self._event(
                        "response.mcp_call_arguments.done",
                        item_id=body["id"],
                        output_index=call.index,
                        arguments=body["arguments"],
                    )
                )
                events.append(
                    self._event(
                        "response.mcp_call.in_progress", item_id=body["id"], output_index=call.index
                    )
                )
            pending.append(PendingMcpCall(body, call.flat_name, body["arguments"], call))
        return events, pending

    def new_round(self) -> None:
        """Before the next upstream reply of a tool loop: calls are numbered anew, usage
        adds up."""
        self._calls = {}
        self._dropped_calls = set()
        self.finish_reason = None
        self._earlier_usage = self.usage
        self._reader = MessageReader(self.reading)
        self._text_calls = 0

    def finish(self) -> list[Event]:
        """Close every open item and end with completed or incomplete."""
        if self.finish_reason == "length":
            status, details = "incomplete", {"reason": "max_output_tokens"}
        elif self.finish_reason == "content_filter":
            status, details = "incomplete", {"reason": "content_filter"}
        else:
            status, details = "completed", None
        events = self._end_message()
        events += self._close_all("incomplete" if status == "incomplete" else "completed")
        self._settle(status, incomplete_details=details)
        kind = "response.completed" if status == "completed" else "response.incomplete"
        events.append(self._event(kind, response=self.snapshot()))
        return events

    def fail(self, code: str, message: str, *, kind: str | None = None) -> list[Event]:
        events = self._close_all("incomplete")
        error: dict[str, Any] = {"code": code, "message": message}
        if kind is not None:
            error["type"] = kind
        self._settle("failed", error=error)
        events.append(self._event("response.failed", response=self.snapshot()))
        return events

    def cancel(self) -> list[Event]:
        events = self._close_all("incomplete")
        self._settle("cancelled")
        # OpenAI has no response.cancelled event; a cancelled stream ends with the
        # response in its final state.
        events.append(self._event("response.incomplete", response=self.snapshot()))
        return events

    def _settle(
        self,
        status: str,
        *,
        error: dict[str, Any] | None = None,
        incomplete_details: dict[str, Any] | None = None,
    ) -> None:
        response = self.response
        response["status"] = status
        response["output"] = self._copy(self.output)
        response["error"] = error
        response["incomplete_details"] = incomplete_details
        response["usage"] = self.usage
        response["completed_at"] = int(self._clock()) if status == "completed" else None
