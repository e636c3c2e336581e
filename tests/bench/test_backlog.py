"""The bench says when its own backlog, not the server, is in the latencies: per-request client
queue time, per-phase driver CPU, and the warnings built from them."""

from __future__ import annotations

import asyncio

from shared_ollama.bench.result import Stats, Summary
from shared_ollama.bench.scenario import validate_scenario
from shared_ollama.bench.session import BACKLOG_MS, backlog_warnings, run_scenario
from shared_ollama.testing import FakeEngine, TimingModel


def _stats(p99: float) -> Stats:
    return Stats(count=10, mean=p99 / 2, stdev=1.0, min=0.0, max=p99, p50=p99 / 2, p90=p99,
                 p95=p99, p99=p99)  # fmt: skip


def _summary(**fields: Stats) -> Summary:
    base = dict(requests=10, completed=10, failed=0, cancelled=0, duration_s=1.0,
                total_input_tokens=0, total_output_tokens=0, request_throughput=10.0,
                output_throughput=0.0, total_token_throughput=0.0)  # fmt: skip
    return Summary.model_validate({**base, **fields})


def test_each_sign_of_backlog_gets_its_warning_and_a_clean_phase_none() -> None:
    clean = backlog_warnings(0.3, _summary(send_lag_ms=_stats(1.0)), requested_rate=10.0,
                             achieved=9.9)  # fmt: skip
    assert clean == []
    busy = backlog_warnings(0.95, _summary(), requested_rate=None, achieved=None)
    assert len(busy) == 1 and busy[0].startswith("driver saturated")
    late = _summary(send_lag_ms=_stats(BACKLOG_MS * 3), client_queue_ms=_stats(BACKLOG_MS * 2))
    warned = backlog_warnings(0.5, late, requested_rate=10.0, achieved=8.0)
    assert [w.split(":")[0] for w in warned] == ["sent late", "under-delivered", "client queue"]


def test_calls_waiting_for_an_endpoint_slot_are_counted_as_client_queue() -> None:
    """One slot (``max_in_flight=1``) and four workers: three calls at a time wait inside the
    client for at least one whole call (50 ms at the engine), so the phase says its
    latencies include the client's own queue, and measures the driver's CPU."""
    timing = TimingModel(ttft_base_s=0.05, ttft_per_prompt_token_s=0.0, itl_s=0.0)
    with FakeEngine(kind="openai", models=("m",), timing=timing, slots=4) as engine:
        scenario = validate_scenario(
            {
                "model": "m",
                "pool": {
                    "endpoints": [{"url": engine.url, "kind": "openai", "max_in_flight": 1}],
                    "health": {"enabled": False},
                },
                "workloads": [{"prompt_tokens": 4, "max_tokens": 2}],
                "schedules": [{"kind": "concurrency", "levels": [4], "requests": 12}],
                "warmup": {"requests": 0},
                "calibrate": "off",
                "samplers": {"enabled": False},
            }
        )
        result = asyncio.run(run_scenario(scenario))
    phase = result.phases[0]
    assert phase.summary.completed == 12
    queue = phase.summary.client_queue_ms
    assert queue is not None and queue.p99 >= 50.0, queue  # a whole call's wait, at least
    assert any(w.startswith("client queue") for w in phase.warnings), phase.warnings
    assert phase.driver_cpu is not None and 0 <= phase.driver_cpu <= 1.5
    assert all(r.client_queue_ms is not None for r in result.requests)
