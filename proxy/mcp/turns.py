"""The hidden MCP steps of chat-completions turns that ended in a client tool call.

On /v1/chat/completions the client holds the history, and it only ever sees its own
calls: the MCP calls lmbridge ran in the same loop, and their results, are not in
what it sends back with its tool results. Without them the model continues its turn
blind to what its tools returned, and often calls them again. ``TurnMemory`` keeps
those steps for a while, keyed by the client calls the turn ended with, and puts
them back when a later request carries that assistant message after the same
message as before (so that two conversations whose upstream numbers its calls the
same way do not swap results).

In memory only, bounded in entries and time: after a restart, or once an entry is
forgotten, the request goes upstream as the client wrote it (as before this existed).
Entries belong to the client key that made them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from proxy.jsontext import dumps

# Enough for the turns in flight of a busy machine; each entry holds one turn's results.
MAX_ENTRIES = 1024
# Results may each be up to mcp.result_max_chars long: the total is bounded too.
MAX_CHARS = 32 * 1024 * 1024
# A client answers its tool calls in seconds or minutes (a person may be asked); after
# an hour the turn is given up on.
TTL_SECONDS = 3600.0

Message = dict[str, Any]
Key = tuple[str, tuple[tuple[str, str, str], ...]]


@dataclass(frozen=True)
class HiddenSteps:
    """What the client did not see of one turn."""

    before: tuple[Message, ...]  # earlier rounds: assistant MCP calls, their results
    calls: tuple[Message, ...]  # MCP calls made beside the client calls (tool_calls entries)
    results: tuple[Message, ...]  # the results of those calls (tool and image messages)
    expires: float
    follows: bytes  # digest of the message the handed assistant message follows
    chars: int  # the size of all of it as JSON text


def hidden_steps(
    steps: Sequence[Message], ended_mid_round: bool, expires: float, follows: bytes
) -> HiddenSteps | None:
    """Split what a loop appended to the conversation. ``ended_mid_round``: the last
    round called MCP tools too, so its assistant message (MCP calls only) and their
    results are the tail of ``steps``."""
    if not steps:
        return None
    chars = len(dumps(list(steps)))
    if not ended_mid_round:
        return HiddenSteps(tuple(steps), (), (), expires, follows, chars)
    last = max(i for i, m in enumerate(steps) if m.get("role") == "assistant")
    calls = tuple(steps[last].get("tool_calls") or ())
    return HiddenSteps(
        tuple(steps[:last]), calls, tuple(steps[last + 1 :]), expires, follows, chars
    )


def _key(owner: str, tool_calls: Any) -> Key | None:
    if not isinstance(tool_calls, list) or not tool_calls:
        return None
    parts = []
    for call in tool_calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            return None
        call_id, name = call.get("id"), function.get("name")
        if not isinstance(call_id, str) or not isinstance(name, str):
            return None
        parts.append((call_id, name, _canonical(function.get("arguments"))))
    return owner, tuple(parts)


def digest(message: Any) -> bytes:
    """A message, whatever the order of its keys."""
    text = json.dumps(message, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(text.encode(), digest_size=16).digest()


def _canonical(arguments: Any) -> str:
    """Arguments as the same text whether or not a client re-serialised them."""
    try:
        value = json.loads(arguments) if isinstance(arguments, str) else arguments
        return json.dumps(value, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError):
        return str(arguments)


class TurnMemory:
    def __init__(
        self,
        *,
        max_entries: int = MAX_ENTRIES,
        max_chars: int = MAX_CHARS,
        ttl: float = TTL_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_entries = max_entries
        self.max_chars = max_chars
        self.ttl = ttl
        self.clock = clock
        self._entries: OrderedDict[Key, HiddenSteps] = OrderedDict()
        self._chars = 0

    def __len__(self) -> int:
        return len(self._entries)

    def remember(
        self,
        owner: str,
        client_calls: list[Message],
        steps: Sequence[Message],
        *,
        ended_mid_round: bool,
        follows: Any = None,
    ) -> None:
        """``follows``: the client's last message, which the handed one comes after."""
        key = _key(owner, client_calls)
        expires = self.clock() + self.ttl
        hidden = hidden_steps(steps, ended_mid_round, expires, digest(follows))
        if key is None or hidden is None or hidden.chars > self.max_chars:
            return
        self._forget(key)
        self._entries[key] = hidden
        self._chars += hidden.chars
        while len(self._entries) > self.max_entries or self._chars > self.max_chars:
            self._forget(next(iter(self._entries)))

    def _forget(self, key: Key) -> None:
        hidden = self._entries.pop(key, None)
        if hidden is not None:
            self._chars -= hidden.chars

    def restore(self, owner: str, messages: list[Any]) -> list[Any]:
        """``messages`` with the hidden steps put back before and into each assistant
        message that ended a remembered turn; the same list when none did."""
        if not self._entries:
            return messages
        now = self.clock()
        out: list[Any] = []
        changed = False
        for position, message in enumerate(messages):
            hidden = self._lookup(owner, message, now)
            if hidden is not None:
                follows = messages[position - 1] if position else None
                if digest(follows) != hidden.follows:
                    hidden = None
            if hidden is None:
                out.append(message)
                continue
            changed = True
            out += hidden.before
            if hidden.calls:
                out.append({**message, "tool_calls": [*hidden.calls, *message["tool_calls"]]})
                out += hidden.results
            else:
                out.append(message)
        return out if changed else messages

    def _lookup(self, owner: str, message: Any, now: float) -> HiddenSteps | None:
        if not isinstance(message, dict) or message.get("role") != "assistant":
            return None
        key = _key(owner, message.get("tool_calls"))
        if key is None:
            return None
        hidden = self._entries.get(key)
        if hidden is not None and hidden.expires <= now:
            self._forget(key)
            return None
        return hidden
