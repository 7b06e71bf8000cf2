"""The request-path metrics are exposed exactly as prometheus-client's own types would
expose the same observations (they only skip its lock)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from proxy.metrics import _LATENCY_BUCKETS, Metrics

OBSERVATIONS = [0.0004, 0.001, 0.0011, 0.3, 2.5, 7.0, 500.0]


def _lines(text: bytes, prefix: str) -> list[str]:
    return sorted(
        line
        for line in text.decode().splitlines()
        if line.startswith(prefix) and "_created" not in line
    )


def test_exposition_matches_prometheus_client() -> None:
    metrics = Metrics()
    reference = CollectorRegistry()
    requests = Counter("lmbridge_requests", "x", ["route", "model", "status"], registry=reference)
    duration = Histogram(
        "lmbridge_request_duration_seconds",
        "x",
        ["route"],
        buckets=_LATENCY_BUCKETS,
        registry=reference,
    )
    tokens = Counter("lmbridge_tokens", "x", ["model", "direction"], registry=reference)
    for i, seconds in enumerate(OBSERVATIONS):
        status = 200 if i % 3 else 404
        metrics.count_request("/v1/chat/completions", "m", status, seconds)
        requests.labels("/v1/chat/completions", "m", str(status)).inc()
        duration.labels("/v1/chat/completions").observe(seconds)
        metrics.record_tokens("m", i, 2 * i)
        if i:
            tokens.labels("m", "in").inc(i)
            tokens.labels("m", "out").inc(2 * i)

    ours, theirs = metrics.render(), generate_latest(reference)
    for prefix in (
        "lmbridge_requests_total",
        "lmbridge_request_duration_seconds",
        "lmbridge_tokens_total",
    ):
        assert _lines(ours, prefix) == _lines(theirs, prefix), prefix
    assert 'lmbridge_request_duration_seconds_bucket{le="0.001",' in ours.decode()


def test_in_flight_is_exposed_and_read() -> None:
    metrics = Metrics()
    metrics.in_flight += 2
    assert metrics.requests_in_flight() == 2
    assert "lmbridge_requests_in_flight 2.0" in metrics.render().decode()


def test_a_histogram_counts_each_label_set_apart() -> None:
    metrics = Metrics()
    metrics.observe_upstream("/v1/responses", 0.01)
    metrics.observe_upstream("/v1/responses", 0.02)
    metrics.observe_upstream("/v1/embeddings", 0.01)
    text = metrics.render().decode()
    assert 'lmbridge_upstream_duration_seconds_count{route="/v1/responses"} 2.0' in text
    assert 'lmbridge_upstream_duration_seconds_count{route="/v1/embeddings"} 1.0' in text
