"""Prometheus metrics, on a registry owned by one app (never the global one).

Label values are bounded: ``route`` is the route's template (``/v1/models/{id}``),
not the raw path, and ``model`` is a model the upstream actually listed or
``"-"`` so that clients cannot grow the series without limit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0,
)  # fmt: skip


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "lmbridge_requests",
            "Requests answered, by route, model and status.",
            ["route", "model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "lmbridge_request_duration_seconds",
            "Time from request received to response complete (whole stream included).",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.upstream_seconds = Histogram(
            "lmbridge_upstream_duration_seconds",
            "Time from sending a request upstream to its response headers.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft_seconds = Histogram(
            "lmbridge_time_to_first_token_seconds",
            "Streams: time from request received to the first data event relayed.",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "lmbridge_tokens",
            "Tokens reported by the upstream's usage, by model and direction (in, out).",
            ["model", "direction"],
            registry=r,
        )
        self.in_flight = Gauge(
            "lmbridge_requests_in_flight", "Requests being handled now.", registry=r
        )
        self.retries = Counter(
            "lmbridge_upstream_retries", "Upstream attempts retried.", ["reason"], registry=r
        )
        self.upstream_failures = Counter(
            "lmbridge_upstream_failures",
            "Upstream attempts that failed (connection, timeout, 502/503/504).",
            ["reason"],
            registry=r,
        )
        self.circuit_state = Gauge(
            "lmbridge_circuit_state",
            "Upstream circuit breaker: 0 closed, 1 half-open, 2 open.",
            ["upstream"],
            registry=r,
        )
        self.mcp_calls = Counter(
            "lmbridge_mcp_tool_calls",
            "MCP tool calls, by server, tool and outcome (ok, tool_error, timeout, "
            "unavailable, error).",
            ["server", "tool", "outcome"],
            registry=r,
        )
        self.mcp_call_seconds = Histogram(
            "lmbridge_mcp_tool_call_duration_seconds",
            "Duration of MCP tool calls.",
            ["server"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.mcp_restarts = Counter(
            "lmbridge_mcp_server_restarts",
            "Times an MCP server's connection was lost or failed and was started again.",
            ["server"],
            registry=r,
        )
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._duration_children: dict[str, Any] = {}
        self.model_list_refreshes = Counter(
            "lmbridge_model_list_refreshes",
            "Reads of the upstream's model list, by outcome.",
            ["outcome"],
            registry=r,
        )

    def watch_storage(self, stats: Callable[[], tuple[int, int]]) -> None:
        """Export the store's group-commit counters, read at scrape time."""
        registry = self.registry

        class StorageCollector(Collector):
            def collect(self) -> Iterable[Metric]:
                writes, transactions = stats()
                yield CounterMetricFamily(
                    "lmbridge_storage_writes", "Writes committed to the database.", writes
                )
                yield CounterMetricFamily(
                    "lmbridge_storage_transactions",
                    "Transactions (group commits) that committed them.",
                    transactions,
                )

        registry.register(StorageCollector())

    def watch_mcp(self, states: Callable[[], dict[str, bool]]) -> None:
        """Export whether each MCP server is connected, read at scrape time."""

        class MCPCollector(Collector):
            def collect(self) -> Iterable[Metric]:
                family = GaugeMetricFamily(
                    "lmbridge_mcp_server_up",
                    "1 when the MCP server is connected, 0 otherwise.",
                    labels=["server"],
                )
                for name, up in states().items():
                    family.add_metric([name], 1.0 if up else 0.0)
                yield family

        self.registry.register(MCPCollector())

    def count_request(self, route: str, model: str, status: int, seconds: float) -> None:
        # Label lookups cost microseconds each; the children are cached per label set.
        key = (route, model, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(route, model, str(status))
        counter.inc()
        histogram = self._duration_children.get(route)
        if histogram is None:
            histogram = self._duration_children[route] = self.request_seconds.labels(route)
        histogram.observe(seconds)

    def requests_in_flight(self) -> int:
        return int(next(iter(self.in_flight.collect())).samples[0].value)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def record_usage(self, model: str, usage: object) -> None:
        if not isinstance(usage, dict):
            return
        prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
        completion = usage.get("completion_tokens", usage.get("output_tokens"))
        self.record_tokens(
            model,
            prompt if isinstance(prompt, int) else 0,
            completion if isinstance(completion, int) else 0,
        )

    def record_tokens(self, model: str, prompt: int, completion: int) -> None:
        if prompt > 0:
            self._child(self.tokens, (model, "in")).inc(prompt)
        if completion > 0:
            self._child(self.tokens, (model, "out")).inc(completion)

    def observe_upstream(self, route: str, seconds: float) -> None:
        self._child(self.upstream_seconds, (route,)).observe(seconds)

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child
