"""The per-delta micro-benchmark of the model output readers runs and reports each
case (its figures are read by hand, not asserted)."""

from __future__ import annotations

from proxy.bench.model_output import measure, token_deltas


def test_the_micro_benchmark_reports_every_case():
    """One quick pass gives a positive cost for each case."""
    figures = measure(rounds=1)
    assert len(figures) == 6
    assert all(cost > 0 for cost in figures.values())


def test_token_deltas_cover_the_text():
    """The deltas put back together are the text."""
    assert "".join(token_deltas("abcdefghij", 3)) == "abcdefghij"
