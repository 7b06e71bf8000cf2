"""The formats in which models write tool calls as text, each a small reader that is
given the text held since the format's opening tag and says whether it is a call yet.
Pure; driven by ``proxy.model_output.text_calls``.

A reader's answer depends only on the text it is given, never on how that text was cut
into deltas: it is ``PENDING`` while more text could change it, and once it says
``Accept`` or ``Reject`` more text would not (the recogniser relies on this to give the
same result for every split of a stream). With ``final`` the text is all there will be.

- Hermes, Qwen 2.5/3: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, one
  block per call (a list of calls in one block is read too);
- LM Studio's prompt for models without a tool format of their own:
  ``[TOOL_REQUEST]{...}[END_TOOL_REQUEST]``;
- Llama 3.1+: ``<|python_tag|>{"name": ..., "parameters": {...}}`` (Llama 4:
  ``<|python_start|>...<|python_end|>``), and ``<function=NAME>{...}</function>``;
- Mistral: ``[TOOL_CALLS][{...}, ...]``, and ``[TOOL_CALLS]NAME[ARGS]{...}`` (Mistral
  Small 3.2, Magistral, Devstral), one ``[TOOL_CALLS]`` per call;
- DeepSeek V3/R1 ``<|tool▁calls▁begin|><|tool▁call▁begin|>function<|tool▁sep|>NAME``
  with the arguments in a json fence, and V3.1's ``NAME<|tool▁sep|>{...}`` (the bars of
  DeepSeek's tokens are U+FF5C, fullwidth); the tokens are also read with ASCII bars and
  underscores (``<|tool_calls_begin|>``), as some servers detokenize them;
- a reply that is nothing but one JSON object naming a tool (``BareReply``), optionally
  in a json fence.

A closing tag is optional at the end of the message (models stop before it). Only names
of offered tools count, the arguments must be a JSON object (``lenient_json`` repairs),
and a block with one bad call is text as a whole.
"""

from __future__ import annotations

import re
from collections.abc import Container, Iterable
from dataclasses import dataclass
from itertools import product

from proxy.model_output.call_objects import (
    TextCall,
    call_from_object,
    calls_from_text,
    head,
    make_call,
    skip_space,
)
from proxy.model_output.lenient_json import ValueExtent, loads


@dataclass(frozen=True, slots=True)
class Accept:
    """A call (or several): they span the first ``consumed`` characters."""

    calls: list[TextCall]
    consumed: int


@dataclass(frozen=True, slots=True)
class Reject:
    """Not a call: the first ``release`` characters are text; scanning resumes after
    them."""

    release: int


PENDING = None
Decision = Accept | Reject | None

# --- the readers ----------------------------------------------------------------------


class Reader:
    """Reads one candidate: ``decide(text, final)`` is called with the whole text held
    since the candidate began, each time it has grown. ``release_on_reject`` is what is
    released when the candidate is given up without a decision (held too long)."""

    release_on_reject = 0

    def decide(self, text: str, final: bool) -> Decision:
        raise NotImplementedError


