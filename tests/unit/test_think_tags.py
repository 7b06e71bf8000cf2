"""Thinking in tags at the start of the content, taken off as reasoning, as tables (the
real outputs of tests/fixtures/model_outputs/think.json run in test_text_calls.py)."""

from __future__ import annotations

import itertools

import pytest

from proxy.model_output.think_tags import (
    MISTRAL_THINK,
    THINK,
    THINKING,
    THOUGHT,
    ReasoningSplitter,
    Split,
    ThinkTags,
    split_reasoning,
)


def stream(content: str, cuts: list[int], tags: ThinkTags = THINK, **options: bool) -> Split:
    truncated = options.pop("truncated", False)
    splitter = ReasoningSplitter(tags, **options)
    edges = [0, *cuts, len(content)]
    parts = [splitter.feed(content[a:b]) for a, b in itertools.pairwise(edges)]
    parts.append(splitter.finish(truncated=truncated))
    return Split("".join(p.reasoning for p in parts), "".join(p.content for p in parts))


CASES = [
    # (content, tags, options, reasoning, answer)
    ("<think>\nPlan.\n</think>\n\nAnswer.", THINK, {}, "Plan.", "Answer."),
    ("  \n<think>a</think>b", THINK, {}, "a", "b"),
    ("<think></think>", THINK, {}, "", ""),
    ("No thinking here.", THINK, {}, "", "No thinking here."),
    ("  leading space kept", THINK, {}, "", "  leading space kept"),
    ("Answer with <think>late</think> tag", THINK, {}, "", "Answer with <think>late</think> tag"),
    ("<thinker>", THINK, {}, "", "<thinker>"),
    ("<thi", THINK, {}, "", "<thi"),
    ("<thinking>\nhmm\n</thinking>\nYes.", THINKING, {}, "hmm", "Yes."),
    ("<|begin_of_thought|>\n\nsteps\n\n<|end_of_thought|>\n\n42", THOUGHT, {}, "steps", "42"),
    ("[THINK]short[/THINK]Done.", MISTRAL_THINK, {}, "short", "Done."),
    # the template opened the tag: the content starts inside the block
    ("So the user wants x.\n</think>\n\nx.", THINK, {"opened": True}, "So the user wants x.", "x."),
    ("<think>\nrepeated tag\n</think>ok", THINK, {"opened": True}, "repeated tag", "ok"),
    # a block that never closes: cut by the length limit it stays reasoning ...
    (
        "<think>\nstill thinking about </th",
        THINK,
        {"truncated": True},
        "still thinking about </th",
        "",
    ),
    # ... ended by the model, it is also the answer
    ("<think>\nthe JSON {}\n", THINK, {"truncated": False}, "the JSON {}", "the JSON {}"),
    ("all of it, no tag", THINK, {"opened": True, "truncated": True}, "all of it, no tag", ""),
    ("all of it, no tag", THINK, {"opened": True}, "all of it, no tag", "all of it, no tag"),
    ("", THINK, {}, "", ""),
    ("", THINK, {"opened": True}, "", ""),
]


@pytest.mark.parametrize(("content", "tags", "options", "reasoning", "answer"), CASES)
def test_split_reasoning(content, tags, options, reasoning, answer):
    """Whole: the reasoning at the start and the answer after it."""
    assert split_reasoning(content, tags, **options) == (reasoning, answer)


@pytest.mark.parametrize(("content", "tags", "options", "reasoning", "answer"), CASES)
def test_every_cut_gives_the_same_split(content, tags, options, reasoning, answer):
    """Cut at every boundary, in two and into single characters, a stream gives what
    the whole message gives."""
    for at in range(1, len(content)):
        assert stream(content, [at], tags, **options) == Split(reasoning, answer), at
    assert stream(content, list(range(1, len(content))), tags, **options) == Split(
        reasoning, answer
    )


def test_plain_content_passes_at_once():
    """Content that does not start with the tag is released from the first delta."""
    splitter = ReasoningSplitter(THINK)
    assert splitter.feed("Hello") == Split(content="Hello")
    assert splitter.feed(" world") == Split(content=" world")
    assert splitter.finish(truncated=False) == Split()


def test_reasoning_streams_and_holds_only_a_possible_tag():
    """Reasoning is released as it comes; only what may be the closing tag (and the
    whitespace before it) waits; the answer follows without its leading whitespace."""
    splitter = ReasoningSplitter(THINK)
    assert splitter.feed("<thi") == Split()
    assert splitter.feed("nk>\nFirst") == Split(reasoning="First")
    assert splitter.feed(" idea.\n</th") == Split(reasoning=" idea.")
    assert splitter.feed("ink>\n\n") == Split()
    assert splitter.feed("Answer") == Split(content="Answer")
    assert splitter.finish(truncated=False) == Split()
