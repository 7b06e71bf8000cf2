"""Chat completions as local models write them, put into the API's shape: tool calls
written as text become ``tool_calls``, thinking in tags at the start of the content
becomes ``reasoning_content``. Between the upstream's answer and the client on
``/v1/chat/completions`` (``passthrough.py``); the readers themselves are in
``proxy/model_output``. Pure: no I/O.

- ``ChatOutput``: what is on for one request (``output_for``: the settings, the offered
  function tools and the request's ``lmbridge`` switches).
- ``normalise_completion``: a whole completion, rewritten in place.
- ``ChatStreamRewriter``: fed the chunks of a stream, returns for each ``None`` (the
  chunk is unchanged) or the chunks to send instead.
- ``ChatStreamEditor``: the same over the raw SSE bytes, for the relay: what is unchanged
  goes out byte for byte, and once nothing more can change (plain content began and no
  tools were offered) every later byte passes without being parsed.

What the upstream already separated is left alone: structured ``tool_calls`` end the
search for text calls, and a ``reasoning_content`` (or ``reasoning``) delta ends the
search for tags.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from proxy.ids import new_id
from proxy.jsontext import loads
from proxy.model_output.text_calls import Piece, TextCall, TextCallRecogniser
from proxy.model_output.text_calls import split as split_text_calls
from proxy.model_output.think_tags import THINK, ReasoningSplitter, ThinkTags, split_reasoning
from proxy.sse import DONE_EVENT, SSEEvent, SSEParser, encode_event

# The request's own switches: {"lmbridge": {"text_tool_calls": false, "think_tags": false}}.
SWITCHES_FIELD = "lmbridge"
SWITCHES = ("text_tool_calls", "think_tags")

# Finish reasons a recognised call turns into "tool_calls"; "length" and the others
# say something the client must still see.
_CALL_FINISH = frozenset({"stop", "eos", "tool_calls", "function_call"})


@dataclass(frozen=True, slots=True)
class ChatOutput:
    """What lmbridge reads out of one request's answer."""

    offered: frozenset[str] = frozenset()  # function tools whose text calls count
    think: ThinkTags | None = None  # the tags of thinking looked for, None: not looked for

    @property
    def active(self) -> bool:
        return bool(self.offered) or self.think is not None


def read_switches(value: Any) -> dict[str, bool]:
    """The request's ``lmbridge`` object; ValueError says what is wrong with it."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"'{SWITCHES_FIELD}' must be an object.")
    for key, switch in value.items():
        if key not in SWITCHES:
            raise ValueError(
                f"Unknown key '{SWITCHES_FIELD}.{key}' (known: {', '.join(SWITCHES)})."
            )
        if not isinstance(switch, bool):
            raise ValueError(f"'{SWITCHES_FIELD}.{key}' must be a boolean.")
    return dict(value)


def function_names(tools: Any) -> frozenset[str]:
    """The names of the function tools of a chat request."""
    if not isinstance(tools, list):
        return frozenset()
    names = set()
    for tool in tools:
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict):
            name = tool["function"].get("name")
            if isinstance(name, str) and name:
                names.add(name)
    return frozenset(names)


def output_for(
    tools: Any, switches: Mapping[str, bool], *, text_tool_calls: bool, think_tags: bool
) -> ChatOutput:
    """What is on for a request: each part when its setting and the request allow it."""
    offered = frozenset[str]()
    if text_tool_calls and switches.get("text_tool_calls", True):
        offered = function_names(tools)
    think = THINK if think_tags and switches.get("think_tags", True) else None
    return ChatOutput(offered, think)


def _has_reasoning(message: Mapping[str, Any]) -> bool:
    return bool(message.get("reasoning_content") or message.get("reasoning"))


def chat_call(call: TextCall, index: int | None, call_id: str) -> dict[str, Any]:
    """A recognised call as a chat ``tool_calls`` entry (with ``index``: a delta)."""
    entry: dict[str, Any] = {} if index is None else {"index": index}
    entry.update(
        id=call_id,
        type="function",
        function={"name": call.name, "arguments": call.arguments},
    )
    return entry


def normalise_completion(
    completion: Any, output: ChatOutput, *, ids: Callable[[str], str] = new_id
) -> bool:
    """Rewrite a whole completion's choices in place; whether anything changed."""
    choices = completion.get("choices") if isinstance(completion, dict) else None
    if not isinstance(choices, list):
        return False
    changed = False
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if not isinstance(message, dict):
            continue
        content = message.get("content")
        if not isinstance(content, str) or not content:
            continue
        finish = choice.get("finish_reason")
        if output.think is not None and not _has_reasoning(message):
            truncated = finish == "length"
            reasoning, answer = split_reasoning(content, output.think, truncated=truncated)
            if reasoning or answer != content:  # an empty block is taken off too
                message["reasoning_content"] = reasoning
                message["content"] = content = answer
                changed = True
        if output.offered and not message.get("tool_calls") and content:
            calls, rest = split_text_calls(content, output.offered)
            if calls:
                message["content"] = rest.strip() or None
                message["tool_calls"] = [chat_call(c, None, ids("call")) for c in calls]
                if finish in _CALL_FINISH:
                    choice["finish_reason"] = "tool_calls"
                changed = True
    return changed


