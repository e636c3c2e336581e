"""compare: deltas of B against A and the regression verdict."""

from __future__ import annotations

import math

import pytest

from shared_ollama.bench.compare import compare, parse_threshold
from shared_ollama.bench.metrics import summarize
from shared_ollama.bench.result import BenchResult, PhaseResult

from ._helpers import req
from .test_result import make_result


def _result(ttft_ms: float, n_ok: int = 4, n_failed: int = 0, phase: str = "c=1") -> BenchResult:
    reqs = [req(seq=i, chunks_ms=(ttft_ms, ttft_ms + 10), end_ms=ttft_ms + 20) for i in range(n_ok)]
    reqs += [req(seq=100 + i, outcome="error", error_type="Timeout") for i in range(n_failed)]
    s = summarize(reqs, duration_s=1.0)
    base = make_result()
    phases = [
        PhaseResult(name=phase, mode="closed", concurrency=1, t_start_ns=0, t_end_ns=1, summary=s)
    ]
    return base.model_copy(update={"summary": s, "phases": phases, "requests": reqs})


def test_threshold_parsing() -> None:
    assert parse_threshold("10%") == 10.0
    assert parse_threshold("2.5") == 2.5
    for bad in ("ten", "-1%"):
        with pytest.raises(ValueError):
            parse_threshold(bad)


def test_latency_up_is_a_regression_beyond_the_threshold() -> None:
    deltas, notes = compare(_result(100), _result(115), threshold_pct=10)
    by = {(d.scope, d.metric): d for d in deltas}
    d = by[("all", "mean_ttft_ms")]
    assert (d.a, d.b) == (100, 115)
    assert d.change_pct == pytest.approx(15)
    assert d.regression
    assert by[("c=1", "mean_ttft_ms")].regression  # phases are compared too
    assert not by[("all", "mean_tpot_ms")].regression  # unchanged
    assert notes == []
    deltas, _ = compare(_result(100), _result(105), threshold_pct=10)
    assert not any(d.regression for d in deltas)


def test_throughput_down_is_a_regression_and_up_is_not() -> None:
    deltas, _ = compare(_result(100, n_ok=10), _result(100, n_ok=5), threshold_pct=10)
    assert {d.metric for d in deltas if d.regression} >= {"request_throughput"}
    deltas, _ = compare(_result(100, n_ok=5), _result(100, n_ok=10), threshold_pct=10)
    assert not any(d.metric == "request_throughput" and d.regression for d in deltas)


def test_errors_appearing_is_a_regression() -> None:
    deltas, _ = compare(
        _result(100), _result(100, n_failed=1), threshold_pct=50, metrics=["error_rate"]
    )
    d = deltas[0]
    assert d.a == 0 and d.b == pytest.approx(0.2)
    assert d.change_pct == math.inf and d.regression


def test_no_threshold_means_no_verdict() -> None:
    deltas, _ = compare(_result(100), _result(500), threshold_pct=None)
    assert not any(d.regression for d in deltas)


def test_unmatched_phases_are_noted_and_unknown_metrics_refused() -> None:
    _, notes = compare(_result(100, phase="c=1"), _result(100, phase="c=4"), threshold_pct=5)
    assert notes == ["phase 'c=1' is only in A", "phase 'c=4' is only in B"]
    with pytest.raises(ValueError, match="unknown metric"):
        compare(_result(1), _result(1), threshold_pct=5, metrics=["speed"])