class JsonBody(Reader):
    """A JSON value after ``skip`` characters, then an optional closing tag. Without
    ``name`` the value is a call (or, with ``lists``, a list of calls); with it, the
    value is the arguments of a call to ``name``."""

    def __init__(
        self,
        skip: int,
        offered: Container[str],
        closers: tuple[str, ...] = (),
        *,
        lists: bool = True,
        name: str = "",
        release: int = -1,
    ) -> None:
        self.skip = skip
        self.offered = offered
        self.closers = closers
        self.lists = lists and not name
        self.name = name
        self.release_on_reject = skip if release < 0 else release
        self.start = -1
        self.known_head = bool(name)
        self.extent: ValueExtent | None = None

    def decide(self, text: str, final: bool) -> Decision:
        if self.start < 0:
            i = skip_space(text, self.skip)
            if i >= len(text):
                return self._not_yet(final)
            if text[i] != "{" and not (self.lists and text[i] == "["):
                return Reject(self.release_on_reject)
            self.start = i
        if not self.known_head:
            verdict = head(text, self.start, self.offered)
            if verdict is None:
                return self._not_yet(final)
            if not verdict:
                return Reject(self.release_on_reject)
            self.known_head = True
        if self.extent is None:
            self.extent = ValueExtent(self.start, self.closers[0] if self.closers else "")
        extent = self.extent
        if not extent.scan(text):
            if not final:
                return PENDING
            return self._calls(text[self.start :].rstrip(), len(text))
        if extent.closer_at >= 0:  # the value was cut short by the closing tag
            consumed = extent.closer_at + len(extent.closer)
            return self._calls(text[self.start : extent.closer_at].rstrip(), consumed)
        end = extent.end
        after = skip_space(text, end)
        rest = text[after:]
        for closer in self.closers:
            if rest.startswith(closer):
                return self._calls(text[self.start : end], after + len(closer))
        if not final and any(closer.startswith(rest) for closer in self.closers):
            return PENDING
        return self._calls(text[self.start : end], end)

    def _calls(self, body: str, consumed: int) -> Decision:
        if self.name:
            call = make_call(self.name, loads(body))
            calls = None if call is None else [call]
        else:
            calls = calls_from_text(body, self.offered)
        if calls is None or (len(calls) > 1 and not self.lists):
            return Reject(self.release_on_reject)
        return Accept(calls, consumed)

    def _not_yet(self, final: bool) -> Decision:
        return Reject(self.release_on_reject) if final else PENDING


_NAME = re.compile(r"[A-Za-z0-9_.:-]*")


def name_at(text: str, i: int, offered: Container[str], final: bool) -> tuple[str, int] | None:
    """The offered tool name at ``i`` and the index after it; ``("", i)`` while what
    came so far may still grow into one; None when it cannot be one."""
    end = _NAME.match(text, i).end()  # type: ignore[union-attr]
    name = text[i:end]
    if end >= len(text):
        # A directory that cannot list its names leaves the name to be finished.
        could = not isinstance(offered, Iterable) or any(t.startswith(name) for t in offered)
        return ("", i) if could and not final else None
    return (name, end) if name in offered else None


class FunctionTag(Reader):
    """Llama 3.1's ``<function=NAME>{...}</function>``."""

    opener = "<function="

    def __init__(self, offered: Container[str]) -> None:
        self.offered = offered
        self.release_on_reject = len(self.opener)
        self.body: JsonBody | None = None

    def decide(self, text: str, final: bool) -> Decision:
        if self.body is None:
            found = name_at(text, len(self.opener), self.offered, final)
            if found is None:
                return Reject(self.release_on_reject)
            name, end = found
            if not name:
                return PENDING
            if text[end] != ">":
                return Reject(self.release_on_reject)
            self.body = JsonBody(
                end + 1, self.offered, ("</function>",), name=name, release=len(self.opener)
            )
        return self.body.decide(text, final)


class MistralCalls(Reader):
    """``[TOOL_CALLS]`` then a JSON list of calls (or one call), or ``NAME[ARGS]{...}``
    (``NAME[CALL_ID]id[ARGS]{...}``, or ``NAME{...}``)."""

    opener = "[TOOL_CALLS]"
    release_on_reject = len(opener)
    _ARGS = "[ARGS]"
    _CALL_ID = "[CALL_ID]"

    def __init__(self, offered: Container[str]) -> None:
        self.offered = offered
        self.body: JsonBody | None = None

    def decide(self, text: str, final: bool) -> Decision:
        if self.body is None:
            body = self._body(text, final)
            if not isinstance(body, JsonBody):
                return body
            self.body = body
        return self.body.decide(text, final)

    def _body(self, text: str, final: bool) -> JsonBody | Decision:
        i = skip_space(text, len(self.opener))
        if i >= len(text):
            return Reject(self.release_on_reject) if final else PENDING
        if text[i] in "[{":
            return JsonBody(i, self.offered, release=self.release_on_reject)
        found = name_at(text, i, self.offered, final)
        if found is None:
            return Reject(self.release_on_reject)
        name, end = found
        if not name:
            return PENDING
        rest = text[end:]
        if rest.startswith(self._CALL_ID):
            args = text.find(self._ARGS, end)
            if args < 0:
                return Reject(self.release_on_reject) if final else PENDING
            return JsonBody(
                args + len(self._ARGS), self.offered, name=name, release=len(self.opener)
            )
        if rest.startswith(self._ARGS):
            return JsonBody(
                end + len(self._ARGS), self.offered, name=name, release=len(self.opener)
            )
        if rest.startswith("{"):
            return JsonBody(end, self.offered, name=name, release=len(self.opener))
        if not final and (self._ARGS.startswith(rest) or self._CALL_ID.startswith(rest)):
            return PENDING
        return Reject(self.release_on_reject)

    def _arguments(self, start: int, name: str) -> JsonBody:
        return JsonBody(start, self.offered, name=name, release=self.release_on_reject)


