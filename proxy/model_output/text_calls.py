"""Tool calls that models write as text in the content, turned into calls: whole
(``split``) or delta by delta (``TextCallRecogniser``), with the same result for every
way a stream can be cut into deltas. Pure, sans-io: fed text, returns text and calls.

The recogniser releases text as soon as it cannot be the start of a call. Plain text
(no tag, no leading ``{``) passes at once; what could be an opening tag (a ``<`` or
``[`` at the end of a delta) is held until the next delta tells; what begins like a call
is held until its reader (``call_formats``) decides, or until ``max_held`` characters
are held, or until the end of the message. Text that is not a call comes out unchanged
and in order.

False positives stay text: a tag inside a code block or an inline code span, JSON that
does not name an offered tool (decided from its first key, so that a JSON answer streams
on), a name that was not offered, a tag with no call after it. Whitespace right after a
call is dropped (it separated calls, or ended the message); text before it is kept.
"""

from __future__ import annotations

import re
from collections.abc import Container

from proxy.model_output.call_formats import OPENERS, Accept, BareReply, Reader, Reject, reader_for
from proxy.model_output.call_objects import TextCall

__all__ = ["DEFAULT_MAX_HELD", "Piece", "TextCall", "TextCallRecogniser", "split"]

# Calls that write a file carry the file: 64K characters is a long file, and only what
# began like a call (a tag, a leading brace) is ever held that long.
DEFAULT_MAX_HELD = 65536

Piece = str | TextCall

_START, _SCAN, _CANDIDATE = range(3)
_PLAIN, _INLINE_CODE, _FENCED_CODE = range(3)

# Where something may begin that is not plain text, in each code state.
_SPECIAL = {
    _PLAIN: re.compile(r"[<\[`]"),
    _INLINE_CODE: re.compile(r"[`\n]"),
    _FENCED_CODE: re.compile(r"`"),
}
_BY_FIRST: dict[str, tuple[str, ...]] = {}
for _opener in OPENERS:
    _BY_FIRST[_opener[0]] = (*_BY_FIRST.get(_opener[0], ()), _opener)
_LONGEST_OPENER = max(len(opener) for opener in OPENERS)


