"""Which upstream serves a model call when several could, and where a failed call goes
next. Pure: fed what the router knows now, returns decisions.

- ``merge``: the model catalogue as the union of the upstreams' lists, each model once,
  with the upstreams that list it, in the configuration's order.
- ``rank``: the upstreams that have a model, best first: one whose circuit is closed,
  then one that has the model loaded (no load to wait for), then the least busy, then
  the configuration's order (so that equal upstreams are tried the way the operator
  listed them).
- ``model_chain``: the model asked for, then its configured fallbacks (``models.fallbacks``),
  breadth first, each once.
- ``may_fall_back``: whether a failure may be tried elsewhere. Only failures that happen
  before anything reached the client qualify, and only those another server could avoid:
  a refused connection, a timeout waiting for the first byte, an open circuit, a 5xx or a
  429 of the upstream, a load that failed. A 4xx is the request's own fault and would
  fail anywhere.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

from proxy.errors import (
    CircuitOpen,
    LMBridgeError,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from proxy.model_records import ModelInfo

__all__ = ["Placement", "may_fall_back", "merge", "model_chain", "rank"]


@dataclass(frozen=True, slots=True)
class Placement:
    """One upstream that lists a model, as the router sees it at the moment of a call."""

    upstream: str
    order: int  # the upstream's place in the configuration
    loaded: bool
    running: int = 0
    queued: int = 0
    limit: int | None = None  # the model's max_concurrent there, None: no limit
    circuit_open: bool = False

    @property
    def busy(self) -> float:
        """How full the model is there: requests per slot, or requests when unlimited."""
        waiting = self.running + self.queued
        return waiting / self.limit if self.limit else float(waiting)


def rank(placements: Iterable[Placement]) -> list[Placement]:
    return sorted(placements, key=lambda p: (p.circuit_open, not p.loaded, p.busy, p.order))


def merge(lists: Sequence[tuple[str, Sequence[ModelInfo]]]) -> list[ModelInfo]:
    """Each model once, as the first upstream (in configuration order) lists it, with
    ``upstreams`` naming every upstream that lists it; loaded when loaded anywhere."""
    merged: dict[str, ModelInfo] = {}
    where: dict[str, list[str]] = {}
    for name, models in lists:
        for model in models:
            first = merged.get(model.id)
            if first is None:
                merged[model.id] = model
                where[model.id] = [name]
                continue
            if name not in where[model.id]:
                where[model.id].append(name)
            if model.state == "loaded" and first.state != "loaded":
                merged[model.id] = replace(first, state="loaded")
    return [replace(model, upstreams=tuple(where[model.id])) for model in merged.values()]


def model_chain(model: str, fallbacks: Mapping[str, Sequence[str]]) -> list[str]:
    """``model`` and the models to try after it, nearest fallbacks first, each once (a
    fallback's own fallbacks come after its siblings; a cycle ends where it closes)."""
    chain = [model]
    for current in chain:  # grows while it is walked: breadth first
        for fallback in fallbacks.get(current, ()):
            if fallback not in chain:
                chain.append(fallback)
    return chain


def may_fall_back(error: LMBridgeError) -> bool:
    """Whether a call that failed this way, before anything reached the client, may be
    sent to another upstream or model."""
    if isinstance(error, UpstreamStatus):
        return error.status >= 500 or error.status == 429
    return isinstance(error, UpstreamUnavailable | UpstreamTimeout | CircuitOpen) or (
        error.code == "model_load_failed"
    )
