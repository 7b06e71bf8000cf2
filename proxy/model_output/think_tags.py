"""Thinking that models write in the content, in tags at its start, taken off as
reasoning: whole (``split_reasoning``) or delta by delta (``ReasoningSplitter``), with
the same result for every way a stream can be cut into deltas. Pure, sans-io.

``<think>...</think>`` (DeepSeek-R1 and its distills, Qwen3, QwQ) at the start of the
content, after optional whitespace, is reasoning; the answer is what follows the closing
tag. Other models name other tags (``ThinkTags``; a profile says which, and may name
several: the first one the content opens with counts). When the chat template opened the
tag itself (``opened``), the content starts inside the block (of the first variant) and
only the closing tag appears. Whitespace around the reasoning and before the answer is
dropped; a tag anywhere but at the start is text.

A block that never closes: cut by the length limit (``truncated``), it stays reasoning;
ended by the model, it is also the answer (it is all the answer there is), after having
been streamed as reasoning.

Plain content (not starting with the opening tag) passes at once; only what could be a
tag, cut by the end of a delta, and whitespace next to the reasoning are held back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


@dataclass(frozen=True, slots=True)
class ThinkTags:
    """The tags around a model's thinking."""

    open: str
    close: str


THINK = ThinkTags("<think>", "</think>")
THINKING = ThinkTags("<thinking>", "</thinking>")
THOUGHT = ThinkTags("<|begin_of_thought|>", "<|end_of_thought|>")  # Sky-T1, OpenThinker
SEED_THINK = ThinkTags("<seed:think>", "</seed:think>")  # Seed-OSS
MISTRAL_THINK = ThinkTags("[THINK]", "[/THINK]")  # Magistral

# The variants a configuration may name (``think_tags = ["think", "thinking"]``).
NAMED: dict[str, ThinkTags] = {
    "think": THINK,
    "thinking": THINKING,
    "thought": THOUGHT,
    "seed": SEED_THINK,
    "mistral": MISTRAL_THINK,
}

Variants = ThinkTags | tuple[ThinkTags, ...]


class Split(NamedTuple):
    """What may be released: reasoning first, then answer (never the other way). A
    named tuple: it is built for every delta, and a tuple is the cheapest to build."""

    reasoning: str = ""
    content: str = ""


_START, _REASONING, _BEFORE_ANSWER, _ANSWER = range(4)


class ReasoningSplitter:
    """Fed the content deltas of one message, returns the reasoning and the answer
    decided so far; ``finish`` returns the rest."""

    def __init__(self, tags: Variants = THINK, *, opened: bool = False) -> None:
        self.variants = (tags,) if isinstance(tags, ThinkTags) else tags
        self.tags = self.variants[0]  # the one in effect once a block opened
        self.opened = opened
        self._state = _START
        self._held = ""
        self._started = False  # past the whitespace that opens the reasoning
        self._reasoning: list[str] = []  # kept until the block closes
        # Text that starts with neither whitespace nor a tag's first character begins
        # the answer at once.
        self._tagged = all(t.open[:1] in ("<", "[") for t in self.variants)

    @property
    def answering(self) -> bool:
        """Whether the answer began: every later delta is answer, as it comes."""
        return self._state == _ANSWER

    @property
    def undecided(self) -> bool:
        """Whether nothing was read yet, and a first delta that starts with neither
        whitespace nor ``<`` or ``[`` would begin the answer."""
        return self._state == _START and not self._held and not self.opened and self._tagged

    def feed(self, delta: str) -> Split:
        if self._state == _ANSWER:  # the common case once the answer began
            return Split("", delta)
        self._held += delta
        return self._advance(final=False)

    def finish(self, *, truncated: bool) -> Split:
        """The rest; ``truncated`` when the message was cut by the length limit."""
        split = self._advance(final=True)
        if self._state != _REASONING:
            return split
        tail = self._held.rstrip()  # what was held as maybe the closing tag is text
        self._held = ""
        if truncated:
            return Split(split.reasoning + tail, split.content)
        # The model ended inside the block: it is also the answer.
        return Split(split.reasoning + tail, "".join(self._reasoning) + tail)

    def _advance(self, *, final: bool) -> Split:
        reasoning: list[str] = []
        content: list[str] = []
        while True:
            if self._state == _START:
                if not self._start(final):
                    break
            elif self._state == _REASONING:
                if not self._in_reasoning(reasoning):
                    break
            elif self._state == _BEFORE_ANSWER:
                self._held = self._held.lstrip()
                if not self._held:
                    break
                self._state = _ANSWER
            else:
                content.append(self._held)
                self._held = ""
                break
        return Split("".join(reasoning), "".join(content))

    def _start(self, final: bool) -> bool:
        """Whether the state moved on; holds whitespace and what may be the opening tag."""
        first = self._held.lstrip()
        for tags in self.variants:
            if first.startswith(tags.open):
                self.tags = tags
                self._held = first[len(tags.open) :]
                self._state = _REASONING
                return True
        if not final and (not first or any(t.open.startswith(first) for t in self.variants)):
            return False
        if self.opened:
            self._state = _REASONING
        else:
            self._state = _ANSWER
        return True

    def _in_reasoning(self, out: list[str]) -> bool:
        """Whether the block closed; releases what cannot be the closing tag."""
        if not self._started:
            self._held = self._held.lstrip()
            if not self._held:
                return False
            self._started = True
        held, closing = self._held, self.tags.close
        end = held.find(closing)
        if end >= 0:
            self._emit(out, held[:end].rstrip())
            self._held = held[end + len(closing) :]
            self._reasoning.clear()
            self._state = _BEFORE_ANSWER
            return True
        cut = len(held) - _partial_suffix(held, closing)
        cut = len(held[:cut].rstrip())  # whitespace may be the last before the tag
        self._emit(out, held[:cut])
        self._held = held[cut:]
        return False

    def _emit(self, out: list[str], text: str) -> None:
        if text:
            out.append(text)
            self._reasoning.append(text)


def _partial_suffix(text: str, tag: str) -> int:
    """The length of the longest end of ``text`` that begins ``tag`` (0 for none)."""
    start = max(0, len(text) - len(tag) + 1)
    first = text.find(tag[0], start)
    while first >= 0:
        if tag.startswith(text[first:]):
            return len(text) - first
        first = text.find(tag[0], first + 1)
    return 0


def split_reasoning(
    content: str, tags: Variants = THINK, *, opened: bool = False, truncated: bool = False
) -> tuple[str, str]:
    """The reasoning and the answer of a whole message's ``content``."""
    splitter = ReasoningSplitter(tags, opened=opened)
    first = splitter.feed(content)
    last = splitter.finish(truncated=truncated)
    return first.reasoning + last.reasoning, first.content + last.content
