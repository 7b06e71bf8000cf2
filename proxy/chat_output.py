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
- ``ChatStreamEditor`` (``chat_stream_editor.py``): the same over the raw SSE bytes, for
  the relay.

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
from proxy.model_output.text_calls import DEFAULT_MAX_HELD, TextCall, TextCallRecogniser
from proxy.model_output.text_calls import split as split_text_calls
from proxy.model_output.think_tags import ReasoningSplitter, Variants, split_reasoning
from proxy.profiles import ModelProfile

# The request's own switches: {"lmbridge": {"text_tool_calls": false, "think_tags": false}}.
SWITCHES_FIELD = "lmbridge"
SWITCHES = ("text_tool_calls", "think_tags", "describe_tools", "schema_retry")

# Finish reasons a recognised call turns into "tool_calls"; "length" and the others
# say something the client must still see.
_CALL_FINISH = frozenset({"stop", "eos", "tool_calls", "function_call"})


@dataclass(frozen=True, slots=True)
class ChatOutput:
    """What lmbridge reads out of one request's answer."""

    offered: frozenset[str] = frozenset()  # function tools whose text calls count
    think: Variants | None = None  # the tags of thinking looked for, None: not looked for
    think_opened: bool = False  # the template opened the block: the answer starts in it
    max_held: int = DEFAULT_MAX_HELD  # most characters held while they may be a call

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


def output_for(tools: Any, profile: ModelProfile) -> ChatOutput:
    """What is on for a request: what its model's profile (switches applied) says."""
    offered = function_names(tools) if profile.text_tool_calls else frozenset[str]()
    return ChatOutput(
        offered, profile.think_tags or None, profile.think_opened, profile.text_call_hold
    )


def mcp_text_calls(
    text_tool_calls: bool, mcp_setting: bool | None, switches: Mapping[str, bool]
) -> bool:
    """Whether calls to MCP tools written as text count: models.text_tool_calls, or the
    deprecated mcp.text_tool_calls when set, unless the request turned it off."""
    enabled = text_tool_calls if mcp_setting is None else mcp_setting
    return enabled and switches.get("text_tool_calls", True)


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
            reasoning, answer = split_reasoning(
                content, output.think, opened=output.think_opened, truncated=truncated
            )
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


@dataclass(frozen=True, slots=True)
class Reasoning:
    """Thinking read off the front of the content."""

    text: str


Part = str | TextCall | Reasoning


class MessageReader:
    """One message's content, delta by delta, read into parts in order: reasoning, text
    and calls. Shared by the chat stream and the Responses builder."""

    def __init__(self, output: ChatOutput) -> None:
        self._recogniser = (
            TextCallRecogniser(output.offered, max_held=output.max_held) if output.offered else None
        )
        self._splitter = (
            ReasoningSplitter(output.think, opened=output.think_opened) if output.think else None
        )

    @property
    def watching(self) -> bool:
        """Whether content may still be held back or changed."""
        return self._recogniser is not None or self._splitter is not None

    @property
    def passing(self) -> bool:
        """Whether plain text (no ``<``, ``[``, backtick) would pass unchanged now."""
        recogniser = self._recogniser
        return self._splitter is None and (recogniser is None or recogniser.passing)

    @property
    def at_start(self) -> bool:
        """Whether nothing was read yet and a first delta of plain text (no ``<``, ``[``,
        backtick; starting with neither whitespace nor ``{``) would pass unchanged."""
        recogniser, splitter = self._recogniser, self._splitter
        return (recogniser is None or recogniser.at_start) and (
            splitter is None or splitter.undecided
        )

    def plain_start(self) -> None:
        """Such a first delta came: read without its text, which passes as it is."""
        if self._recogniser is not None:
            self._recogniser.plain_start()
        self._splitter = None

    def content(self, text: str) -> list[Part]:
        parts: list[Part] = []
        if self._splitter is not None:
            split = self._splitter.feed(text)
            if split.reasoning:
                parts.append(Reasoning(split.reasoning))
            text = split.content
            if self._splitter.answering:
                self._splitter = None
        if text:
            if self._recogniser is None:
                parts.append(text)
            else:
                parts += self._recogniser.feed(text)
        return parts

    def separated_reasoning(self) -> list[Part]:
        """The upstream sends reasoning itself: tags are no longer looked for."""
        return self._end_splitter(truncated=False)

    def separated_calls(self) -> list[Part]:
        """The upstream parses calls itself: what was held is text."""
        recogniser, self._recogniser = self._recogniser, None
        return list(recogniser.finish()) if recogniser is not None else []

    def end(self, *, truncated: bool) -> list[Part]:
        """The message ended (``truncated``: by the length limit): the rest."""
        parts = self._end_splitter(truncated=truncated)
        return parts + self.separated_calls()

    def _end_splitter(self, *, truncated: bool) -> list[Part]:
        splitter, self._splitter = self._splitter, None
        if splitter is None:
            return []
        split = splitter.finish(truncated=truncated)
        parts: list[Part] = [Reasoning(split.reasoning)] if split.reasoning else []
        if split.content:
            parts += self.content(split.content)
        return parts