class ChatStreamRewriter:
    """Fed the chunks of one chat completion stream, parsed; returns the chunks to send.

    Only the first choice is read (local servers send one); a chunk of several choices
    passes unchanged."""

    def __init__(self, output: ChatOutput, *, ids: Callable[[str], str] = new_id) -> None:
        self._ids = ids
        self._recogniser = TextCallRecogniser(output.offered) if output.offered else None
        self._splitter = ReasoningSplitter(output.think) if output.think else None
        self.calls = 0  # text calls sent, so far
        self._template: dict[str, Any] | None = None  # the latest chunk with a choice
        self._ended = False  # the finish_reason came: what was held has gone out

    @property
    def watching(self) -> bool:
        """Whether a later chunk may still change; once not, every chunk passes."""
        return (self._recogniser is not None or self._splitter is not None) or self.calls > 0

    def feed(self, chunk: Any) -> list[dict[str, Any]] | None:
        if not isinstance(chunk, dict):
            return None
        choices = chunk.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            if "error" in chunk:  # what was held goes out before the error
                flushed = self.finish()
                return [*flushed, chunk] if flushed else None
            return None  # a usage chunk, or several choices
        choice = choices[0]
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return None
        self._template = chunk
        finish = choice.get("finish_reason")
        reasoning: list[str] = []
        pieces: list[Piece] = []
        touched = False  # the chunk cannot go out as it came

        if self._splitter is not None and _has_reasoning(delta):
            # The upstream separates reasoning itself: tags are not looked for.
            touched |= self._drop_splitter(False, reasoning, pieces)
        calls = delta.get("tool_calls")
        if calls and self._recogniser is not None:
            # The upstream parses calls itself: what was held is text.
            pieces += self._recogniser.finish()
            self._recogniser = None
            touched |= bool(pieces)
        content = delta.get("content")
        if isinstance(content, str) and content:
            before = len(pieces)
            self._content(content, reasoning, pieces)
            touched |= reasoning != [] or pieces[before:] != [content]
        if isinstance(finish, str) and finish:
            touched |= self._end(finish == "length", reasoning, pieces)
        shift = bool(calls) and self.calls > 0  # structured calls numbered after ours
        rewrite = self.calls > 0 and finish in _CALL_FINISH
        if not (touched or shift or rewrite):
            return None
        return self._chunks(chunk, choice, delta, "".join(reasoning), pieces, finish)

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the stream (its ``[DONE]`` or its end), what is still held."""
        if self._ended or self._template is None:
            return []
        reasoning: list[str] = []
        pieces: list[Piece] = []
        self._end(False, reasoning, pieces)
        if not reasoning and not pieces:
            return []
        template = self._template
        choice = template["choices"][0]
        return self._chunks(template, choice, {}, "".join(reasoning), pieces, None)

    # --- the readers ------------------------------------------------------------------

    def _content(self, text: str, reasoning: list[str], pieces: list[Piece]) -> None:
        if self._splitter is not None:
            split = self._splitter.feed(text)
            if split.reasoning:
                reasoning.append(split.reasoning)
            text = split.content
            if self._splitter.answering:
                self._splitter = None
        if not text:
            return
        if self._recogniser is not None:
            pieces += self._recogniser.feed(text)
        else:
            pieces.append(text)

    def _drop_splitter(self, truncated: bool, reasoning: list[str], pieces: list[Piece]) -> bool:
        splitter, self._splitter = self._splitter, None
        if splitter is None:
            return False
        split = splitter.finish(truncated=truncated)
        if split.reasoning:
            reasoning.append(split.reasoning)
        if split.content:
            self._content(split.content, reasoning, pieces)
        return bool(split.reasoning or split.content)

    def _end(self, truncated: bool, reasoning: list[str], pieces: list[Piece]) -> bool:
        """The message ended: everything held is decided."""
        self._ended = True
        touched = self._drop_splitter(truncated, reasoning, pieces)
        recogniser, self._recogniser = self._recogniser, None
        if recogniser is not None:
            rest = recogniser.finish()
            pieces += rest
            touched |= bool(rest)
        return touched

    # --- the chunks sent --------------------------------------------------------------

    def _chunks(
        self,
        chunk: dict[str, Any],
        choice: dict[str, Any],
        delta: dict[str, Any],
        reasoning: str,
        pieces: list[Piece],
        finish: Any,
    ) -> list[dict[str, Any]]:
        others = {k: v for k, v in delta.items() if k not in ("content", "tool_calls")}
        if reasoning:
            others["reasoning_content"] = others.get("reasoning_content", "") + reasoning
        deltas: list[dict[str, Any]] = []
        for piece in pieces:
            if isinstance(piece, str):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += piece
                else:
                    deltas.append({"content": piece})
            else:
                call = chat_call(piece, self.calls, self._ids("call"))
                self.calls += 1
                deltas.append({"tool_calls": [call]})
        calls = delta.get("tool_calls")
        if isinstance(calls, list) and calls:
            deltas.append({"tool_calls": self._shifted(calls)})
        if others:
            if deltas and not any(k in deltas[0] for k in others):
                deltas[0] = {**others, **deltas[0]}
            else:
                deltas.insert(0, others)
        if isinstance(finish, str) and finish:
            if self.calls > 0 and finish in _CALL_FINISH:
                finish = "tool_calls"
            if not deltas:
                deltas.append({})
        out: list[dict[str, Any]] = []
        top = {k: v for k, v in chunk.items() if k not in ("choices", "usage")}
        base = {k: v for k, v in choice.items() if k not in ("delta", "finish_reason")}
        for n, piece_delta in enumerate(deltas):
            last = n == len(deltas) - 1
            built = {
                **top,
                "choices": [
                    {**base, "delta": piece_delta, "finish_reason": finish if last else None}
                ],
            }
            if last and "usage" in chunk:
                built["usage"] = chunk["usage"]
            out.append(built)
        return out

    def _shifted(self, calls: list[Any]) -> list[Any]:
        """The upstream's own calls, numbered after the text calls already sent."""
        if self.calls == 0:
            return calls
        shifted = copy.deepcopy(calls)
        for call in shifted:
            if isinstance(call, dict) and isinstance(call.get("index"), int):
                call["index"] += self.calls
        return shifted