class TextCallRecogniser:
    """Fed the content deltas of one message (``feed``), returns what may be released
    now: text, and calls as each is complete, in order; ``finish`` at the end of the
    message returns the rest. ``offered`` are the names of the tools offered to the
    model."""

    def __init__(self, offered: Container[str], *, max_held: int | None = DEFAULT_MAX_HELD):
        self.offered = offered
        self.max_held = max_held
        self.calls: list[TextCall] = []
        self._held = ""
        self._state = _START
        self._code = _PLAIN
        self._code_run = 0
        self._reader: Reader | None = None
        self._after_call = False
        self._leading = ""  # whitespace that opened the message, dropped if a call follows

    @property
    def passing(self) -> bool:
        """Whether a delta without ``<``, ``[`` and backticks would pass as it is: nothing
        is held and the text is plain (not in code, not at the start, not after a call)."""
        return (
            self._state == _SCAN
            and not self._held
            and not self._after_call
            and self._code == _PLAIN
        )

    @property
    def at_start(self) -> bool:
        """Whether nothing was read yet."""
        return self._state == _START and not self._held

    def plain_start(self) -> None:
        """The message began with plain text, neither whitespace nor a brace, a tag or a
        fence, which passes as it is: read the way ``_start`` would, without the text."""
        self._state = _SCAN

    def feed(self, delta: str) -> list[Piece]:
        """What may be released once ``delta`` is added."""
        plain = self._state == _SCAN and not self._held and not self._after_call
        if plain and _SPECIAL[self._code].search(delta) is None:
            # The common case, plain text: no copy, no hold-back.
            return [delta] if delta else []
        self._held += delta
        return self._advance(final=False)

    def finish(self) -> list[Piece]:
        """What is left at the end of the message: calls finished by the end, and text."""
        return self._advance(final=True)

    # --- the state machine -----------------------------------------------------------

    def _advance(self, *, final: bool) -> list[Piece]:
        out: list[Piece] = []
        while self._held:
            if self._state == _START:
                done = self._start(final)
            elif self._state == _CANDIDATE:
                done = self._candidate(out, final)
            else:
                done = self._scan(out, final)
            if done:
                break
        return out

    def _start(self, final: bool) -> bool:
        """The start of the message: whitespace is held (it may come before a bare JSON
        call), then a brace or a fence may be one."""
        first = self._held.lstrip()
        spaces = len(self._held) - len(first)
        too_long = self.max_held is not None and spaces > self.max_held
        if (final and not first) or too_long:  # held whitespace is bounded too
            self._state = _SCAN
            return False
        if not first:
            return True
        if first[0] in "{`":
            self._begin(BareReply(self.offered))
            return False
        self._state = _SCAN
        if first[0] in "<[":  # maybe a tag: the whitespace before it waits for the verdict
            self._leading = self._held[: len(self._held) - len(first)]
            self._held = first
        return False

    def _scan(self, out: list[Piece], final: bool) -> bool:
        held = self._held
        if self._after_call:
            rest = _after_call(held, final)
            if rest is None:  # maybe an end-of-turn token, cut by the delta
                return True
            if not rest and not final:
                self._held = ""
                return True
            self._after_call = False
            held = rest
        match = _SPECIAL[self._code].search(held)
        if match is None:
            self._release(out, held, len(held))
            return True
        at = match.start()
        char = held[at]
        if char == "`":
            run = len(held) - at - len(held[at:].lstrip("`"))
            if at + run == len(held) and not final:  # the run of backticks may go on
                self._release(out, held, at)
                return True
            self._code_span(run)
            self._release(out, held, at + run)
            return False
        if char == "\n":  # an inline code span ends with its line
            self._code = _PLAIN
            self._release(out, held, at + 1)
            return False
        self._release(out, held, at)
        held = self._held
        for opener in _BY_FIRST.get(char, ()):
            if held.startswith(opener):
                self._begin(reader_for(opener, self.offered))
                return False
        if (
            not final
            and len(held) < _LONGEST_OPENER
            and any(o.startswith(held) for o in _BY_FIRST[char])
        ):
            return True  # maybe an opening tag, cut by the end of the delta
        self._release(out, held, 1)
        return False

    def _code_span(self, run: int) -> None:
        """Backticks: a run of three or more opens or closes a fenced block; a shorter
        run opens an inline span, closed by a run of the same length."""
        if self._code == _FENCED_CODE:
            if run >= 3:
                self._code = _PLAIN
        elif self._code == _INLINE_CODE:
            if run == self._code_run:
                self._code = _PLAIN
        elif run >= 3:
            self._code = _FENCED_CODE
        else:
            self._code, self._code_run = _INLINE_CODE, run

    def _begin(self, reader: Reader) -> None:
        self._reader = reader
        self._state = _CANDIDATE

    def _candidate(self, out: list[Piece], final: bool) -> bool:
        reader = self._reader
        assert reader is not None
        held = self._held
        bounded = self.max_held is not None and len(held) > self.max_held
        # Judged on at most max_held characters, so that where the deltas were cut
        # cannot change when a long candidate is given up.
        view = held[: self.max_held] if bounded else held
        decision = reader.decide(view, final and not bounded)
        if decision is None:
            if not bounded:
                return True
            decision = Reject(reader.release_on_reject)
        self._reader = None
        self._state = _SCAN
        if isinstance(decision, Accept):
            self._leading = ""
            self.calls.extend(decision.calls)
            out.extend(decision.calls)
            self._held = held[decision.consumed :]
            self._after_call = True
            return False
        self._release(out, held, decision.release)
        return False

    def _release(self, out: list[Piece], held: str, upto: int) -> None:
        """Release ``held[:upto]`` as text; ``held[upto:]`` stays held."""
        if upto:
            text = held[:upto]
            if self._leading:
                text, self._leading = self._leading + text, ""
            if out and isinstance(out[-1], str):
                out[-1] += text
            else:
                out.append(text)
        self._held = held[upto:]


# End-of-turn tokens some servers leave in the content; right after a call they end it.
_END_TOKENS = (
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<\uff5cend\u2581of\u2581sentence\uff5c>",  # DeepSeek's, with fullwidth bars
    "</s>",
)


def _after_call(held: str, final: bool) -> str | None:
    """``held`` without the whitespace and end-of-turn tokens that follow a call; None
    while what is held may still be the start of such a token."""
    while True:
        held = held.lstrip()
        for token in _END_TOKENS:
            if held.startswith(token):
                held = held[len(token) :]
                break
        else:
            if not final and held and any(token.startswith(held) for token in _END_TOKENS):
                return None
            return held


def split(
    content: str, offered: Container[str], *, max_held: int | None = None
) -> tuple[list[TextCall], str]:
    """The calls written in a whole message's ``content`` and the text left around
    them (as the recogniser would release it, fed the message in one delta)."""
    recogniser = TextCallRecogniser(offered, max_held=max_held)
    pieces = [*recogniser.feed(content), *recogniser.finish()]
    return recogniser.calls, "".join(p for p in pieces if isinstance(p, str))