_BARS = "\uff5c|"  # DeepSeek's fullwidth bar, and the ASCII one


def _deepseek(*words: str) -> re.Pattern[str]:
    return re.compile(f"<[{_BARS}]tool[▁_ ]" + "[▁_ ]".join(words) + f"[{_BARS}]>")


_CALLS_BEGIN = _deepseek("calls", "begin")
_CALL_BEGIN = _deepseek("call", "begin")
_CALL_END = _deepseek("call", "end")
_CALLS_END = _deepseek("calls", "end")
_SEP = _deepseek("sep")
DEEPSEEK_OPENERS = tuple(
    f"<{bar}tool{space}{kind}{space}begin{bar}>"
    for bar, space, kind in product(_BARS, "▁_", ("calls", "call"))
)
_DEEPSEEK_AFTER = tuple(
    f"<{bar}tool{space}{kind}{space}{edge}{bar}>"
    for bar, space, (kind, edge) in product(_BARS, "▁_", (("calls", "end"), ("call", "begin")))
)
_LONGEST_TOKEN = max(len(token) for token in _DEEPSEEK_AFTER)
_V3_ITEM = re.compile(r"\s*(\S+?)\s*\n\s*```(?:json)?[ \t]*\n?(.*?)\s*```\s*\Z", re.DOTALL)


class DeepSeekCalls(Reader):
    """DeepSeek's tokens: ``<|tool▁calls▁begin|>`` (optional), calls between
    ``<|tool▁call▁begin|>`` and ``<|tool▁call▁end|>``, ``<|tool▁calls▁end|>`` (fullwidth
    bars, or ASCII ones)."""

    def __init__(self, opener: str, offered: Container[str]) -> None:
        self.offered = offered
        self.release_on_reject = len(opener)
        begin = _CALLS_BEGIN.match(opener)
        self.pos = begin.end() if begin else 0
        self.searched = 0
        self.calls: list[TextCall] = []

    def decide(self, text: str, final: bool) -> Decision:
        while True:
            i = skip_space(text, self.pos)
            begin = _CALL_BEGIN.match(text, i)
            if begin is None:
                rest = text[i:]
                if not final and any(token.startswith(rest) for token in _DEEPSEEK_AFTER):
                    return PENDING
                if not self.calls:
                    return Reject(self.release_on_reject)
                end = _CALLS_END.match(text, i)
                return Accept(self.calls, end.end() if end else self.pos)
            end = _CALL_END.search(text, max(begin.end(), self.searched))
            if end is None and not final:
                # Next time, search only what came since (less a token cut in two).
                self.searched = max(begin.end(), len(text) - _LONGEST_TOKEN)
                return PENDING
            item = text[begin.end() : end.start() if end else len(text)]
            call = self._call(item)
            if call is None:
                return Reject(self.release_on_reject)
            self.calls.append(call)
            self.pos = end.end() if end else len(text)
            self.searched = 0

    def _call(self, item: str) -> TextCall | None:
        sep = _SEP.search(item)
        if sep is None:
            return None
        kind, rest = item[: sep.start()].strip(), item[sep.end() :]
        if kind == "function":  # V3 and R1: the name on its line, the arguments fenced
            match = _V3_ITEM.match(rest)
            if match is None:
                return None
            name, arguments = match.group(1), match.group(2)
        else:  # V3.1: the name before the separator, the arguments after it
            name, arguments = kind, rest.strip()
        return make_call(name, loads(arguments)) if name in self.offered else None


