"""Aggregates over synthetic requests: stats, throughput, goodput, errors, breakdowns."""

from __future__ import annotations

import numpy as np
import pytest

from shared_ollama.bench.metrics import meets_slo, parse_slo, server_breakdown, stats, summarize

from ._helpers import req


def test_stats_match_numpy() -> None:
    values = [5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 10.0]
    st = stats(values)
    assert st is not None
    assert st.count == 10
    assert st.mean == 5.5
    assert st.stdev == pytest.approx(float(np.std(values)))  # population stdev, as vLLM
    assert (st.min, st.max) == (1.0, 10.0)
    assert st.p50 == 5.5
    assert st.p90 == pytest.approx(9.1)  # linear interpolation between 9 and 10
    assert st.p99 == pytest.approx(9.91)
    assert stats([]) is None


def test_parse_slo() -> None:
    assert parse_slo("ttft:500, tpot:50ms,e2e:10000") == {
        "ttft_ms": 500.0,
        "tpot_ms": 50.0,
        "e2e_ms": 10000.0,
    }
    for bad in ("latency:5", "ttft", "ttft:abc", "ttft:-1"):
        with pytest.raises(ValueError, match="bad SLO"):
            parse_slo(bad)


def test_goodput_counts_completed_requests_within_every_slo() -> None:
    fast = req(seq=1, chunks_ms=(100, 110, 120))  # ttft 100, tpot 10
    slow_first = req(seq=2, chunks_ms=(400, 410, 420))  # ttft 400
    slow_tokens = req(seq=3, chunks_ms=(100, 200, 300))  # tpot 100
    failed = req(seq=4, chunks_ms=(100,), outcome="error", error_type="ServerError")
    slo = {"ttft_ms": 200.0, "tpot_ms": 50.0}
    assert [meets_slo(r, slo) for r in (fast, slow_first, slow_tokens, failed)] == [
        True,
        False,
        False,
        False,
    ]
    s = summarize([fast, slow_first, slow_tokens, failed], slo=slo, duration_s=2.0)
    assert s.goodput == 0.5  # 1 good request in 2 s
    assert s.goodput_fraction == pytest.approx(1 / 3)
    assert summarize([fast], duration_s=1.0).goodput is None  # no SLO, no goodput


def test_slo_on_a_metric_a_request_lacks_is_not_applied() -> None:
    non_stream = req(stream=False, end_ms=300)
    assert meets_slo(non_stream, {"ttft_ms": 100.0, "e2e_ms": 400.0})
    assert not meets_slo(non_stream, {"e2e_ms": 200.0})


def test_summary_throughput_latency_and_errors() -> None:
    reqs = [
        req(seq=1, start_ms=0, chunks_ms=(100, 110, 120, 130), end_ms=140, input_tokens=20),
        req(seq=2, start_ms=50, chunks_ms=(100, 120, 140), end_ms=150, input_tokens=20),
        req(seq=3, start_ms=60, outcome="error", error_type="Timeout", attempts=3),
        req(seq=4, start_ms=70, outcome="error", error_type="Timeout"),
        req(
            seq=5,
            start_ms=80,
            outcome="interrupted",
            error_type="StreamInterrupted",
            chunks_ms=(10,),
        ),
        req(seq=6, start_ms=90, outcome="cancelled", error_type="CancelledError"),
    ]
    s = summarize(reqs, duration_s=2.0)
    assert (s.requests, s.completed, s.failed, s.cancelled) == (6, 2, 3, 1)
    assert s.total_output_tokens == 7
    assert s.total_input_tokens == 40
    assert s.request_throughput == 1.0
    assert s.output_throughput == 3.5
    assert s.total_token_throughput == 23.5
    assert s.errors_by_type == {"Timeout": 2, "StreamInterrupted": 1}
    assert (s.retries, s.retried_requests) == (2, 1)
    assert s.ttft_ms is not None and s.ttft_ms.mean == 100
    assert s.itl_ms is not None and s.itl_ms.count == 5  # 3 + 2 intervals, failed excluded
    assert s.tpot_ms is not None and sorted([10.0, 20.0]) == [s.tpot_ms.min, s.tpot_ms.max]
    assert s.e2e_ms is not None and s.e2e_ms.max == 150


