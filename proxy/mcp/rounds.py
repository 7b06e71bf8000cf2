"""One round of a tool loop on chat completions: the model's reply, read and filtered.

``Round`` takes the chunks of one upstream stream (or a whole completion) and
returns the chunks the client should see now: content deltas pass at once, the
deltas of calls to MCP tools are held back (lmbridge runs those), calls to the
client's own tools pass (renumbered from 0), and what would end the client's
stream early (a ``finish_reason``, a usage chunk, ``[DONE]``) is kept for the
last round. At the end of the round it gives the assistant message to append to
the conversation and the calls to run. Pure: no I/O.

What the model writes is read as on the pass-through (``chat_output.MessageReader``):
thinking in tags becomes reasoning, and calls written as text (to the MCP tools and to
the client's own) become calls; in a stream, text that may begin a call is held back
until it is decided, so a call's text never reaches the client.

Upstream quirks handled: tool-call deltas that repeat ``id`` and ``name`` every
time, deltas without ``index``, several servers sending ``finish_reason: "stop"``
with tool calls (the calls decide, never the finish reason).
"""

from __future__ import annotations

import copy
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from proxy.chat_output import ChatOutput, MessageReader, Part, Reasoning
from proxy.model_output.text_calls import DEFAULT_MAX_HELD, TextCall
from proxy.profiles import ModelProfile
from proxy.tool_deltas import arguments_piece, delta_index, merge_name
from proxy.usage import usage_from_chat


@dataclass
class Call:
    index: int
    id: str = ""
    name: str = ""
    arguments: list[str] = field(default_factory=list)
    kind: str = "pending"  # "mcp" or "client" once the name is known
    client_index: int = -1
    held: list[dict[str, Any]] = field(default_factory=list)  # deltas before the name

    @property
    def arguments_text(self) -> str:
        return "".join(self.arguments)

    def as_chat(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments_text},
        }


_REASONING_KEYS = ("reasoning_content", "reasoning")


