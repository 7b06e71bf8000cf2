"""What reading model output costs per content delta: the text-call recogniser and the
think splitter (``proxy.model_output``) fed plain text and a tool call written as text,
in deltas the size of tokens. A micro-benchmark in this process, no server; not wired
into ``lmbridge bench`` yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Protocol

from proxy.model_output.text_calls import TextCallRecogniser
from proxy.model_output.think_tags import ReasoningSplitter

OFFERED = frozenset({"get_weather", "read_file", "write_file", "run_shell"})

_PROSE = (
    "The weather in Paris is mild today, with a light breeze from the west. "
    "Temperatures stay between 14 and 19 degrees, and rain is unlikely before the evening. "
    "If you plan to walk along the river, a light jacket will do."
)
_MARKDOWN = (
    "Use `pathlib.Path` rather than `os.path`:\n\n```python\nfrom pathlib import Path\n"
    'for p in Path("src").glob("*.py"):\n    print(p.name)  # [1] <see docs>\n```\n'
    "See [the docs](https://docs.python.org/3/library/pathlib.html) for more.\n"
)
_CALL = (
    "Let me look that up.\n<tool_call>\n"
    '{"name": "write_file", "arguments": {"path": "notes/weather.md", "content": "'
    + "Paris: mild, 14 to 19 degrees, light west wind. " * 8
    + '"}}\n</tool_call>'
)


def token_deltas(text: str, size: int = 4) -> list[str]:
    """``text`` cut the way a stream carries it: a few characters per delta."""
    return [text[i : i + size] for i in range(0, len(text), size)]


class _Reader(Protocol):
    def feed(self, delta: str) -> object: ...


def per_delta_cost(
    deltas: Sequence[str], make: Callable[[], _Reader], *, rounds: int = 30
) -> float:
    """Microseconds per delta, the best of ``rounds`` passes over ``deltas`` (each with
    a fresh reader, built outside the timing)."""
    best = float("inf")
    for _ in range(rounds):
        reader = make()
        feed = reader.feed
        start = time.perf_counter_ns()
        for delta in deltas:
            feed(delta)
        best = min(best, time.perf_counter_ns() - start)
    return best / 1000 / len(deltas)


def measure(rounds: int = 30) -> dict[str, float]:
    """Microseconds per delta for each case, and for a loop that does nothing."""
    plain = token_deltas(_PROSE * 20)
    call = token_deltas(_CALL)

    class Nothing:
        def feed(self, delta: str) -> object:
            return delta

    return {
        "baseline (a call that returns its delta)": per_delta_cost(plain, Nothing, rounds=rounds),
        "text calls, plain text": per_delta_cost(
            plain, lambda: TextCallRecogniser(OFFERED), rounds=rounds
        ),
        "text calls, markdown with code and links": per_delta_cost(
            token_deltas(_MARKDOWN * 10), lambda: TextCallRecogniser(OFFERED), rounds=rounds
        ),
        "text calls, a tool call stream": per_delta_cost(
            call, lambda: TextCallRecogniser(OFFERED), rounds=rounds
        ),
        "think tags, plain text": per_delta_cost(plain, ReasoningSplitter, rounds=rounds),
        "think tags, reasoning": per_delta_cost(
            ["<think>\n", *plain], ReasoningSplitter, rounds=rounds
        ),
    }


if __name__ == "__main__":
    for case, micros in measure().items():
        print(f"{case:45} {micros:6.2f} µs/delta")