def test_duration_defaults_to_the_span_from_first_send_to_last_end() -> None:
    reqs = [
        req(seq=1, start_ms=0, chunks_ms=(10,), end_ms=500),
        req(seq=2, start_ms=200, chunks_ms=(10,), end_ms=800, t_scheduled_ms=100),
    ]
    assert summarize(reqs).duration_s == pytest.approx(1.0)


def test_itl_pools_per_token_intervals_of_multi_token_chunks() -> None:
    # 8 tokens in 2-token chunks every 20 ms: ITL 10 ms each, 6 of them.
    r = req(chunks_ms=(50, 70, 90, 110), output_tokens=8)
    s = summarize([r], duration_s=1.0)
    assert s.itl_ms is not None
    assert (s.itl_ms.count, s.itl_ms.p50, s.itl_ms.p99) == (6, 10.0, 10.0)
    assert s.tpot_ms is not None and s.tpot_ms.mean == 10.0


def test_per_endpoint_breakdown() -> None:
    reqs = [
        req(seq=1, endpoint="http://a:1", chunks_ms=(10, 20)),
        req(seq=2, endpoint="http://b:2", chunks_ms=(30, 50)),
        req(seq=3, endpoint="http://b:2", outcome="error", error_type="ServerError"),
    ]
    s = summarize(reqs, duration_s=1.0)
    a, b = s.per_endpoint["http://a:1"], s.per_endpoint["http://b:2"]
    assert (a.requests, a.completed, a.failed, a.output_tokens) == (1, 1, 0, 2)
    assert (b.requests, b.completed, b.failed) == (2, 1, 1)
    assert b.errors_by_type == {"ServerError": 1}
    assert b.ttft_ms is not None and b.ttft_ms.p50 == 30


def test_server_breakdown_ollama_and_tgi() -> None:
    ollama = req(
        chunks_ms=(10, 20, 30, 40),
        end_ms=100,
        timings={
            "total_duration_ns": 90e6,
            "load_duration_ns": 5e6,
            "prompt_eval_duration_ns": 15e6,
            "eval_duration_ns": 40e6,
        },
    )
    tgi = req(
        seq=2,
        stream=False,
        end_ms=60,
        output_tokens=4,
        timings={
            "queue_time_ms": 3.0,
            "inference_time_ms": 50.0,
            "time_per_token_ms": 12.5,
        },
    )
    b = server_breakdown([ollama, tgi])
    assert b["load_ms"].mean == 5
    assert b["prefill_ms"].mean == 15
    assert b["decode_ms"].mean == 40
    assert b["decode_ms_per_token"].mean == 10  # 40 ms over 4 output tokens
    assert sorted([b["queue_ms"].min, b["queue_ms"].max]) == [3.0, 30.0]  # 90-5-15-40; TGI
    assert b["overhead_ms"].mean == 10  # client 100 ms vs server total 90 ms
    assert b["inference_ms"].mean == 50
    assert b["time_per_token_ms"].mean == 12.5


def test_vllm_compatible_keys() -> None:
    s = summarize([req(chunks_ms=(100, 110, 120), end_ms=130)], duration_s=1.0)
    v = s.vllm
    assert v["completed"] == 1
    assert v["mean_ttft_ms"] == v["median_ttft_ms"] == v["p99_ttft_ms"] == 100
    assert v["mean_tpot_ms"] == 10
    assert v["mean_itl_ms"] == 10
    assert v["p99_e2el_ms"] == 130
    assert v["request_throughput"] == 1.0
    assert v["output_throughput"] == 3.0
    for key in (
        "std_ttft_ms",
        "p90_itl_ms",
        "p95_tpot_ms",
        "total_token_throughput",
        "request_goodput",
        "duration",
        "total_input_tokens",
    ):
        assert key in v
