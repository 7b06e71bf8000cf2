"""One round of a tool loop on chat completions: the model's reply, read and filtered.

``Round`` takes the chunks of one upstream stream (or a whole completion) and
returns the chunks the client should see now: content deltas pass at once, the
deltas of calls to MCP tools are held back (lmbridge runs those), calls to the
client's own tools pass (renumbered from 0), and what would end the client's
stream early (a ``finish_reason``, a usage chunk, ``[DONE]``) is kept for the
last round. At the end of the round it gives the assistant message to append to
the conversation and the calls to run. Pure: no I/O.

Upstream quirks handled: tool-call deltas that repeat ``id`` and ``name`` every
time, deltas without ``index``, several servers sending ``finish_reason: "stop"``
with tool calls (the calls decide, never the finish reason).
"""

from __future__ import annotations

import copy
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Any

from proxy.model_output.text_calls import split as split_text_calls
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


@dataclass(frozen=True)
class _Offered:
    """The names a call written as text may take: the MCP tools and the client's own."""

    mcp_tools: Container[str]
    client_tools: Container[str] | None

    def __contains__(self, name: object) -> bool:
        if name in self.mcp_tools:
            return True
        return self.client_tools is not None and name in self.client_tools


class Round:
    def __init__(
        self,
        mcp_tools: Container[str],
        *,
        stream_id: str | None = None,
        text_tool_calls: bool = False,
        number: int = 1,
        client_tools: Container[str] | None = None,
    ) -> None:
        self.mcp_tools = mcp_tools
        # Known: a call to a name that is neither an MCP tool nor one of these is run by
        # the loop (as an "unknown tool" result for the model), not sent to the client.
        self.client_tools = client_tools
        self.number = number
        self.stream_id = stream_id
        self.text_tool_calls = text_tool_calls
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.calls: dict[int, Call] = {}
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None  # the Responses form, summable
        self.chat_usage: dict[str, Any] | None = None
        self.first_id: str | None = None
        self._client_calls = 0
        self._streamed = False

    # --- streamed chunks ---------------------------------------------------

    def feed(self, chunk: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks to relay now (possibly rewritten)."""
        self._streamed = True
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
        if isinstance(choice.get("finish_reason"), str):
            self.finish_reason = choice["finish_reason"]
        out_delta: dict[str, Any] = {}
        for key, value in delta.items():
            if key == "tool_calls":
                continue
            if key == "content" and isinstance(value, str):
                self.content.append(value)
            if key in ("reasoning_content", "reasoning") and isinstance(value, str):
                self.reasoning.append(value)
            out_delta[key] = value
        relayed_calls: list[dict[str, Any]] = []
        for position, call_delta in enumerate(delta.get("tool_calls") or []):
            if isinstance(call_delta, dict):
                relayed_calls += self._call_delta(call_delta, position)
        if relayed_calls:
            out_delta["tool_calls"] = relayed_calls
        if not out_delta or out_delta == {"content": None}:
            return []
        out = {k: v for k, v in chunk.items() if k != "usage"}
        if self.stream_id is not None:
            out["id"] = self.stream_id
        out["choices"] = [
            {
                **{k: v for k, v in choice.items() if k != "finish_reason"},
                "delta": out_delta,
                "finish_reason": None,
            }
        ]
        return [out]

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
        if isinstance(message.get("content"), str):
            self.content.append(message["content"])
        for key in ("reasoning_content", "reasoning"):
            if isinstance(message.get(key), str):
                self.reasoning.append(message[key])
        for position, call in enumerate(message.get("tool_calls") or []):
            if isinstance(call, dict):
                self._call_delta({**call, "index": position}, position)

    # --- the end of the round ----------------------------------------------

    def finish(self) -> None:
        """Look for text-written calls (when enabled) once the reply is complete."""
        if self.text_tool_calls and not self.calls and self.content:
            # Streamed, the content went to the client as it came: a call of its own
            # found in it now could not be sent before the text that wrote it.
            client_tools = None if self._streamed else self.client_tools
            offered = _Offered(self.mcp_tools, client_tools)
            found, rest = split_text_calls("".join(self.content), offered)
            for n, text_call in enumerate(found):
                call_id = f"call_text_{self.number}_{n}"
                call = Call(n, call_id, text_call.name, [text_call.arguments], "mcp")
                if text_call.name not in self.mcp_tools:  # one of the client's own
                    call.kind, call.client_index = "client", self._client_calls
                    self._client_calls += 1
                self.calls[n] = call
            if found:
                rest = rest.strip()  # what separated the calls from the text
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
        return [self.calls[i] for i in sorted(self.calls)]

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