_FENCE_OPEN = re.compile(r"```[ \t]*(?:json)?[ \t]*\r?\n", re.IGNORECASE)
_FENCE_OPENING = re.compile(r"`{1,3}|```[ \t]*(?:j(?:s(?:o(?:n)?)?)?)?[ \t]*\r?", re.IGNORECASE)
_FENCE_CLOSE = "```"


class BareReply(Reader):
    """A reply that is nothing but one JSON call object (Llama's ``{"name": ...,
    "parameters": ...}``, or a model copying the API's shape), optionally in a json
    fence. Read from the start of the message, leading whitespace included; decided at
    the end of the message, or as soon as anything but whitespace follows the object.
    Given up, its text is scanned again from the brace or the fence on."""

    def __init__(self, offered: Container[str]) -> None:
        self.offered = offered
        self.start = -1
        self.fenced = False
        self.known_head = False
        self.extent: ValueExtent | None = None

    def decide(self, text: str, final: bool) -> Decision:
        first = skip_space(text, 0)
        self.release_on_reject = first
        if self.start < 0:
            start = first
            if text.startswith("`", first):
                fence = _FENCE_OPEN.match(text, first)
                if fence is None:
                    opening = not final and _FENCE_OPENING.fullmatch(text, first)
                    return PENDING if opening else Reject(first)
                start = skip_space(text, fence.end())
                if start >= len(text):
                    return Reject(first) if final else PENDING
                self.fenced = True
            if text[start] != "{":
                return Reject(first)
            self.start = start
        if not self.known_head:
            verdict = head(text, self.start, self.offered)
            if verdict is None and not final:
                return PENDING
            if not verdict:
                return Reject(first)
            self.known_head = True
        if self.extent is None:
            self.extent = ValueExtent(self.start)
        if not self.extent.scan(text):
            if not final:
                return PENDING
            body = text[self.start :].rstrip()
            if self.fenced:
                body = body.removesuffix(_FENCE_CLOSE).rstrip()
            return self._call(body, len(text), first)
        end = self.extent.end
        after = text[end:].lstrip()
        if self.fenced and after.startswith(_FENCE_CLOSE):
            after = after[len(_FENCE_CLOSE) :].lstrip()
        elif self.fenced and not final and after and _FENCE_CLOSE.startswith(after):
            return PENDING
        if after:
            return Reject(first)
        return self._call(text[self.start : end], len(text), first) if final else PENDING

    def _call(self, body: str, consumed: int, first: int) -> Decision:
        call = call_from_object(loads(body), self.offered)
        return Reject(first) if call is None else Accept([call], consumed)


# --- the openers ----------------------------------------------------------------------

HERMES = "<tool_call>"
LM_STUDIO = "[TOOL_REQUEST]"
PYTHON_TAG = "<|python_tag|>"
PYTHON_START = "<|python_start|>"


def reader_for(opener: str, offered: Container[str]) -> Reader:
    """The reader of a candidate that begins with ``opener`` (one of ``OPENERS``)."""
    if opener == HERMES:
        return JsonBody(len(opener), offered, ("</tool_call>",))
    if opener == LM_STUDIO:
        return JsonBody(len(opener), offered, ("[END_TOOL_REQUEST]",))
    if opener == PYTHON_TAG:
        return JsonBody(len(opener), offered, ("<|eom_id|>", "<|eot_id|>"), lists=False)
    if opener == PYTHON_START:
        return JsonBody(len(opener), offered, ("<|python_end|>",), lists=False)
    if opener == FunctionTag.opener:
        return FunctionTag(offered)
    if opener == MistralCalls.opener:
        return MistralCalls(offered)
    return DeepSeekCalls(opener, offered)


OPENERS = (
    HERMES,
    LM_STUDIO,
    PYTHON_TAG,
    PYTHON_START,
    FunctionTag.opener,
    MistralCalls.opener,
    *DEEPSEEK_OPENERS,
)