class ChatStreamRewriter:
    """Fed the chunks of one chat completion stream, parsed; returns the chunks to send.

    Only the first choice is read (local servers send one); a chunk of several choices
    passes unchanged."""

    def __init__(self, output: ChatOutput, *, ids: Callable[[str], str] = new_id) -> None:
        self._ids = ids
        self._reader = MessageReader(output)
        self.calls = 0  # text calls sent, so far
        self._template: dict[str, Any] | None = None  # the latest chunk with a choice
        self._ended = False  # the finish_reason came: what was held has gone out

    @property
    def watching(self) -> bool:
        """Whether a later chunk may still change; once not, every chunk passes."""
        return self._reader.watching or self.calls > 0

    @property
    def passing(self) -> bool:
        """Whether a chunk of plain content would pass unchanged now."""
        return self._reader.passing

    @property
    def starting(self) -> bool:
        """Whether no content was read yet and a plain first delta would pass unchanged
        (``MessageReader.at_start``): then ``plain_start`` reads it."""
        return not self._ended and self._reader.at_start

    def plain_start(self) -> None:
        self._reader.plain_start()

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
        reader = self._reader
        parts: list[Part] = []
        if _has_reasoning(delta):
            parts += reader.separated_reasoning()
        calls = delta.get("tool_calls")
        if calls:
            parts += reader.separated_calls()
        touched = bool(parts)  # the chunk cannot go out as it came
        content = delta.get("content")
        if isinstance(content, str) and content:
            read = reader.content(content)
            touched |= read != [content]
            parts += read
        if isinstance(finish, str) and finish:
            self._ended = True
            rest = reader.end(truncated=finish == "length")
            touched |= bool(rest)
            parts += rest
        shift = bool(calls) and self.calls > 0  # structured calls numbered after ours
        rewrite = self.calls > 0 and finish in _CALL_FINISH
        if not (touched or shift or rewrite):
            return None
        return self._chunks(chunk, choice, delta, parts, finish)

    def finish(self) -> list[dict[str, Any]]:
        """At the end of the stream (its ``[DONE]`` or its end), what is still held."""
        if self._ended or self._template is None:
            return []
        self._ended = True
        parts = self._reader.end(truncated=False)
        if not parts:
            return []
        template = self._template
        return self._chunks(template, template["choices"][0], {}, parts, None)

    def _chunks(
        self,
        chunk: dict[str, Any],
        choice: dict[str, Any],
        delta: dict[str, Any],
        parts: list[Part],
        finish: Any,
    ) -> list[dict[str, Any]]:
        others = {k: v for k, v in delta.items() if k not in ("content", "tool_calls")}
        deltas: list[dict[str, Any]] = []
        for part in parts:
            if isinstance(part, Reasoning):
                others["reasoning_content"] = others.get("reasoning_content", "") + part.text
            elif isinstance(part, str):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += part
                else:
                    deltas.append({"content": part})
            else:
                call = chat_call(part, self.calls, self._ids("call"))
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
        for n, part_delta in enumerate(deltas):
            last = n == len(deltas) - 1
            built = {
                **top,
                "choices": [
                    {**base, "delta": part_delta, "finish_reason": finish if last else None}
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