class ChatStreamEditor:
    """A ``ChatStreamRewriter`` over the raw bytes of an SSE stream: bytes in, bytes out.

    Bytes of events left unchanged go out as they came, once their events are complete;
    a changed event goes out encoded again, with the events completed before it. When
    the rewriter stops watching, ``relaying`` turns true and every later chunk is
    returned as it is, without being parsed."""

    def __init__(self, rewriter: ChatStreamRewriter) -> None:
        self.rewriter = rewriter
        self.relaying = False
        self._parser = SSEParser()
        self._held = b""  # raw bytes of events not yet complete, all unchanged so far
        self._pending: list[bytes] = []  # the events completed since, each encoded
        self._dirty = False  # the raw bytes of an event in the parser were given up

    def feed(self, chunk: bytes) -> bytes:
        if self.relaying:
            return chunk
        changed = self._read(self._parser.feed(chunk))
        idle = self._parser.idle
        if changed or self._dirty:
            out = b"".join(self._pending)
            self._pending, self._held = [], b""
            self._dirty = not idle
        elif idle:
            out = self._held + chunk
            self._pending, self._held = [], b""
        else:
            self._held += chunk
            return b""
        if idle and not self.rewriter.watching:
            self.relaying = True
        return out

    def finish(self) -> bytes:
        """The end of the upstream's stream: what is held, and what the rewriter held."""
        if self.relaying:
            return b""
        changed = self._read(self._parser.finish())
        flushed = self.rewriter.finish()
        if changed or self._dirty or flushed:
            return b"".join(self._pending) + b"".join(encode_event(c) for c in flushed)
        return self._held

    def _read(self, events: list[SSEEvent]) -> bool:
        """Each event into ``_pending`` as it will go out; whether any changed."""
        changed = False
        for event in events:
            result = self._rewrite(event)
            if result is None:
                self._pending.append(encode_event(event.data, event.event))
            else:
                self._pending.append(result)
                changed = True
        return changed

    def _rewrite(self, event: SSEEvent) -> bytes | None:
        if event.is_done:
            flushed = self.rewriter.finish()
            if not flushed:
                return None
            return b"".join(encode_event(c) for c in flushed) + DONE_EVENT
        try:
            chunk = loads(event.data)
        except ValueError:
            return None
        chunks = self.rewriter.feed(chunk)
        if chunks is None:
            return None
        return b"".join(encode_event(c) for c in chunks)
