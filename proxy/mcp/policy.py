"""What a tool loop does with the MCP calls of each round: run them, answer a repeat
from the first result, refuse calls past the budget, and say when the next round must
be the final answer. Pure: one state machine that both APIs' loops drive, the chat
completions loop (``proxy.mcp.loop``) and the Responses service.

In call order, each call the model makes in a round is first ``admit``ted against
``max_tool_calls`` (a call past it is answered "not run", so a round with more calls
than the budget left runs only those within it), then ``decide``d: arguments that are
not a JSON object and a call identical to an earlier one (same tool, same arguments)
are answered without running; anything else is run, and its output ``remember``ed.
After the round, ``must_finish`` says whether ``max_rounds`` or the budget is reached;
the loop then asks for the answer once more with ``tool_choice: "none"``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from proxy.jsontext import JSONDecodeError, loads
from proxy.mcp.results import ToolOutput, error_output

LIMIT_NOTE = (
    "The tool-call limit of this request is reached: answer now with what you have, "
    "without calling more tools."
)
OVER_BUDGET = "not run: the tool-call limit of this request is reached"
REPEAT_NOTE = (
    "\n[lmbridge: same call with the same arguments as before in this request; this is "
    "that call's result, not run again]"
)


@dataclass(frozen=True, slots=True)
class Run:
    """Run the tool with these arguments, then ``remember`` its output."""

    arguments: dict[str, Any]
    key: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Answered:
    """Answered without running the tool."""

    output: ToolOutput
    repeated: bool = False


Decision = Run | Answered


class LoopPolicy:
    def __init__(self, *, max_rounds: int, max_tool_calls: int) -> None:
        self.max_rounds = max_rounds
        self.max_tool_calls = max_tool_calls
        self.rounds = 0
        self.calls = 0
        self._results: dict[tuple[str, str], ToolOutput] = {}

    def next_round(self) -> None:
        self.rounds += 1

    def admit(self) -> bool:
        """Whether the next call of the round is within the budget (and counts it)."""
        if self.calls >= self.max_tool_calls:
            return False
        self.calls += 1
        return True

    def decide(self, name: str, arguments_text: str) -> Decision:
        try:
            arguments = loads(arguments_text or "{}")
        except JSONDecodeError as exc:
            return Answered(
                error_output(
                    f"the arguments are not valid JSON ({exc.msg}); send a JSON object that "
                    "matches the tool's schema"
                )
            )
        if not isinstance(arguments, dict):
            return Answered(error_output("the arguments must be a JSON object"))
        key = (name, json.dumps(arguments, sort_keys=True))
        earlier = self._results.get(key)
        if earlier is not None:
            output = ToolOutput(earlier.text + REPEAT_NOTE, earlier.is_error, earlier.images)
            return Answered(output, repeated=True)
        return Run(arguments, key)

    def remember(self, run: Run, output: ToolOutput) -> None:
        self._results[run.key] = output

    @staticmethod
    def over_budget() -> ToolOutput:
        return error_output(OVER_BUDGET)

    def must_finish(self) -> bool:
        """After a round that ran tools: the next reply must be the answer."""
        return self.rounds >= self.max_rounds or self.calls >= self.max_tool_calls