class Round:
    def __init__(
        self,
        mcp_tools: Collection[str],
        *,
        stream_id: str | None = None,
        text_tool_calls: bool = False,
        number: int = 1,
        client_tools: Collection[str] | None = None,
        profile: ModelProfile | None = None,
    ) -> None:
        self.mcp_tools = mcp_tools
        # Known: a call to a name that is neither an MCP tool nor one of these is run by
        # the loop (as an "unknown tool" result for the model), not sent to the client.
        self.client_tools = client_tools
        self.number = number
        self.stream_id = stream_id
        # Calls written as text count for the MCP tools and the client's known tools.
        offered = (
            frozenset(mcp_tools) | frozenset(client_tools or ())
            if text_tool_calls
            else frozenset[str]()
        )
        # Thinking in tags is read only as the model's profile says.
        think = profile.think_tags or None if profile is not None else None
        output = ChatOutput(
            offered,
            think,
            profile is not None and profile.think_opened,
            profile.text_call_hold if profile is not None else DEFAULT_MAX_HELD,
        )
        self._reader: MessageReader | None = MessageReader(output) if output.active else None
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, Call] = {}
        self.written: list[Call] = []  # calls written as text, before any structured one
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None  # the Responses form, summable
        self.chat_usage: dict[str, Any] | None = None
        self.first_id: str | None = None
        self._client_calls = 0

    # --- streamed chunks ---------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to relay now (possibly rewritten)."""
        if self.first_id is None and isinstance(chunk.get("id"), str):
            self.first_id = chunk["id"]
        if isinstance(chunk.get("usage"), dict):
            self.chat_usage = chunk["usage"]
            self.usage = usage_from_chat(chunk["usage"])
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            return []  # a usage-only chunk: summed, sent once at the very end
        choice = choices[0]
        delta: dict[str, Any] = choice["delta"] if isinstance(choice.get("delta"), dict) else {}
        finish = choice.get("finish_reason")
        if isinstance(finish, str):
            self.finish_reason = finish
        parts = self._separated(delta)
        out_delta: dict[str, Any] = {}
        for key, value in delta.items():
            if key == "tool_calls":
                continue
            if key == "content" and isinstance(value, str):
                if self._reader is not None:
                    parts += self._reader.content(value)
                    continue
                self.content.append(value)
            if key in ("reasoning_content", "reasoning") and isinstance(value, str):
                self.reasoning.append(value)
            out_delta[key] = value
        if isinstance(finish, str) and finish and self._reader is not None:
            parts += self._end_reader(truncated=finish == "length")
        relayed_calls = self._take(parts, out_delta)
        for position, call_delta in enumerate(delta.get("tool_calls") or []):
            if isinstance(call_delta, dict):
                relayed_calls += self._call_delta(call_delta, position)
        if relayed_calls:
            out_delta["tool_calls"] = relayed_calls
        return self._relayed(chunk, choice, out_delta)

    def end_of_stream(self) -> list[dict[str, Any]]:
        """A stream that ended without a finish reason: what the reader still held."""
        if self._reader is None:
            return []
        out_delta: dict[str, Any] = {}
        calls = self._take(self._end_reader(truncated=False), out_delta)
        if calls:
            out_delta["tool_calls"] = calls
        template = {"id": self.first_id or "", "object": "chat.completion.chunk"}
        return self._relayed(template, {"index": 0}, out_delta)

    def _relayed(
        self, chunk: dict[str, Any], choice: dict[str, Any], out_delta: dict[str, Any]
    ) -> list[dict[str, Any]]:
        if not out_delta or out_delta == {"content": None}:
            return []
        out = {k: v for k, v in chunk.items() if k not in ("usage", "choices")}
        if self.stream_id is not None:
            out["id"] = self.stream_id
        out["choices"] = [
            {
                **{k: v for k, v in choice.items() if k not in ("delta", "finish_reason")},
                "delta": out_delta,
                "finish_reason": None,
            }
        ]
        return [out]

    def _separated(self, message: dict[str, Any]) -> list[Part]:
        """The upstream separated reasoning or calls itself: the reader stops looking
        for them, and gives back what it held."""
        reader = self._reader
        if reader is None:
            return []
        parts: list[Part] = []
        if any(isinstance(message.get(k), str) and message[k] for k in _REASONING_KEYS):
            parts += reader.separated_reasoning()
        if message.get("tool_calls"):
            parts += reader.separated_calls()
        return parts

    def _end_reader(self, *, truncated: bool) -> list[Part]:
        reader, self._reader = self._reader, None
        return reader.end(truncated=truncated) if reader is not None else []

    def _take(self, parts: list[Part], out_delta: dict[str, Any]) -> list[dict[str, Any]]:
        """What the reader gave: text and reasoning into ``out_delta`` (and the reply),
        calls into ``written``; returns the deltas of the client's calls among them."""
        relayed: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, Reasoning):
                self.reasoning.append(part.text)
                out_delta["reasoning_content"] = out_delta.get("reasoning_content", "") + part.text
            elif isinstance(part, str):
                self.content.append(part)
                out_delta["content"] = (out_delta.get("content") or "") + part
            else:
                relayed += self._written_call(part)
        return relayed

    def _written_call(self, text_call: TextCall) -> list[dict[str, Any]]:
        n = len(self.written)
        call = Call(n, f"call_text_{self.number}_{n}", text_call.name, [text_call.arguments])
        self.written.append(call)
        if text_call.name in self.mcp_tools:
            call.kind = "mcp"
            return []
        call.kind, call.client_index = "client", self._client_calls
        self._client_calls += 1
        return [{"index": call.client_index, **call.as_chat()}]

    def _call_delta(self, delta: dict[str, Any], position: int) -> list[dict[str, Any]]:
        ids = {index: call.id for index, call in self.calls.items()}
        index = delta_index(delta, position, ids, self.calls)
        call = self.calls.get(index)
        if call is None:
            call = self.calls[index] = Call(index)
        if isinstance(delta.get("id"), str) and delta["id"] and not call.id:
            call.id = delta["id"]
        function: dict[str, Any] = (
            delta["function"] if isinstance(delta.get("function"), dict) else {}
        )
        name = function.get("name")
        if isinstance(name, str):
            call.name = merge_name(call.name, name)
        arguments = arguments_piece(function.get("arguments"))
        if arguments is not None:
            call.arguments.append(arguments)
        if call.kind == "pending" and call.name:
            call.kind = "client" if self._is_client_tool(call.name) else "mcp"
            if call.kind == "client":
                call.client_index = self._client_calls
                self._client_calls += 1
        if call.kind == "pending":
            call.held.append(delta)
            return []
        if call.kind == "mcp":
            return []
        deltas = [*call.held, delta]
        call.held = []
        out = []
        for held in deltas:
            relayed = copy.deepcopy(held)
            relayed["index"] = call.client_index
            out.append(relayed)
        return out

    # --- a whole completion ------------------------------------------------

    def feed_completion(self, completion: dict[str, Any]) -> None:
        if isinstance(completion.get("id"), str):
            self.first_id = completion["id"]
        if isinstance(completion.get("usage"), dict):
            self.chat_usage = completion["usage"]
            self.usage = usage_from_chat(completion["usage"])
        choices = completion.get("choices") or [{}]
        choice: dict[str, Any] = choices[0] if isinstance(choices[0], dict) else {}
        message: dict[str, Any] = (
            choice["message"] if isinstance(choice.get("message"), dict) else {}
        )
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        for key in _REASONING_KEYS:
            if isinstance(message.get(key), str):
                self.reasoning.append(message[key])
        parts = self._separated(message)
        content = message.get("content")
        if isinstance(content, str):
            if self._reader is None:
                self.content.append(content)
            else:
                parts += self._reader.content(content)
        parts += self._end_reader(truncated=self.finish_reason == "length")
        self._take(parts, {})
        for position, call in enumerate(message.get("tool_calls") or []):
            if isinstance(call, dict):
                self._call_delta({**call, "index": position}, position)

    # --- the end of the round ----------------------------------------------

    def finish(self) -> None:
        """The reply is complete: settle what it held."""
        self._take(self._end_reader(truncated=False), {})  # a reply with no finish reason
        if self.written:
            # What separated the calls from the text, or ended the message.
            rest = "".join(self.content).strip()
            self.content = [rest] if rest else []
        for call in self.calls.values():  # a call whose name never came: not ours to run
            if call.kind == "pending":
                call.kind = "client"
                call.client_index = self._client_calls
                self._client_calls += 1

    def _is_client_tool(self, name: str) -> bool:
        if name in self.mcp_tools:
            return False
        return self.client_tools is None or name in self.client_tools

    @property
    def mcp_calls(self) -> list[Call]:
        return [c for c in self._ordered() if c.kind == "mcp"]

    @property
    def client_calls(self) -> list[Call]:
        return [c for c in self._ordered() if c.kind == "client"]

    def _ordered(self) -> list[Call]:
        return [*self.written, *(self.calls[i] for i in sorted(self.calls))]

    def assistant_message(
        self, *, include_client_calls: bool = True, reasoning: bool = False
    ) -> dict[str, Any]:
        """The assistant's turn as it goes back into the conversation upstream (with its
        reasoning when the model's template reads it)."""
        calls = [c for c in self._ordered() if c.kind == "mcp" or include_client_calls]
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content) or None}
        if reasoning and self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if calls:
            message["tool_calls"] = [c.as_chat() for c in calls]
        return message
