"""Real outputs of real models, as stored in ``tests/fixtures/model_outputs/``, and the
pipeline lmbridge runs them through (thinking off the front, then calls out of the
answer), whole or delta by delta.

Each fixture names its ``source`` (the public issue, model card or file where the output
was seen), the ``model``, the ``format``, the ``offered`` tool names, the ``content`` and
the ``expected`` calls and text (and ``reasoning`` when ``think`` tags apply)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.model_output.text_calls import TextCallRecogniser
from proxy.model_output.think_tags import ReasoningSplitter, ThinkTags

FIXTURES = Path(__file__).parent / "fixtures" / "model_outputs"


def load() -> list[dict[str, Any]]:
    fixtures: list[dict[str, Any]] = []
    for path in sorted(FIXTURES.glob("*.json")):
        fixtures.extend(json.loads(path.read_text()))
    return fixtures


@dataclass(frozen=True)
class Outcome:
    reasoning: str
    calls: list[tuple[str, Any]]  # name and parsed arguments
    text: str


def expected(fixture: dict[str, Any]) -> Outcome:
    wanted = fixture["expected"]
    calls = [(c["name"], c["arguments"]) for c in wanted["calls"]]
    return Outcome(wanted.get("reasoning") or "", calls, wanted["text"])


def run(fixture: dict[str, Any], deltas: Iterable[str], *, max_held: int | None = None) -> Outcome:
    """The fixture's content fed delta by delta through the think splitter (when it has
    tags) and the call recogniser, as a stream would be."""
    think = fixture.get("think")
    kwargs = {} if max_held is None else {"max_held": max_held}
    recogniser = TextCallRecogniser(fixture["offered"], **kwargs)
    splitter = None
    if think:
        tags = ThinkTags(think["open"], think["close"])
        splitter = ReasoningSplitter(tags, opened=think["opened"])
    reasoning: list[str] = []
    pieces: list[Any] = []
    for delta in deltas:
        if splitter is None:
            pieces += recogniser.feed(delta)
            continue
        split = splitter.feed(delta)
        reasoning.append(split.reasoning)
        pieces += recogniser.feed(split.content)
    if splitter is not None:
        split = splitter.finish(truncated=think["truncated"])
        reasoning.append(split.reasoning)
        pieces += recogniser.feed(split.content)
    pieces += recogniser.finish()
    text = "".join(p for p in pieces if isinstance(p, str))
    calls = [(c.name, json.loads(c.arguments)) for c in recogniser.calls]
    assert calls == [(p.name, json.loads(p.arguments)) for p in pieces if not isinstance(p, str)]
    return Outcome("".join(reasoning), calls, text)
